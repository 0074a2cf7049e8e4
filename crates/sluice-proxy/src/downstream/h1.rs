//! Sluice's own HTTP/1.1 server side for the common request on a plain connection, and a way
//! back to Pingora's session for every other.
//!
//! # Why
//! On the load bench Pingora's downstream HTTP/1 session was the largest single part of a
//! request's work that nginx does not do: about 20k of 78k instructions per request with four
//! header fields and 30k with an OpenAI SDK's fifteen (each field is hashed into two header maps,
//! one of them a case-preserving copy), plus a 4 KiB header buffer and a 4 KiB response-header
//! buffer allocated per request. The gateway needs a handful of fields, looked up once each.
//!
//! # What is served here, and what is not
//! A request is served here when its head parses with `httparse` (at most [`MAX_FIELDS`]
//! fields, at most [`MAX_HEAD`] bytes), it is HTTP/1.1 with an origin-form target, carries at
//! most one well-formed `Content-Length`, and none of `Transfer-Encoding`, `Expect`, `Upgrade`,
//! nor a `Connection` option other than `close`/`keep-alive`. For anything else (HTTP/1.0,
//! chunked bodies, `100-continue`, upgrades, odd or malformed heads) this side *declines*: the
//! bytes it read are put back in front of the socket ([`Conn::into_parts`]) and the connection
//! goes to Pingora's session, which serves it, and every later request on it, as before. So
//! the fast path never rejects or reinterprets a request Pingora would have taken; the framing
//! cases that decide request smuggling (`Transfer-Encoding` with `Content-Length`, duplicate
//! lengths) are exactly the ones it hands over.
//!
//! Responses follow Pingora's rules, so a client sees the same thing on either path: no body for
//! `HEAD`, 204 and 304; a `Content-Length` answer kept in one buffer and written when it ends;
//! an answer without a length delimited by the close (and so the connection's last), written as
//! it comes; `Date` and `Connection` set here; and a response sent before the request body was
//! read to the end closes the connection (Pingora's `close_on_response_before_downstream_finish`).
//! Pipelined requests are answered in order from the bytes already read.

use std::io;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use pingora_http::ResponseHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{AnswerHead, Field, KeyOwner, Own};
use crate::field_is;

/// Most header fields a request served here may have; a request with more is declined.
pub const MAX_FIELDS: usize = 64;
/// Largest request head (request line and fields) served here; a longer one is declined.
pub const MAX_HEAD: usize = 16 * 1024;
/// Room made for each read: a chat request's head and a few KB of body in one `recv`.
const READ_SIZE: usize = 8 * 1024;
/// How far ahead of the body bytes that arrived [`Conn::read_whole_body`] makes room.
const BODY_AHEAD: usize = 1024 * 1024;
/// A `Content-Length` answer is kept until it ends unless it grows past this; then it is
/// written as it comes, like Pingora's 64 KiB-bounded write buffer.
const MAX_BUFFERED_ANSWER: usize = 64 * 1024;
/// Room made for an answer when its head is written: the head and a typical JSON body.
const ANSWER_BUFFER: usize = 2 * 1024;
/// HTTP/2's connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What [`Conn::read_head`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// A request to serve here.
    Ready,
    /// The client closed the connection (between requests, or inside a head).
    Closed,
    /// A request for Pingora's session: see the module docs.
    Declined,
}

/// How the answer being written is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `HEAD`, 204, 304: body bytes are dropped.
    None,
    /// `Content-Length`.
    Length,
    /// Neither: the body ends with the connection.
    Close,
}

/// A plain client connection served by Sluice's HTTP/1.1 side, request after request.
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed: a head being read, body bytes, pipelined requests.
    buf: BytesMut,
    /// The answer's bytes not yet written.
    out: Vec<u8>,
    /// The current request's head; `path` and `known` index into it.
    head: Bytes,
    method: Method,
    path: (u32, u32),
    /// Where the value of each [`Field`] lies in the head (the first of its name), if it came.
    known: [Option<(u32, u32)>; Field::COUNT],
    /// Request body bytes still to be read.
    body_left: u64,
    keepalive: bool,
    /// Requests this connection may still carry (`keepalive_request_limit`); `None`: no limit.
    reuses_left: Option<u32>,
    /// The status and framing of the answer once its head was written.
    answer: Option<(StatusCode, Framing)>,
    /// The key field's value of the last request let in, and whose it was.
    key_memo: Option<KeyMemo>,
}

