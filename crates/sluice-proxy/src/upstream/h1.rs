//! Sluice's HTTP/1.1 client: one request and its answer on a plain TCP connection of its own or
//! a TLS connection Pingora's `TransportConnector` opened (rustls), kept afterwards in a small
//! pool per deployment.
//!
//! # Why not Pingora's `HttpSession` and pool
//! Measured on the load bench (loopback, 2 cores), Pingora's HTTP/1 client cost Sluice a
//! third of its CPU per request beyond nginx's: it flushes a request's header before its body
//! (two `sendto`, and two wake-ups of the upstream, per request), parses each answer into an
//! `http::HeaderMap` twice over, holds a 64 KiB body buffer per connection (64 MB with a
//! thousand open streams), and its pool spawns a watcher task with a mutex, a oneshot and an
//! idle timer for every connection it takes back. Here a request leaves in one vectored write,
//! an answer is read into one buffer that travels with its connection (4 KiB to start, grown
//! only for a larger declared body, its allocation reused by the next exchange), body bytes are
//! handed out as slices of that buffer without copying, and idle connections wait in a plain
//! LIFO stack, checked for a hang-up when taken and swept once a second.
//!
//! Framing follows RFC 9112 §6: no body for 1xx/204/304, `Transfer-Encoding` ending in
//! `chunked` decoded in place (sizes and trailers by `httparse`), a valid `Content-Length`
//! read exactly, anything else read to the close. A connection goes back to the pool only after
//! its answer was read to the end with nothing left over and neither side asked to close.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pingora_core::protocols::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::alarm::Alarm;
use crate::field_is;

/// Room made for each read of an answer (SSE events and JSON answers are a few hundred bytes;
/// a body of declared length gets up to [`MAX_READ_SIZE`] at a time).
const READ_SIZE: usize = 4 * 1024;
/// Largest read buffer made for one read of a body whose length is declared.
const MAX_READ_SIZE: usize = 64 * 1024;
/// Largest response header (status line and fields) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response.
const MAX_FIELDS: usize = 128;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// What went wrong in an exchange.
#[derive(Debug)]
pub enum H1Error {
    /// The connection failed (reset, closed early, write refused).
    Io(std::io::Error),
    /// The peer closed the connection before a byte of the answer arrived: on a pooled
    /// connection, the peer's idle close racing our request.
    ClosedBeforeAnswer,
    /// The peer spoke something that is not HTTP/1.1 as we accept it.
    Malformed(&'static str),
    /// No answer head by the exchange's deadline.
    TimedOut,
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::ClosedBeforeAnswer => f.write_str("connection closed before the answer"),
            Self::Malformed(why) => f.write_str(why),
            Self::TimedOut => f.write_str("no answer by the deadline"),
        }
    }
}

impl From<std::io::Error> for H1Error {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl H1Error {
    /// Whether a request that met this error on a pooled connection may be sent again on a
    /// fresh one: the peer had closed the connection (or refused the write) before answering.
    pub fn stale(&self) -> bool {
        match self {
            Self::ClosedBeforeAnswer => true,
            Self::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            ),
            Self::Malformed(_) | Self::TimedOut => false,
        }
    }
}

/// The transport under an upstream connection: a plain TCP socket (`Left`, `TCP_NODELAY` set)
/// or a connection Pingora's connector opened (`Right`, TLS).
///
/// Plain HTTP runs on the tokio socket itself. Pingora's stream would wrap it in a buffered
/// stream behind a `dyn` call per read and write, and time every read that waits (two clock
/// reads, each ~26 ns on this VM, per wait); callgrind put its layers at ~1.3k instructions a
/// request. TLS keeps Pingora's stream, whose handshake and session live in it.
pub type Io = tokio_util::either::Either<tokio::net::TcpStream, Stream>;

/// An open connection to an upstream and its read buffer.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    /// The timer bounding this connection's waits (the answer's head, each read of its body),
    /// kept from one exchange to the next (see `crate::alarm`).
    alarm: Alarm,
}

