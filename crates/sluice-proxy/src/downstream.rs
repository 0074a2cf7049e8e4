//! The client side of one request, as the gateway sees it: Pingora's session (HTTP/2, TLS, and
//! any HTTP/1 request Sluice's own side declines) or Sluice's own HTTP/1.1 side ([`h1`]).
//!
//! An enum rather than a trait: the request path is compiled once, and each call is a branch
//! the CPU predicts (a connection stays on one side), where a generic gateway would be two
//! copies of the request path competing for the instruction cache.

pub(crate) mod h1;

use std::io;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use pingora_core::protocols::http::{HttpTask, ServerSession};
use pingora_http::ResponseHeader;

use crate::field_is;
use crate::upstream::Head;

/// Why [`Client::read_whole_body`] gave no body.
#[derive(Debug)]
pub enum BodyError {
    /// Longer than allowed (declared so, or found so while reading).
    TooLarge,
    /// The read failed, or the client closed inside the body.
    Read(io::Error),
}

/// The head of an answer relayed from an upstream: its status and fields but hop-by-hop ones
/// (and `Content-Length` unless kept), then Sluice's own, which replace any upstream field of
/// the same name. Sluice's HTTP/1.1 side writes it out as it is (the upstream's fields as they
/// came, name case included); for Pingora's session it becomes a `ResponseHeader`. (Building a
/// header map per answer, only to serialize it, was ~7k instructions of a request's ~62k:
/// hashing each name in, and dropping the map.)
pub(crate) struct AnswerHead<'a> {
    pub status: StatusCode,
    pub upstream: &'a Head,
    pub keep_length: bool,
    pub own: Vec<(HeaderName, Own<'a>)>,
}

/// A field value of Sluice's own.
pub(crate) enum Own<'a> {
    /// A value from the upstream's head (valid: httparse checked it).
    Value(&'a [u8]),
    Number(u64),
    /// Checked by [`AnswerHead::text`] to be a valid field value.
    Text(&'a str),
}

/// Response header fields never copied from an upstream: hop-by-hop (RFC 9110 §7.6.1) and
/// framing, which the server side sets for the client connection. Lowercase.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether the field `name` is one of [`HOP_BY_HOP`] (ASCII case ignored).
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| field_is(name, h))
}

impl<'a> AnswerHead<'a> {
    /// `value` as a field value of Sluice's own, if it is a valid one (visible ASCII, spaces and
    /// tabs). Every byte is looked at, with no early exit, so that the loop compiles to SIMD
    /// compares (as `access::json_str`'s).
    pub fn text(value: &'a str) -> Option<Own<'a>> {
        value
            .bytes()
            .fold(true, |ok, b| {
                ok & ((b == b'\t') | (b.wrapping_sub(b' ') <= b'~' - b' '))
            })
            .then_some(Own::Text(value))
    }

    /// Whether the upstream's field `name` goes out.
    pub fn passes(&self, name: &[u8]) -> bool {
        !is_hop_by_hop(name)
            && (self.keep_length || !field_is(name, "content-length"))
            && !self.own.iter().any(|(own, _)| field_is(name, own.as_str()))
    }

    /// Whether the answer declares its length.
    pub fn has_length(&self) -> bool {
        let length = &http::header::CONTENT_LENGTH;
        self.own.iter().any(|(name, _)| name == length)
            || (self.keep_length && self.upstream.get("content-length").is_some())
    }

    /// The head as Pingora's `ResponseHeader`.
    pub fn to_response_header(&self) -> Box<ResponseHeader> {
        // A plain header map handed to Pingora whole: inserting field by field into a
        // `ResponseHeader` allocates a case-preserving copy of every name.
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        parts.headers = self.upstream.to_header_map(|name| self.passes(name));
        let headers = &mut parts.headers;
        headers.reserve(self.own.len());
        for (name, value) in &self.own {
            let value = match value {
                Own::Value(v) => match HeaderValue::from_bytes(v) {
                    Ok(v) => v,
                    Err(_) => continue, // not from an upstream's head
                },
                Own::Number(n) => HeaderValue::from(*n),
                Own::Text(t) => match HeaderValue::from_str(t) {
                    Ok(v) => v,
                    Err(_) => continue, // not made by `text`
                },
            };
            headers.insert(name.clone(), value);
        }
        Box::new(ResponseHeader::from(parts))
    }
}

/// The request header fields the gateway reads. Sluice's HTTP/1.1 side notes where each lies
/// while it parses the head (the first of each name), so a lookup is an index, not a scan of
/// every field comparing names (which was ~1.1k instructions over a request's 7 lookups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Authorization,
    ApiKey,
    ContentType,
    ContentLength,
    RequestId,
    Accept,
    UserAgent,
    OpenaiBeta,
}

impl Field {
    /// How many there are.
    pub const COUNT: usize = 8;

