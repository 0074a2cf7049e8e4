//! The client side of one request, as the gateway sees it: Pingora's session (HTTP/2, TLS, and
//! any HTTP/1 request Sluice's own side declines) or Sluice's own HTTP/1.1 side ([`h1`]).
//!
//! An enum rather than a trait: the request path is compiled once, and each call is a branch
//! the CPU predicts (a connection stays on one side), where a generic gateway would be two
//! copies of the request path competing for the instruction cache.

pub(crate) mod h1;

use std::io;

use bytes::Bytes;
use http::{Method, StatusCode};
use pingora_core::protocols::http::{HttpTask, ServerSession};
use pingora_http::ResponseHeader;

/// A request being served, on either side.
pub(crate) enum Client<'a> {
    Pingora(&'a mut ServerSession),
    H1(&'a mut h1::Conn),
}

/// Pingora's errors carried as I/O errors: the gateway only logs them.
fn pingora_error(e: Box<pingora_error::Error>) -> io::Error {
    io::Error::other(e)
}

impl Client<'_> {
    pub fn method(&self) -> &Method {
        match self {
            Self::Pingora(s) => &s.req_header().method,
            Self::H1(c) => c.method(),
        }
    }

    /// The request target's path, without the query.
    pub fn path(&self) -> &str {
        match self {
            Self::Pingora(s) => s.req_header().uri.path(),
            Self::H1(c) => c.path(),
        }
    }

    /// The first value of the request header field `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        match self {
            Self::Pingora(s) => s.get_header(name).map(http::HeaderValue::as_bytes),
            Self::H1(c) => c.header(name),
        }
    }

    /// Closes the connection once this request is answered.
    pub fn close_after(&mut self) {
        match self {
            Self::Pingora(s) => s.set_keepalive(None),
            Self::H1(c) => c.close_after(),
        }
    }

    /// The next piece of the request body; `None` at its end.
    pub async fn read_body(&mut self) -> io::Result<Option<Bytes>> {
        match self {
            Self::Pingora(s) => s.read_request_body().await.map_err(pingora_error),
            Self::H1(c) => c.read_body().await,
        }
    }

    /// Returns when the client hangs up while its answer is being streamed (the body was read).
    pub async fn hung_up(&mut self) {
        match self {
            Self::Pingora(s) => {
                let _ = s.read_body_or_idle(true).await;
            }
            Self::H1(c) => c.hung_up().await,
        }
    }

    pub async fn write_header(&mut self, resp: Box<ResponseHeader>) -> io::Result<()> {
        match self {
            Self::Pingora(s) => s.write_response_header(resp).await.map_err(pingora_error),
            Self::H1(c) => c.write_header(&resp).await,
        }
    }

    pub async fn write_body(&mut self, data: Bytes, end: bool) -> io::Result<()> {
        match self {
            Self::Pingora(s) => s
                .write_response_body(data, end)
                .await
                .map_err(pingora_error),
            Self::H1(c) => c.write_body(&data, end).await,
        }
    }

    /// Writes a whole answer, head and body, in one go.
    pub async fn write_whole(&mut self, resp: Box<ResponseHeader>, body: Bytes) -> io::Result<()> {
        match self {
            Self::Pingora(s) => {
                let tasks = vec![
                    HttpTask::Header(resp, false),
                    HttpTask::Body(Some(body), true),
                ];
                s.response_duplex_vec(tasks)
                    .await
                    .map(drop)
                    .map_err(pingora_error)
            }
            Self::H1(c) => {
                c.write_header(&resp).await?;
                c.write_body(&body, true).await
            }
        }
    }

    /// The status of the answer written, if one was.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Pingora(s) => s.response_written().map(|h| h.status),
            Self::H1(c) => c.status(),
        }
    }
}