impl Conn {
    /// Wraps a fresh connection.
    pub fn new(io: Io) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            alarm: Alarm::default(),
        }
    }

    /// Sends a request (its head, already serialized, and its body) in one write, then reads
    /// the answer's head, both by `deadline`. The body is read afterwards through the returned
    /// [`Answer`].
    ///
    /// # Errors
    /// [`H1Error::TimedOut`] past `deadline`; [`H1Error`] on a failed write or read, or a
    /// malformed answer.
    pub async fn exchange(
        mut self,
        head: &[u8],
        body: impl Buf,
        deadline: Instant,
    ) -> Result<Answer, H1Error> {
        // The alarm is taken out for the wait (a pointer moved), which borrows the rest.
        let mut alarm = std::mem::take(&mut self.alarm);
        let answered = alarm.until(deadline, self.send(head, body)).await;
        self.alarm = alarm;
        let (head, framing, keep) = answered.ok_or(H1Error::TimedOut)??;
        Ok(Answer {
            conn: self,
            head,
            framing,
            reusable: keep,
            done: matches!(framing, Framing::Empty),
        })
    }

    /// [`Conn::exchange`] but for the deadline: the write, and the answer's head read.
    async fn send(
        &mut self,
        head: &[u8],
        body: impl Buf,
    ) -> Result<(Head, Framing, bool), H1Error> {
        self.io.write_all_buf(&mut Buf::chain(head, body)).await?;
        self.io.flush().await?;
        // The buffer is empty here: a connection is pooled only with nothing left over.
        let mut any = false;
        loop {
            if !self.buf.is_empty() {
                any = true;
                if let Some(answered) = parse_head(&mut self.buf)? {
                    return Ok(answered);
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(H1Error::Malformed("response header too large"));
                }
            }
            if self.fill(READ_SIZE).await? == 0 {
                return Err(if any {
                    H1Error::Malformed("connection closed inside the response header")
                } else {
                    H1Error::ClosedBeforeAnswer
                });
            }
        }
    }

    /// Reads more bytes into the buffer, making room for at least `want` (the allocation is
    /// reclaimed in place when every slice handed out from it has been dropped).
    async fn fill(&mut self, want: usize) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < want / 2 {
            self.buf.reserve(want);
        }
        self.io.read_buf(&mut self.buf).await
    }

    /// Whether the peer has left an idle connection alone: no hang-up, no stray bytes. One
    /// non-blocking poll; no syscall unless the socket was flagged readable.
    fn idle_and_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// No body (1xx, 204, 304, or a declared length of 0).
    Empty,
    /// `Content-Length`: this many bytes are still to come.
    Length(u64),
    /// Chunked transfer coding, at this point of it.
    Chunked(Chunk),
    /// Until the connection closes.
    UntilClose,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, with this much to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting trailer fields and the final empty line.
    Trailer,
}

/// A response head read; its body is read with [`Answer::read`].
pub struct Answer {
    conn: Conn,
    head: Head,
    framing: Framing,
    reusable: bool,
    done: bool,
}

impl Answer {
    /// The status and header fields.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Whether the body has been read to its end.
    pub fn done(&self) -> bool {
        self.done
    }

    /// [`Answer::read`], unless `idle` passes first (`None`); the clock is read, and the
    /// connection's timer set, only when the read has to wait.
    pub async fn read_within(&mut self, idle: Duration) -> Option<Result<Option<Bytes>, H1Error>> {
        let mut alarm = std::mem::take(&mut self.conn.alarm);
        let read = alarm.within(idle, self.read()).await;
        self.conn.alarm = alarm;
        read
    }