/// See [`Conn::remembered_key`].
#[derive(Debug)]
struct KeyMemo {
    /// The config it was checked against (`gateway::State`'s generation).
    generation: u64,
    field: Field,
    value: Vec<u8>,
    owner: KeyOwner,
}

impl Conn {
    /// Wraps an accepted connection; `reuses` is the server's `keepalive_request_limit`.
    pub fn new(io: TcpStream, reuses: Option<u32>) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            head: Bytes::new(),
            method: Method::GET,
            path: (0, 0),
            known: [None; Field::COUNT],
            body_left: 0,
            keepalive: true,
            reuses_left: reuses,
            answer: None,
            key_memo: None,
        }
    }

    /// Reads until it can tell whether the client speaks HTTP/2 with prior knowledge (h2c):
    /// `true` once the 24-byte preface has arrived, `false` at the first byte that differs.
    /// The bytes stay buffered, for [`Conn::read_head`] or (through [`Conn::into_parts`]) for
    /// Pingora's HTTP/2 session.
    ///
    /// # Errors
    /// A failed read, or the client closing before it said which protocol it speaks.
    pub async fn sniff_h2(&mut self) -> io::Result<bool> {
        loop {
            let n = self.buf.len().min(H2_PREFACE.len());
            if self.buf[..n] != H2_PREFACE[..n] {
                return Ok(false);
            }
            if n == H2_PREFACE.len() {
                return Ok(true);
            }
            if self.fill(READ_SIZE).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads the next request's head. The caller bounds the wait (`client_timeout`).
    ///
    /// # Errors
    /// A failed read.
    pub async fn read_head(&mut self) -> io::Result<Head> {
        self.answer = None;
        self.body_left = 0;
        loop {
            if !self.buf.is_empty() {
                match self.parse() {
                    Some(true) => return Ok(Head::Ready),
                    Some(false) => return Ok(Head::Declined),
                    None if self.buf.len() >= MAX_HEAD => return Ok(Head::Declined),
                    None => {}
                }
            }
            if self.buf.is_empty() {
                // Nothing buffered: wait for the client without holding a read buffer or an
                // answer's buffer (a keep-alive connection can wait long, and a front door
                // holds many). The next request's buffer comes from the allocator's free list
                // for this thread, most likely the same, still warm, block.
                self.buf = BytesMut::new();
                self.out = Vec::new();
                self.io.readable().await?;
            }
            if self.fill(READ_SIZE).await? == 0 {
                return Ok(Head::Closed);
            }
        }
    }

    /// Parses the head at the front of the buffer: `None` while incomplete, `Some(false)` to
    /// decline it, `Some(true)` when it was taken (split off the buffer).
    fn parse(&mut self) -> Option<bool> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut raw);
        let len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(false), // Pingora decides (it may be lenient, or answer 400)
        };
        let (Some(1), Some(path), Some(method)) = (req.version, req.path, req.method) else {
            return Some(false);
        };
        if !path.starts_with('/') {
            return Some(false);
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Some(false);
        };
        let base = self.buf.as_ptr() as usize;
        // Offsets within the head (< MAX_HEAD, so they fit a u32).
        let span = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
        let mut length = None;
        let mut keepalive = true;
        self.known = [None; Field::COUNT];
        for f in req.headers.iter() {
            let (name, value) = (f.name.as_bytes(), f.value);
            if field_is(name, "content-length") {
                match (length, parse_length(value)) {
                    (None, Some(n)) => length = Some(n),
                    _ => return Some(false), // a second length, or a malformed one
                }
            } else if field_is(name, "transfer-encoding")
                || field_is(name, "expect")
                || field_is(name, "upgrade")
            {
                return Some(false);
            } else if field_is(name, "connection") {
                for option in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if option.eq_ignore_ascii_case(b"close") {
                        keepalive = false;
                    } else if !option.eq_ignore_ascii_case(b"keep-alive") && !option.is_empty() {
                        return Some(false);
                    }
                }
            }
            if let Some(field) = Field::of(name) {
                self.known[field as usize].get_or_insert(span(value));
            }
        }
        self.path = span(path.as_bytes());
        self.method = method;
        self.body_left = length.unwrap_or(0);
        self.keepalive = keepalive && self.reuses_left != Some(0);
        self.head = self.buf.split_to(len).freeze();
        Some(true)
    }

    /// Reads more bytes into the buffer, making room for `want` when little is left (the
    /// allocation is reclaimed in place once every slice handed out from it was dropped).
    async fn fill(&mut self, want: usize) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < want / 4 {
            self.buf.reserve(want);
        }
        self.io.read_buf(&mut self.buf).await
    }

    fn slice(&self, (at, len): (u32, u32)) -> &[u8] {
        self.head
            .get(at as usize..(at + len) as usize)
            .unwrap_or_default()
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request target's path (without the query).
    pub fn path(&self) -> &str {
        let target = self.slice(self.path);
        let path = target.split(|b| *b == b'?').next().unwrap_or_default();
        // httparse took the target as visible ASCII.
        std::str::from_utf8(path).unwrap_or_default()
    }

    /// The value of the first field `field`.
    pub fn header(&self, field: Field) -> Option<&[u8]> {
        self.known[field as usize].map(|at| self.slice(at))
    }

    /// The field that carries the client's key, as the gateway reads it: `authorization` when
    /// present, else `api-key`; and where its value lies.
    fn key_field(&self) -> Option<(Field, (u32, u32))> {
        [Field::Authorization, Field::ApiKey]
            .into_iter()
            .find_map(|f| self.known[f as usize].map(|at| (f, at)))
    }

    /// Whom this request's key belongs to, if the last request let in on this connection sent
    /// the same key field with the same value, checked under the config of `generation`.
    /// Whether a key is let in is a function of that value and the config alone, so the
    /// answer is the one a fresh check would give; a reload (a new generation) forgets it.
    pub fn remembered_key(&self, generation: u64) -> Option<KeyOwner> {
        let memo = self.key_memo.as_ref()?;
        let (field, at) = self.key_field()?;
        (memo.generation == generation && memo.field == field && memo.value == self.slice(at))
            .then_some(memo.owner)
    }

    /// Remembers this request's key field as belonging to `owner` (see
    /// [`Conn::remembered_key`]). The copy of the value lives as long as the connection.
    pub fn remember_key(&mut self, generation: u64, owner: KeyOwner) {
        let Some((field, at)) = self.key_field() else {
            return;
        };
        let value = self
            .head
            .get(at.0 as usize..(at.0 + at.1) as usize)
            .unwrap_or_default();
        let memo = self.key_memo.get_or_insert_with(|| KeyMemo {
            generation,
            field,
            value: Vec::new(),
            owner,
        });
        memo.generation = generation;
        memo.field = field;
        memo.owner = owner;
        memo.value.clear();
        memo.value.extend_from_slice(value);
    }

    /// Closes the connection after this request's answer.
    pub fn close_after(&mut self) {
        self.keepalive = false;
    }

    /// The length of the request body its head declared (`Content-Length`; none: 0). A
    /// request whose body is framed otherwise is declined to Pingora's session.
    pub fn body_len(&self) -> Option<usize> {
        usize::try_from(self.body_left).ok()
    }

    /// The rest of the request body, whole (its length is declared: see [`Conn::body_len`]).
    /// Room for the body is made before it arrives, so the reads land in place and nothing is
    /// joined afterwards: one buffer, no copy (a 64 KiB prompt came in eight pieces, joined by a copy of them all). The room
    /// made runs at most [`BODY_AHEAD`] beyond what has arrived, so a client that declares a
    /// large body and sends it slowly holds little more than it sent; a body larger than that
    /// grows its buffer as it comes (each growth at least doubles it).
    ///
    /// # Errors
    /// A failed read, or the client closing inside the body.
    pub async fn read_whole_body(&mut self) -> io::Result<Bytes> {
        let len = self
            .body_len()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "body too large"))?;
        while self.buf.len() < len {
            let left = len - self.buf.len();
            if self.buf.capacity() - self.buf.len() < left {
                self.buf.reserve(left.min(BODY_AHEAD.max(self.buf.len())));
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                self.keepalive = false;
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        self.body_left = 0;
        Ok(self.buf.split_to(len).freeze())
    }

    /// Returns once the client has hung up (or its connection failed). Bytes that arrive
    /// instead (a pipelined request) are kept for later, and then it waits for good.
    pub async fn hung_up(&mut self) {
        if self.buf.is_empty() {
            match self.fill(READ_SIZE).await {
                Ok(0) | Err(_) => {
                    self.keepalive = false;
                    return;
                }
                Ok(_) => {}
            }
        }
        std::future::pending::<()>().await;
    }

    /// Writes the answer's head, as Pingora's session would (module docs). A second head is
    /// ignored. Kept in the buffer until the body when a `Content-Length` body follows.
    ///
    /// # Errors
    /// A failed write.
    pub async fn write_header(&mut self, resp: &ResponseHeader) -> io::Result<()> {
        let has_length = resp.headers.contains_key(http::header::CONTENT_LENGTH);
        if !self.start_answer(resp.status, has_length) {
            return Ok(());
        }
        for (name, value) in &resp.headers {
            self.field(name.as_str().as_bytes(), value.as_bytes());
        }
        self.end_head().await
    }

    /// Writes the head of an answer relayed from an upstream, field by field from the
    /// upstream's and Sluice's own: no header map is built for it.
    ///
    /// # Errors
    /// A failed write.
    pub async fn write_answer_head(&mut self, head: &AnswerHead<'_>) -> io::Result<()> {
        if !self.start_answer(head.status, head.has_length()) {
            return Ok(());
        }
        for (name, value) in head.upstream.fields() {
            if head.passes(name) {
                self.field(name, value);
            }
        }
        for (name, value) in &head.own {
            let name = name.as_str().as_bytes();
            match value {
                Own::Value(v) => self.field(name, v),
                Own::Number(n) => self.field(name, itoa::Buffer::new().format(*n).as_bytes()),
                Own::Text(t) => self.field(name, t.as_bytes()),
            }
        }
        self.end_head().await
    }

    /// Settles the answer's framing and starts its head; `false` if a head was written already.
    fn start_answer(&mut self, status: StatusCode, has_length: bool) -> bool {
        if self.answer.is_some() {
            return false;
        }
        if self.body_left > 0 {
            self.keepalive = false; // the rest of the body is not read
        }
        let framing = if self.method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::None
        } else if has_length {
            Framing::Length
        } else {
            self.keepalive = false;
            Framing::Close
        };
        self.answer = Some((status, framing));
        let out = &mut self.out;
        // One allocation for a typical answer (head and a JSON body), not a doubling series.
        out.reserve(ANSWER_BUFFER);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        true
    }

    /// Adds a field to the head, but `Date` and `Connection`, which [`Conn::end_head`] sets.
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if field_is(name, "date") || field_is(name, "connection") {
            return;
        }
        let out = &mut self.out;
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }

    /// Ends the head; sends it now unless a `Content-Length` body follows.
    async fn end_head(&mut self) -> io::Result<()> {
        let out = &mut self.out;
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(pingora_core::protocols::http::date::get_cached_date().as_bytes());
        out.extend_from_slice(if self.keepalive {
            b"\r\nconnection: keep-alive\r\n\r\n".as_slice()
        } else {
            b"\r\nconnection: close\r\n\r\n".as_slice()
        });
        if matches!(self.answer, Some((_, Framing::Length))) {
            Ok(())
        } else {
            self.flush().await // no body, or one that must reach the client as it comes
        }
    }

    /// Writes a piece of the answer's body; `end` says it is the last.
    ///
    /// # Errors
    /// A failed write.
    pub async fn write_body(&mut self, data: &[u8], end: bool) -> io::Result<()> {
        let framing = self.answer.map_or(Framing::None, |(_, f)| f);
        if framing == Framing::None {
            return if end { self.flush().await } else { Ok(()) };
        }
        if self.out.len() + data.len() <= MAX_BUFFERED_ANSWER {
            self.out.extend_from_slice(data);
            if end || framing == Framing::Close {
                self.flush().await?;
            }
            return Ok(());
        }
        self.flush().await?;
        self.io.write_all(data).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.io.write_all(&self.out).await;
        self.out.clear();
        if self.out.capacity() > MAX_BUFFERED_ANSWER {
            self.out = Vec::new(); // a large answer's buffer is not kept by an idle connection
        }
        result
    }

    /// The status of the answer written, if any.
    pub fn status(&self) -> Option<StatusCode> {
        self.answer.map(|(s, _)| s)
    }

    /// Ends the request: writes what is left of the answer and says whether the connection
    /// can carry another.
    pub async fn finish(&mut self) -> bool {
        if self.flush().await.is_err() || !self.keepalive || self.answer.is_none() {
            let _ = self.io.shutdown().await;
            return false;
        }
        if let Some(n) = self.reuses_left.as_mut() {
            *n = n.saturating_sub(1);
        }
        self.head = Bytes::new(); // let the read buffer reclaim its allocation
        true
    }

    /// The socket and the bytes read from it but not consumed, to be put back in front of it
    /// for Pingora's session.
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.io, self.buf)
    }
}