    /// The field's name, lowercase.
    pub fn name(self) -> &'static str {
        match self {
            Self::Authorization => "authorization",
            Self::ApiKey => "api-key",
            Self::ContentType => "content-type",
            Self::ContentLength => "content-length",
            Self::RequestId => "x-request-id",
            Self::Accept => "accept",
            Self::UserAgent => "user-agent",
            Self::OpenaiBeta => "openai-beta",
        }
    }

    /// Which of them the field name `name` is, if any (ASCII case ignored).
    pub fn of(name: &[u8]) -> Option<Self> {
        let candidates: &[Self] = match name.len() {
            6 => &[Self::Accept],
            7 => &[Self::ApiKey],
            10 => &[Self::UserAgent],
            11 => &[Self::OpenaiBeta],
            12 => &[Self::ContentType, Self::RequestId],
            13 => &[Self::Authorization],
            14 => &[Self::ContentLength],
            _ => &[],
        };
        candidates
            .iter()
            .copied()
            .find(|f| field_is(name, f.name()))
    }
}

/// Whom a client key belongs to, as a connection remembers it (see [`Client::remembered_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyOwner {
    /// The master key.
    Admin,
    /// The virtual key at this index of the config's `keys`.
    Key(usize),
}

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

    /// The first value of the request header field `field`.
    pub fn header(&self, field: Field) -> Option<&[u8]> {
        match self {
            Self::Pingora(s) => s.get_header(field.name()).map(http::HeaderValue::as_bytes),
            Self::H1(c) => c.header(field),
        }
    }

    /// Whom the key this request presents belongs to, when the previous request on the
    /// connection presented the very same field value and was let in under the config of
    /// `generation`. Only Sluice's HTTP/1.1 side remembers (a keep-alive client sends one key
    /// request after request: this saves hashing it and the lookup each time).
    pub fn remembered_key(&self, generation: u64) -> Option<KeyOwner> {
        match self {
            Self::Pingora(_) => None,
            Self::H1(c) => c.remembered_key(generation),
        }
    }

    /// Remembers that this request's key belongs to `owner` under the config of `generation`.
    pub fn remember_key(&mut self, generation: u64, owner: KeyOwner) {
        if let Self::H1(c) = self {
            c.remember_key(generation, owner);
        }
    }

    /// Closes the connection once this request is answered.
    pub fn close_after(&mut self) {
        match self {
            Self::Pingora(s) => s.set_keepalive(None),
            Self::H1(c) => c.close_after(),
        }
    }

    /// The whole request body, refused unread when its declared length exceeds `max` and
    /// as soon as more than `max` bytes came otherwise. Sluice's HTTP/1.1 side reads it into
    /// one buffer made for it ([`h1::Conn::read_whole_body`]). Under Pingora's session a body
    /// usually arrives as one chunk (over HTTP/2 a slice of its data frame): that chunk is the
    /// body, uncopied; only a body in pieces is joined in a buffer of its own.
    ///
    /// # Errors
    /// [`BodyError`]; either way the connection is no use for another request.
    pub async fn read_whole_body(&mut self, max: usize) -> Result<Bytes, BodyError> {
        let session = match self {
            Self::H1(c) => {
                return match c.body_len() {
                    Some(len) if len <= max => c.read_whole_body().await.map_err(BodyError::Read),
                    _ => Err(BodyError::TooLarge),
                };
            }
            Self::Pingora(s) => s,
        };
        let declared = session
            .get_header(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(BodyError::TooLarge);
        }
        let mut first: Option<Bytes> = None;
        let mut joined = BytesMut::new();
        let mut len = 0;
        loop {
            match session.read_request_body().await.map_err(pingora_error) {
                Ok(Some(chunk)) => {
                    len += chunk.len();
                    if len > max {
                        return Err(BodyError::TooLarge);
                    }
                    match first.take() {
                        None if joined.is_empty() => first = Some(chunk),
                        earlier => {
                            if let Some(earlier) = earlier {
                                joined.reserve(declared.unwrap_or(len).max(len));
                                joined.extend_from_slice(&earlier);
                            }
                            joined.extend_from_slice(&chunk);
                        }
                    }
                }
                Ok(None) => return Ok(first.unwrap_or_else(|| joined.freeze())),
                Err(e) => return Err(BodyError::Read(e)),
            }
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

    /// Writes the head of an answer relayed from an upstream; with `body`, the whole answer.
    pub async fn write_answer(
        &mut self,
        head: &AnswerHead<'_>,
        body: Option<&Bytes>,
    ) -> io::Result<()> {
        match (self, body) {
            (Self::H1(c), body) => {
                c.write_answer_head(head).await?;
                match body {
                    Some(body) => c.write_body(body, true).await,
                    None => Ok(()),
                }
            }
            (client, Some(body)) => {
                client
                    .write_whole(head.to_response_header(), body.clone())
                    .await
            }
            (client, None) => client.write_header(head.to_response_header()).await,
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