    /// The next piece of the body (a slice of the connection's buffer, not a copy), or `None`
    /// at its end.
    ///
    /// # Errors
    /// [`H1Error`] when the connection breaks or the framing is malformed.
    pub async fn read(&mut self) -> Result<Option<Bytes>, H1Error> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(piece) = self.decode()? {
                return Ok(Some(piece));
            }
            if self.done {
                return Ok(None);
            }
            let want = match self.framing {
                Framing::Length(left) => {
                    usize::try_from(left).map_or(MAX_READ_SIZE, |l| l.clamp(1, MAX_READ_SIZE))
                }
                _ => READ_SIZE,
            };
            if self.conn.fill(want).await? == 0 {
                if matches!(self.framing, Framing::UntilClose) {
                    self.done = true;
                    self.reusable = false;
                    return Ok(None);
                }
                return Err(H1Error::Malformed("connection closed inside the body"));
            }
        }
    }

    /// Takes the body bytes the buffer holds, if any; marks the end when it is reached.
    fn decode(&mut self) -> Result<Option<Bytes>, H1Error> {
        let buf = &mut self.conn.buf;
        let piece = match &mut self.framing {
            Framing::Empty => {
                self.done = true;
                None
            }
            Framing::UntilClose => (!buf.is_empty()).then(|| buf.split().freeze()),
            Framing::Length(left) => {
                if buf.is_empty() {
                    None
                } else {
                    let take = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
                    *left -= take as u64;
                    let piece = buf.split_to(take).freeze();
                    if *left == 0 {
                        self.done = true;
                    }
                    Some(piece)
                }
            }
            Framing::Chunked(state) => {
                let (piece, end) = decode_chunked(state, buf)?;
                self.done = end;
                piece
            }
        };
        if self.done && !self.conn.buf.is_empty() {
            self.reusable = false; // bytes past the end of the answer: the stream is off
        }
        Ok(piece)
    }

    /// The response head, and the connection when it may carry another request: the answer
    /// was read to its end and nobody asked to close it.
    pub fn finish(self) -> (Head, Option<Conn>) {
        let conn = (self.done && self.reusable).then_some(self.conn);
        (self.head, conn)
    }
}

/// Decodes the chunked body bytes `buf` holds, in place: chunk data is moved over the framing
/// around it, and the data decoded so far is split off the front. Returns it (when any) and
/// whether the body ended.
fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<(Option<Bytes>, bool), H1Error> {
    let mut read = 0; // framing and data consumed
    let mut write = 0; // decoded data, moved to the front
    let mut end = false;
    loop {
        let rest = &buf[read..];
        match *state {
            Chunk::Size => match httparse::parse_chunk_size(rest) {
                Ok(httparse::Status::Complete((used, 0))) => {
                    read += used;
                    *state = Chunk::Trailer;
                }
                Ok(httparse::Status::Complete((used, size))) => {
                    read += used;
                    *state = Chunk::Data(size);
                }
                Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_LINE => {
                    return Err(H1Error::Malformed("chunk size line too long"));
                }
                Ok(httparse::Status::Partial) => break,
                Err(_) => return Err(H1Error::Malformed("invalid chunk size")),
            },
            Chunk::Data(left) => {
                let take = usize::try_from(left).map_or(rest.len(), |l| l.min(rest.len()));
                if take == 0 {
                    break;
                }
                buf.copy_within(read..read + take, write);
                read += take;
                write += take;
                *state = match left - take as u64 {
                    0 => Chunk::DataEnd,
                    more => Chunk::Data(more),
                };
            }
            Chunk::DataEnd => {
                if rest.len() < 2 {
                    break;
                }
                if &rest[..2] != b"\r\n" {
                    return Err(H1Error::Malformed("chunk data longer than its size"));
                }
                read += 2;
                *state = Chunk::Size;
            }
            Chunk::Trailer => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
                match httparse::parse_headers(rest, &mut fields) {
                    Ok(httparse::Status::Complete((used, _))) => {
                        read += used;
                        end = true;
                        break;
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_HEAD => {
                        return Err(H1Error::Malformed("trailer too large"));
                    }
                    Ok(httparse::Status::Partial) => break,
                    Err(_) => return Err(H1Error::Malformed("invalid trailer")),
                }
            }
        }
    }
    let mut front = buf.split_to(read);
    front.truncate(write);
    Ok(((write > 0).then(|| front.freeze()), end))
}