/// A `Content-Length` value as RFC 9110 §8.6 has it: digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A served connection and the client's end of it, on loopback.
    async fn pair() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Conn::new(server, None), client)
    }

    const CHAT: &[u8] = b"POST /v1/chat/completions?api-version=1 HTTP/1.1\r\nHost: x\r\n\
        Authorization: Bearer k\r\nContent-Length: 2\r\nX-Request-Id: r1\r\n\r\n{}";

    #[test]
    fn known_fields_are_told_by_name_in_any_case() {
        let all = [
            Field::Authorization,
            Field::ApiKey,
            Field::ContentType,
            Field::ContentLength,
            Field::RequestId,
            Field::Accept,
            Field::UserAgent,
            Field::OpenaiBeta,
        ];
        assert_eq!(all.len(), Field::COUNT);
        for field in all {
            let name = field.name();
            assert_eq!(Field::of(name.as_bytes()), Some(field), "{name}");
            assert_eq!(Field::of(name.to_ascii_uppercase().as_bytes()), Some(field));
            // One byte off, one byte longer or shorter: not the field.
            let mut near = name.as_bytes().to_vec();
            near[name.len() - 1] ^= 1;
            assert_eq!(Field::of(&near), None, "{name}");
            assert_eq!(Field::of(format!("{name}s").as_bytes()), None);
            assert_eq!(Field::of(&name.as_bytes()[1..]), None);
        }
    }

    #[tokio::test]
    async fn the_first_of_a_repeated_field_counts() {
        let (mut conn, _client) = pair().await;
        conn.buf = BytesMut::from(
            &b"GET /v1/models HTTP/1.1\r\nauthorization: Bearer first\r\n\
               AUTHORIZATION: Bearer second\r\nUser-Agent: sdk\r\n\r\n"[..],
        );
        assert_eq!(conn.parse(), Some(true));
        assert_eq!(
            conn.header(Field::Authorization),
            Some(&b"Bearer first"[..])
        );
        assert_eq!(conn.header(Field::UserAgent), Some(&b"sdk"[..]));
        // The next request on the connection starts with no fields known.
        conn.buf = BytesMut::from(&b"GET /v1/models HTTP/1.1\r\n\r\n"[..]);
        assert_eq!(conn.parse(), Some(true));
        assert_eq!(conn.header(Field::Authorization), None);
    }

    #[tokio::test]
    async fn every_prefix_waits_and_the_whole_head_is_taken() {
        let (mut conn, _client) = pair().await;
        let head_len = CHAT.len() - 2;
        for end in 1..head_len {
            conn.buf = BytesMut::from(&CHAT[..end]);
            assert_eq!(conn.parse(), None, "after {end} bytes");
        }
        conn.buf = BytesMut::from(CHAT);
        assert_eq!(conn.parse(), Some(true));
        assert_eq!(conn.method(), Method::POST);
        assert_eq!(conn.path(), "/v1/chat/completions");
        assert_eq!(conn.header(Field::Authorization), Some(&b"Bearer k"[..]));
        assert_eq!(conn.header(Field::RequestId), Some(&b"r1"[..]));
        assert_eq!(conn.header(Field::ContentLength), Some(&b"2"[..]));
        assert_eq!(conn.header(Field::Accept), None);
        assert!(conn.keepalive);
        assert_eq!(conn.body_len(), Some(2));
        assert_eq!(&conn.read_whole_body().await.unwrap()[..], b"{}");
        assert!(conn.read_whole_body().await.unwrap().is_empty());
        assert!(conn.buf.is_empty());
    }

    /// A body that arrives in pieces (a client writing 64 KiB in 1 KiB writes) comes back
    /// whole, in one buffer made for it before the reads (its first bytes came with the head),
    /// and a pipelined request after it stays buffered for the next head; so does a body
    /// larger than the room made ahead of it (`BODY_AHEAD`), its buffer grown as it comes.
    #[tokio::test]
    async fn a_body_in_pieces_is_read_into_one_buffer_and_what_follows_is_kept() {
        for (len, piece) in [(64 * 1024, 1024), (3 * BODY_AHEAD + 5, 16 * 1024)] {
            let (mut conn, mut client) = pair().await;
            let body: Vec<u8> = (0..len).map(|i| b"abcdefgh"[i % 8]).collect();
            let head = format!("POST /v1/x HTTP/1.1\r\nContent-Length: {len}\r\n\r\n");
            let mut wire = head.into_bytes();
            wire.extend_from_slice(&body);
            wire.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            let writer = tokio::spawn(async move {
                for piece in wire.chunks(piece) {
                    client.write_all(piece).await.unwrap();
                }
                client
            });
            assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
            assert_eq!(conn.body_len(), Some(len));
            let got = conn.read_whole_body().await.unwrap();
            assert!(got == body, "the body of {len} bytes came back changed");
            let _client = writer.await.unwrap();
            assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
            assert_eq!(conn.path(), "/next");
            assert_eq!(conn.body_len(), Some(0));
        }
    }

    /// A client that closes inside the body is an error, and the connection is not reused.
    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let (mut conn, mut client) = pair().await;
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        drop(client);
        assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
        let err = conn.read_whole_body().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!conn.keepalive);
    }

    #[tokio::test]
    async fn heads_whose_framing_is_not_plain_are_declined_untouched() {
        let (mut conn, _client) = pair().await;
        let declined: &[&[u8]] = &[
            b"GET / HTTP/1.0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 2,2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: keep-alive, x-hop\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ];
        for head in declined {
            conn.buf = BytesMut::from(*head);
            assert_eq!(
                conn.parse(),
                Some(false),
                "{}",
                String::from_utf8_lossy(head)
            );
            assert_eq!(
                &conn.buf[..],
                *head,
                "a declined head is left as it was read"
            );
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        conn.buf = BytesMut::from(&many[..]);
        assert_eq!(conn.parse(), Some(false), "more than {MAX_FIELDS} fields");

        // Taken: `Connection: close` (any case, in a list), and an empty body.
        conn.buf = BytesMut::from(&b"GET /x HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n"[..]);
        assert_eq!(conn.parse(), Some(true));
        assert!(!conn.keepalive);
        assert_eq!(conn.body_len(), Some(0));
        assert!(conn.read_whole_body().await.unwrap().is_empty());
    }

    /// Reads one answer (head and, with a `content-length`, its body) from the client's end.
    async fn answer(client: &mut TcpStream, buf: &mut Vec<u8>) -> String {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.parse::<usize>().unwrap());
                let length = if head.contains("x-no-body") {
                    0
                } else {
                    length
                };
                if buf.len() >= end + 4 + length {
                    let whole = buf.drain(..end + 4 + length).collect::<Vec<_>>();
                    return String::from_utf8(whole).unwrap();
                }
            }
            let mut more = [0u8; 4096];
            let n = client.read(&mut more).await.unwrap();
            assert!(
                n > 0,
                "closed inside an answer: {}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&more[..n]);
        }
    }

    fn response(status: u16, headers: &[(&'static str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(status, None).unwrap();
        for (name, value) in headers {
            resp.insert_header(*name, *value).unwrap();
        }
        resp
    }

    #[tokio::test]
    async fn answers_are_framed_as_pingora_frames_them() {
        let (mut conn, mut client) = pair().await;
        let mut got = Vec::new();
        // Three pipelined requests in one write: a POST, a HEAD, a GET that closes.
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcHEAD /b HTTP/1.1\r\n\r\n\
                  GET /c HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();

        assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
        assert_eq!(conn.path(), "/a");
        assert_eq!(&conn.read_whole_body().await.unwrap()[..], b"abc");
        let resp = response(200, &[("content-length", "5"), ("date", "upstream's")]);
        conn.write_header(&resp).await.unwrap();
        conn.write_body(b"hel", false).await.unwrap();
        conn.write_body(b"lo", true).await.unwrap();
        assert!(conn.finish().await);
        let first = answer(&mut client, &mut got).await;
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(first.contains("\r\nconnection: keep-alive\r\n"), "{first}");
        assert_eq!(first.matches("date: ").count(), 1, "{first}");
        assert!(!first.contains("upstream's"), "{first}");
        assert!(first.ends_with("\r\n\r\nhello"), "{first}");

        // HEAD: the length is announced, the body is not sent, the connection goes on.
        assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
        assert_eq!(conn.method(), Method::HEAD);
        let resp = response(200, &[("content-length", "5"), ("x-no-body", "1")]);
        conn.write_header(&resp).await.unwrap();
        conn.write_body(b"hello", true).await.unwrap();
        assert!(conn.finish().await);
        let second = answer(&mut client, &mut got).await;
        assert!(second.contains("\r\ncontent-length: 5\r\n"), "{second}");
        assert!(second.ends_with("\r\n\r\n"), "{second}");
        // Had the body gone out, the next answer would start with it.

        // No length: delimited by the close, sent as it comes; the client asked to close too.
        assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
        assert_eq!(conn.path(), "/c");
        conn.write_header(&response(200, &[("content-type", "text/event-stream")]))
            .await
            .unwrap();
        conn.write_body(b"data: 1\n\n", false).await.unwrap();
        assert!(!conn.finish().await);
        drop(conn);
        client.read_to_end(&mut got).await.unwrap();
        let third = String::from_utf8(got).unwrap();
        assert!(third.starts_with("HTTP/1.1 200 OK\r\n"), "{third}");
        assert!(third.contains("\r\nconnection: close\r\n"), "{third}");
        assert!(third.ends_with("\r\n\r\ndata: 1\n\n"), "{third}");
    }

    #[tokio::test]
    async fn a_relayed_head_carries_the_same_fields_on_both_sides() {
        // Names in mixed case, as upstreams send them: hop-by-hop ones and those Sluice sets
        // are recognised whatever their case.
        let wire = b"HTTP/1.1 200 OK\r\n\
            Content-Type: application/json\r\n\
            Content-Length: 999\r\n\
            Connection: keep-alive\r\n\
            Transfer-Encoding: chunked\r\n\
            X-Request-Id: up-1\r\n\
            x-upstream-request-id: older\r\n\
            X-RateLimit-Remaining-Tokens: 5\r\n\
            openai-processing-ms: 12\r\n\
            set-cookie: a=1\r\n\
            Set-Cookie: b=2\r\n\
            Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n";
        let upstream = crate::upstream::Head::parse(wire).unwrap();
        let theirs = upstream.get("x-request-id").unwrap();
        assert_eq!(theirs, b"up-1");
        let head = AnswerHead {
            status: StatusCode::OK,
            upstream: &upstream,
            keep_length: false,
            own: vec![
                (
                    http::HeaderName::from_static("x-upstream-request-id"),
                    Own::Value(theirs),
                ),
                (
                    http::HeaderName::from_static("x-request-id"),
                    AnswerHead::text("ours").unwrap(),
                ),
                (
                    http::HeaderName::from_static("x-ratelimit-remaining-tokens"),
                    Own::Number(7),
                ),
                (http::header::CONTENT_LENGTH, Own::Number(2)),
            ],
        };
        assert!(AnswerHead::text("bad\r\nx: y").is_none());
        // Visible ASCII, space and tab only, wherever the byte is (the check has no early exit
        // and runs 16 bytes a step: the long ones end past the first step).
        assert!(AnswerHead::text(
            " ~\tall the visible ones: !\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}"
        )
        .is_some());
        for bad in ["\x7f", "\u{e9}", "\0", "\x1f"] {
            assert!(AnswerHead::text(bad).is_none(), "{bad:?}");
            let long = format!("{}{bad}", "a".repeat(40));
            assert!(AnswerHead::text(&long).is_none(), "{long:?}");
        }
        let expected = [
            "content-type: application/json",
            "openai-processing-ms: 12",
            "set-cookie: a=1",
            "set-cookie: b=2",
            "x-upstream-request-id: up-1",
            "x-request-id: ours",
            "x-ratelimit-remaining-tokens: 7",
            "content-length: 2",
        ];
        // Names compared lowercased: Pingora's map lowercases them, Sluice's side relays them
        // as they came (checked below).
        let sorted = |v: Vec<String>| {
            let mut v: Vec<String> = v
                .into_iter()
                .map(|f| match f.split_once(": ") {
                    Some((n, value)) => format!("{}: {value}", n.to_ascii_lowercase()),
                    None => f,
                })
                .collect();
            v.sort();
            v
        };
        let expected = sorted(expected.iter().map(ToString::to_string).collect());

        // Pingora's side: the `ResponseHeader` (Pingora's session replaces `date` and sets
        // `connection` when it writes it).
        let resp = head.to_response_header();
        let pingora = resp
            .headers
            .iter()
            .filter(|(n, _)| *n != http::header::DATE)
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(sorted(pingora), expected);

        // Sluice's side: the bytes on the wire.
        let (mut conn, mut client) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
        conn.write_answer_head(&head).await.unwrap();
        conn.write_body(b"{}", true).await.unwrap();
        let mut got = Vec::new();
        let wire = answer(&mut client, &mut got).await;
        let (head_text, body) = wire.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "{}");
        let mut lines = head_text.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
        let fields: Vec<String> = lines.map(ToString::to_string).collect();
        assert_eq!(
            fields.iter().filter(|f| f.starts_with("date: ")).count(),
            1,
            "{fields:?}"
        );
        assert!(
            !fields.iter().any(|f| f.contains("Mon, 01 Jan 2024")),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"connection: keep-alive".to_owned()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"Content-Type: application/json".to_owned())
                && fields.contains(&"Set-Cookie: b=2".to_owned()),
            "upstream names go out as they came: {fields:?}"
        );
        let relayed = fields
            .into_iter()
            .filter(|f| !f.starts_with("date: ") && !f.starts_with("connection: "))
            .collect();
        assert_eq!(sorted(relayed), expected);
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_closes_the_connection() {
        let (mut conn, mut client) = pair().await;
        client
            .write_all(b"POST /a HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"partial\"")
            .await
            .unwrap();
        assert_eq!(conn.read_head().await.unwrap(), Head::Ready);
        conn.write_header(&response(401, &[("content-length", "0")]))
            .await
            .unwrap();
        conn.write_body(b"", true).await.unwrap();
        assert!(
            !conn.finish().await,
            "the unread body makes the connection unusable"
        );
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8(got).unwrap();
        assert!(got.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{got}");
        assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
    }

    #[tokio::test]
    async fn the_h2_preface_is_told_apart_and_the_bytes_stay() {
        for (sent, h2) in [
            (H2_PREFACE, true),
            (&b"GET / HTTP/1.1\r\n\r\n"[..], false),
            (&b"PRI * HTTP/1.1\r\n\r\n"[..], false),
        ] {
            let (mut conn, mut client) = pair().await;
            client.write_all(sent).await.unwrap();
            assert_eq!(conn.sniff_h2().await.unwrap(), h2);
            let (_, read) = conn.into_parts();
            assert!(
                sent.starts_with(&read),
                "bytes read are kept for who serves them"
            );
        }
        let (mut conn, client) = pair().await;
        drop(client);
        assert!(
            conn.sniff_h2().await.is_err(),
            "closed before saying anything"
        );
    }
}