/// An upstream's response head as it arrived: the status, and each field as where its name
/// and value lie in the head's bytes.
///
/// No header map: an answer's fields are relayed one by one and looked up a handful of times
/// (`content-type`, `content-length`, `x-request-id`, `retry-after`), which a scan of a dozen
/// fields does for less than building a map costs (every name hashed in, an allocation for each
/// name outside `http`'s standard set, the map's own two, and dropping it all again): callgrind
/// put that at ~2.5k of a request's ~48k instructions. Pingora's side, which needs a map, gets
/// one from [`Head::to_header_map`].
#[derive(Debug, Clone)]
pub struct Head {
    status: StatusCode,
    bytes: Bytes,
    /// Each field's name and value, as ranges of `bytes`, in the order received. httparse
    /// checked them: names are tokens and values visible ASCII, spaces, tabs or obs-text,
    /// exactly what `http`'s `HeaderName` and `HeaderValue` accept.
    fields: Vec<(Range<usize>, Range<usize>)>,
}

impl Head {
    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The first value of the field `name` (ASCII case ignored).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields()
            .find(|(n, _)| field_is(n, name))
            .map(|(_, v)| v)
    }

    /// Each field's name (as sent) and value, in the order received.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(n, v)| (&self.bytes[n.clone()], &self.bytes[v.clone()]))
    }

    /// The fields `keep` accepts (given each name), as a header map: names lowercased, values
    /// slices of the head's bytes (no copies).
    pub fn to_header_map(&self, keep: impl Fn(&[u8]) -> bool) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.len());
        for (name, value) in &self.fields {
            let name = &self.bytes[name.clone()];
            if !keep(name) {
                continue;
            }
            // Both always convert: httparse accepted them (see `fields`).
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.bytes.slice(value.clone())),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// Parses a whole response head (tests build answers from wire bytes).
    #[cfg(test)]
    pub fn parse(wire: &[u8]) -> Option<Self> {
        parse_head(&mut BytesMut::from(wire))
            .ok()
            .flatten()
            .map(|(head, _, _)| head)
    }
}

/// Parses a response head at the front of `buf` (consuming it), skipping interim 1xx answers.
/// `None` while it is incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<(Head, Framing, bool)>, H1Error> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut response = httparse::Response::new(&mut fields);
        let used = match httparse::ParserConfig::default()
            .allow_spaces_after_header_name_in_responses(true)
            .parse_response(&mut response, buf)
        {
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(H1Error::Malformed("invalid response header")),
        };
        let status = response.code.ok_or(H1Error::Malformed("no status code"))?;
        if (100..200).contains(&status) && status != 101 {
            buf.advance(used); // 100 Continue and friends: the real answer follows
            continue;
        }
        let status =
            StatusCode::from_u16(status).map_err(|_| H1Error::Malformed("invalid status code"))?;
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut close = response.version != Some(1);
        // Where each field's name and value lie in the head. httparse hands out sub-slices of
        // `buf`, so the offsets are exact.
        let base = buf.as_ptr() as usize;
        let at = |part: &[u8]| {
            let start = part.as_ptr() as usize - base;
            start..start + part.len()
        };
        let mut spans = Vec::with_capacity(response.headers.len());
        for field in response.headers.iter() {
            let name = field.name;
            if field_is(name.as_bytes(), "content-length") {
                let n = std::str::from_utf8(field.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(H1Error::Malformed("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::Malformed("conflicting content-length"));
                }
                length = Some(n);
            } else if field_is(name.as_bytes(), "transfer-encoding") {
                // Only the last coding counts: `chunked` must be it for the body to be chunked.
                let last = field
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if field_is(name.as_bytes(), "connection") {
                close |= field
                    .value
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
            spans.push((at(name.as_bytes()), at(field.value)));
        }
        let head = Head {
            status,
            bytes: buf.split_to(used).freeze(),
            fields: spans,
        };
        let code = status.as_u16();
        let framing = if code == 204 || code == 304 || (100..200).contains(&code) {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(true), _) => Framing::Chunked(Chunk::Size),
                (Some(false), _) => Framing::UntilClose,
                (None, Some(0)) => Framing::Empty,
                (None, Some(n)) => Framing::Length(n),
                (None, None) => Framing::UntilClose,
            }
        };
        // Both framings declared is a smuggling pattern: read by the coding, then close. After
        // a 101 the connection speaks another protocol: never pooled.
        close |= chunked.is_some() && length.is_some();
        close |= code == 101;
        close |= matches!(framing, Framing::UntilClose);
        return Ok(Some((head, framing, !close)));
    }
}

/// One shard's idle connections, each with when it was put back, oldest first.
type Idle = Vec<(Conn, Instant)>;

/// How many shards a per-worker [`Pool`] has: threads map onto them round robin, so up to
/// this many workers each have one of their own (more share, which is correct, just less local).
pub const POOL_SHARDS: usize = 64;

thread_local! {
    /// This thread's pool shard, assigned on its first use of any pool.
    static SHARD: usize = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % POOL_SHARDS
    };
}

/// Idle connections to one upstream, most recently used on top, in a shard per worker thread
/// (or in one shard: see [`Pool::new`]).
///
/// Sluice runs one single-threaded runtime per worker (crate docs, "One runtime per worker"),
/// and a socket reports readiness to the runtime that opened it. A connection taken by another
/// worker would have every wake-up cross threads (an `eventfd` write per event), so each worker
/// takes back what it put: its own shard, no lock contention, no cross-thread wake-ups.
pub struct Pool {
    shards: Box<[Mutex<Idle>]>,
    keep: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool of `shards` shards ([`POOL_SHARDS`] for one per worker thread; 1 under a
    /// work-stealing runtime, where a task has no thread of its own and a connection put back
    /// on one thread would be missed by the next request, run on another), keeping at most
    /// `keep` idle connections per shard, each for at most `idle_timeout`.
    pub fn new(keep: usize, idle_timeout: Duration, shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            keep,
            idle_timeout,
        }
    }

    /// The most recently used idle connection of this thread's shard that is still open, at
    /// `now` (the caller's clock read: the request's send).
    pub fn take(&self, now: Instant) -> Option<Conn> {
        let shard = self.mine();
        loop {
            let (mut conn, since) = crate::lock(shard).pop()?;
            if now.duration_since(since) > self.idle_timeout {
                // Everything under it is older still.
                crate::lock(shard).clear();
                return None;
            }
            if conn.idle_and_open() {
                return Some(conn);
            }
        }
    }

    /// Keeps a connection for this thread's next request (dropping it, which closes it, when
    /// the shard is full); it idles from `now` (the caller's clock read: the answer's end).
    pub fn put(&self, conn: Conn, now: Instant) {
        let mut idle = crate::lock(self.mine());
        if idle.len() < self.keep {
            idle.push((conn, now));
        }
    }

    /// Closes idle connections that timed out or that the peer closed.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            crate::lock(shard).retain_mut(|(conn, since)| {
                now.duration_since(*since) <= self.idle_timeout && conn.idle_and_open()
            });
        }
    }

    fn mine(&self) -> &Mutex<Idle> {
        let i = SHARD.with(|s| *s);
        &self.shards[i % self.shards.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(input: &[&[u8]]) -> Result<(Vec<u8>, bool), H1Error> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut end = false;
        for part in input {
            buf.extend_from_slice(part);
            let (piece, e) = decode_chunked(&mut state, &mut buf)?;
            if let Some(p) = piece {
                out.extend_from_slice(&p);
            }
            end = e;
        }
        Ok((out, end))
    }

    #[test]
    fn a_worker_takes_back_what_it_put_and_no_other_worker_does() {
        // The test thread is one worker with its runtime (as Sluice's are); the connection is
        // registered there and must not be handed to another thread.
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let here = runtime();
        let client = here.block_on(tokio::net::TcpStream::connect(addr)).unwrap();
        let (_server_side, _) = listener.accept().unwrap(); // kept open: the connection is idle
        let pool = std::sync::Arc::new(Pool::new(8, Duration::from_secs(60), POOL_SHARDS));
        pool.put(Conn::new(Io::Left(client)), Instant::now());
        let elsewhere = std::thread::spawn({
            let pool = pool.clone();
            move || {
                let _runtime = runtime();
                pool.take(Instant::now()).is_some()
            }
        })
        .join()
        .unwrap();
        assert!(!elsewhere, "another worker took this worker's connection");
        let _in_here = here.enter();
        assert!(
            pool.take(Instant::now()).is_some(),
            "the worker that put it back gets it"
        );
        assert!(pool.take(Instant::now()).is_none(), "and only once");
    }

    #[test]
    fn with_one_shard_any_thread_takes_what_another_put() {
        // A work-stealing runtime: the task that put the connection back may run its next
        // request on another thread, which must find it.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = runtime
            .block_on(tokio::net::TcpStream::connect(addr))
            .unwrap();
        let (_server_side, _) = listener.accept().unwrap(); // kept open: the connection is idle
        let pool = std::sync::Arc::new(Pool::new(8, Duration::from_secs(60), 1));
        {
            let _in_runtime = runtime.enter();
            pool.put(Conn::new(Io::Left(client)), Instant::now());
        }
        let elsewhere = std::thread::spawn({
            let pool = pool.clone();
            let handle = runtime.handle().clone();
            move || {
                let _in_runtime = handle.enter();
                pool.take(Instant::now()).is_some()
            }
        })
        .join()
        .unwrap();
        assert!(elsewhere, "another thread finds the idle connection");
        assert!(
            pool.take(Instant::now()).is_none(),
            "and takes it only once"
        );
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() -> Result<(), H1Error> {
        let wire: &[u8] = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for cut in 0..wire.len() {
            let (body, end) = chunked(&[&wire[..cut], &wire[cut..]])?;
            assert_eq!(body, b"hello, world", "split at {cut}");
            assert!(end, "split at {cut}");
        }
        let (body, end) = chunked(&[b"5\r\nhel"])?;
        assert_eq!(body, b"hel");
        assert!(!end);
        Ok(())
    }

    #[test]
    fn malformed_chunks_are_errors() {
        assert!(chunked(&[b"zz\r\nhello\r\n"]).is_err());
        assert!(chunked(&[b"2\r\nhello\r\n"]).is_err());
        assert!(chunked(&[&[b'1'; MAX_CHUNK_LINE + 2]]).is_err());
    }

    fn head(wire: &[u8]) -> Result<Option<(Head, Framing, bool)>, H1Error> {
        parse_head(&mut BytesMut::from(wire))
    }

    #[test]
    fn a_head_is_read_in_place() {
        let head = Head::parse(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nset-cookie: a=1\r\n\
              X-Request-Id: up-1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(head.get("retry-after"), Some(&b"7"[..]));
        assert_eq!(head.get("x-request-id"), Some(&b"up-1"[..]));
        assert_eq!(
            head.get("set-cookie"),
            Some(&b"a=1"[..]),
            "the first of two"
        );
        assert_eq!(head.get("x-missing"), None);
        let names: Vec<&[u8]> = head.fields().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                &b"Retry-After"[..],
                b"set-cookie",
                b"X-Request-Id",
                b"Set-Cookie",
                b"Content-Length"
            ],
            "as received, in order"
        );
        let map = head.to_header_map(|n| !n.eq_ignore_ascii_case(b"content-length"));
        assert_eq!(map.len(), 4);
        assert!(!map.contains_key("content-length"));
        let cookies: Vec<&[u8]> = map
            .get_all("set-cookie")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(cookies, [&b"a=1"[..], b"b=2"]);
        // The map's values are the head's own bytes, not copies.
        let within = head.bytes.as_ptr_range();
        assert!(map
            .values()
            .all(|v| within.contains(&v.as_bytes().as_ptr())));
    }

    #[test]
    fn framing_follows_rfc_9112() -> Result<(), H1Error> {
        let cases: &[(&[u8], &str, bool)] = &[
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n",
                "Length(12)",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                "Empty",
                true,
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", "Empty", true),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                "Chunked(Size)",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                "UntilClose",
                false,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", "UntilClose", false),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n",
                "Length(3)",
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n",
                "Length(3)",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
                "Chunked(Size)",
                false,
            ),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n",
                "Length(1)",
                true,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
                "Empty",
                false,
            ),
        ];
        for (wire, framing, keep) in cases {
            let (header, f, k) = head(wire)?.ok_or(H1Error::Malformed("partial"))?;
            assert_eq!(
                format!("{f:?}"),
                *framing,
                "{}",
                String::from_utf8_lossy(wire)
            );
            assert_eq!(k, *keep, "{}", String::from_utf8_lossy(wire));
            assert_ne!(header.status().as_u16(), 100, "interim answers are skipped");
        }
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n")?.is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3x\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        Ok(())
    }
}
