//! Parsing a client's request body once, and shaping it per deployment.

use std::fmt;
use std::ops::Range;

use bytes::{Buf, Bytes};
use smallvec::SmallVec;

use crate::filter::{Policy, Verdict};
use crate::walk;

/// Largest `max_tokens` accepted. No model has a context anywhere near this; a larger value
/// is a client bug, and letting it through would make the token reservation meaningless.
pub const MAX_TOKENS_CEILING: u64 = 100_000_000;

/// Deepest nesting of arrays and objects accepted (the outer object counted): serde_json's own
/// recursion limit, so no body a provider's parser would refuse for its depth is forwarded.
pub const MAX_DEPTH: usize = 128;

/// The OpenAI endpoints Sluice serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl Endpoint {
    /// How many endpoints there are.
    pub const COUNT: usize = 3;

    /// Every endpoint, in [`Endpoint::index`] order.
    pub const ALL: [Self; Self::COUNT] =
        [Self::ChatCompletions, Self::Completions, Self::Embeddings];

    /// A dense index, below [`Endpoint::COUNT`], for per-endpoint tables.
    pub fn index(self) -> usize {
        match self {
            Self::ChatCompletions => 0,
            Self::Completions => 1,
            Self::Embeddings => 2,
        }
    }

    /// Matches a request path, with or without the `/v1` prefix (OpenAI clients configured
    /// with a bare base URL send the latter).
    pub fn from_path(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        Some(match rest.trim_end_matches('/') {
            "/chat/completions" => Self::ChatCompletions,
            "/completions" => Self::Completions,
            "/embeddings" => Self::Embeddings,
            _ => return None,
        })
    }

    /// The path below an `api_base` (`/chat/completions`).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    /// A short name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// The field carrying the prompt, which must be present.
    fn prompt_field(self) -> &'static str {
        match self {
            Self::ChatCompletions => "messages",
            Self::Completions => "prompt",
            Self::Embeddings => "input",
        }
    }
}

/// Why a body is not a usable request. Each maps to a 400 in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No bytes at all.
    #[error("the request body is empty; send a JSON object")]
    Empty,
    /// Not UTF-8.
    #[error("the request body is not valid UTF-8")]
    NotUtf8,
    /// Not JSON, or not an object.
    #[error("the request body is not a valid JSON object: {0}")]
    Json(String),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("the request body is nested more than {MAX_DEPTH} levels deep")]
    TooDeep,
    /// A number too large for a 64-bit float (`1e999`): no provider can read it.
    #[error("the request body has a number out of range: {0}")]
    NumberOutOfRange(String),
    /// A field in no allow-list, with `unknown_fields: reject`.
    #[error("Unrecognized request argument supplied: {0}")]
    UnknownField(String),
    /// The same top-level key twice: which one a provider honours is anyone's guess.
    #[error("the request body has the key `{0}` more than once")]
    DuplicateKey(String),
    /// A required field is absent.
    #[error("you must provide a `{0}` parameter")]
    Missing(&'static str),
    /// A field has the wrong type or an impossible value.
    #[error("invalid value for `{field}`: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl ParseError {
    /// The request parameter at fault, for the error body's `param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Missing(f) | Self::Invalid { field: f, .. } => Some(f),
            Self::DuplicateKey(k) | Self::UnknownField(k) => Some(k),
            _ => None,
        }
    }
}

/// A top-level field: its key and where its value's bytes are in the body.
#[derive(Debug, Clone)]
struct Field {
    key: Key,
    value: Range<usize>,
}

/// A top-level key. Nearly every key is written without escapes, so it is kept as where it
/// lies in the body (no allocation, and copied out verbatim when the body is shaped); a key
/// with escapes is kept decoded.
#[derive(Debug, Clone)]
enum Key {
    /// The key's text between its quotes, in the body; no escapes in it.
    Plain(Range<usize>),
    /// The key's text, decoded from a key with escapes.
    Decoded(String),
}

impl Field {
    /// The key's text, from the body as text (as [`Request::parse`] has it): no check.
    fn key_in<'a>(&'a self, text: &'a str) -> &'a str {
        match &self.key {
            // The range lies between two quotes, so on char boundaries: this cannot fail; an
            // empty key would be the harmless fallback.
            Key::Plain(at) => text.get(at.clone()).unwrap_or_default(),
            Key::Decoded(key) => key,
        }
    }

    /// The key's text, from the body as bytes (`parse` checked they are UTF-8, so this cannot
    /// fail). Checking the key alone (a few bytes) costs less than the body again, which for a
    /// long prompt is thousands of instructions.
    fn key<'a>(&'a self, body: &'a [u8]) -> &'a str {
        match &self.key {
            Key::Plain(at) => body
                .get(at.clone())
                .and_then(|k| std::str::from_utf8(k).ok())
                .unwrap_or_default(),
            Key::Decoded(key) => key,
        }
    }
}

/// A parsed request: the body as received, its top-level fields, and what admission needs.
///
/// `Debug` leaves the body out: request bodies never belong in logs.
#[derive(Clone)]
pub struct Request {
    endpoint: Endpoint,
    body: Bytes,
    fields: Vec<Field>,
    model: String,
    stream: bool,
    max_tokens: Option<u64>,
    prompt_bytes: usize,
    /// The client set `stream_options.include_usage: true`.
    client_wants_usage: bool,
}

/// A body shaped for one deployment.
#[derive(Debug, Clone)]
pub struct Shaped {
    /// The bytes to send.
    pub body: Body,
    /// Sluice added `stream_options.include_usage` on its own account: the usage chunk must
    /// not reach the client.
    pub injected_usage: bool,
    /// Fields left out, with why (labels are bounded: see [`crate::filter::field_label`]).
    pub dropped: Vec<Dropped>,
}

/// A shaped body, in pieces: Sluice's own bytes (`{"model":` and the upstream's model name,
/// separators, a `stream_options` it adds) and runs of the client's body, which are slices of
/// it and not copies. The prompt is never copied on its way upstream: the upstream write hands
/// the pieces to one vectored write ([`Body::buf`]). Fields kept side by side in the client's
/// body are one run (the separators between them come along), so a typical body is three
/// pieces: `{"model":"…",`, the client's fields from `messages` on, and `}`.
#[derive(Clone, Default)]
pub struct Body {
    own: Bytes,
    client: Bytes,
    pieces: SmallVec<[Piece; 6]>,
    len: usize,
}

/// Where a piece of a [`Body`] lies: in Sluice's own bytes or in the client's body.
#[derive(Debug, Clone, Copy)]
struct Piece {
    client: bool,
    start: usize,
    end: usize,
}

impl Body {
    /// The body's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the body has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|p| self.piece(p))
    }

    fn piece(&self, p: &Piece) -> &[u8] {
        let from = if p.client { &self.client } else { &self.own };
        from.get(p.start..p.end).unwrap_or_default()
    }

    /// The body in one buffer (a copy: for tests, and for a caller that needs one slice).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.len);
        for piece in self.pieces() {
            out.extend_from_slice(piece);
        }
        Bytes::from(out)
    }

    /// The body as a [`Buf`] to write: its pieces as they are, several to a vectored write.
    pub fn buf(&self) -> BodyBuf<'_> {
        BodyBuf {
            body: self,
            next: 0,
            at: 0,
            left: self.len,
        }
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes are the client's prompt: never in logs.
        f.debug_struct("Body")
            .field("len", &self.len)
            .field("pieces", &self.pieces.len())
            .finish_non_exhaustive()
    }
}

/// A [`Body`] being written: a [`Buf`] over its pieces.
#[derive(Debug)]
pub struct BodyBuf<'a> {
    body: &'a Body,
    /// The piece being written.
    next: usize,
    /// Bytes of it already written.
    at: usize,
    left: usize,
}

impl BodyBuf<'_> {
    fn current(&self, index: usize) -> &[u8] {
        self.body
            .pieces
            .get(index)
            .map_or(&[][..], |p| self.body.piece(p))
    }
}

impl Buf for BodyBuf<'_> {
    fn remaining(&self) -> usize {
        self.left
    }

    fn chunk(&self) -> &[u8] {
        self.current(self.next).get(self.at..).unwrap_or_default()
    }

    fn advance(&mut self, mut cnt: usize) {
        cnt = cnt.min(self.left);
        self.left -= cnt;
        while self.next < self.body.pieces.len() {
            let rest = self.current(self.next).len() - self.at.min(self.current(self.next).len());
            if cnt < rest {
                self.at += cnt;
                return;
            }
            cnt -= rest;
            self.next += 1;
            self.at = 0;
        }
    }

    fn chunks_vectored<'b>(&'b self, dst: &mut [std::io::IoSlice<'b>]) -> usize {
        let mut filled = 0;
        let mut at = self.at;
        for index in self.next..self.body.pieces.len() {
            let Some(slot) = dst.get_mut(filled) else {
                break;
            };
            let piece = self.current(index).get(at..).unwrap_or_default();
            at = 0;
            if !piece.is_empty() {
                *slot = std::io::IoSlice::new(piece);
                filled += 1;
            }
        }
        filled
    }
}

/// Builds a [`Body`]: own bytes appended to one buffer, client runs as ranges; a piece that
/// continues the last one (own after own, or a client run that picks up where the last
/// ended) extends it.
struct BodyBuilder {
    own: Vec<u8>,
    pieces: SmallVec<[Piece; 6]>,
}

impl BodyBuilder {
    fn new(own_capacity: usize) -> Self {
        Self {
            own: Vec::with_capacity(own_capacity),
            pieces: SmallVec::new(),
        }
    }

    /// Appends own bytes, written by `write` into the own buffer.
    fn own(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.own.len();
        write(&mut self.own);
        self.extend(false, start, self.own.len());
    }

    /// Appends the client's body bytes at `range`.
    fn client(&mut self, range: Range<usize>) {
        self.extend(true, range.start, range.end);
    }

    /// Whether the last piece is a run of the client's body ending at `end`.
    fn client_run_ends_at(&self, end: usize) -> bool {
        self.pieces.last().is_some_and(|p| p.client && p.end == end)
    }

    fn extend(&mut self, client: bool, start: usize, end: usize) {
        match self.pieces.last_mut() {
            Some(last) if last.client == client && last.end == start => last.end = end,
            _ if start == end => {}
            _ => self.pieces.push(Piece { client, start, end }),
        }
    }

    fn finish(self, client: &Bytes) -> Body {
        let len = self.pieces.iter().map(|p| p.end - p.start).sum();
        Body {
            own: Bytes::from(self.own),
            client: client.clone(),
            pieces: self.pieces,
            len,
        }
    }
}

/// One field the filter left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// The field's metric label (its name if known, else `other`).
    pub label: &'static str,
    /// Why.
    pub reason: crate::DropReason,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .field("stream", &self.stream)
            .field("max_tokens", &self.max_tokens)
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Request {
    /// Parses `body` for `endpoint`: checks it is a JSON object, reads `model`, `stream`,
    /// `max_tokens`/`max_completion_tokens` and the prompt's size, and records where every
    /// top-level value lies so it can be copied without being re-encoded.
    ///
    /// # Errors
    /// A [`ParseError`] saying what is wrong, for a 400.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, ParseError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ParseError::Empty);
        }
        // simdutf8: the check runs over the whole body (the prompt), ~10x faster than std's.
        let text = simdutf8::basic::from_utf8(&body).map_err(|_| ParseError::NotUtf8)?;
        let fields = top_level_fields(text)?;
        let mut model = None;
        let mut stream = false;
        let mut max_tokens = None;
        let mut prompt_bytes = None;
        let mut client_wants_usage = false;
        for field in &fields {
            let json = text.get(field.value.clone()).unwrap_or_default();
            match field.key_in(text) {
                "model" => {
                    let m: String =
                        serde_json::from_str(json).map_err(|_| ParseError::Invalid {
                            field: "model",
                            why: "expected a string",
                        })?;
                    if m.is_empty() {
                        return Err(ParseError::Missing("model"));
                    }
                    model = Some(m);
                }
                "stream" => {
                    stream = serde_json::from_str::<Option<bool>>(json)
                        .map_err(|_| ParseError::Invalid {
                            field: "stream",
                            why: "expected true or false",
                        })?
                        .unwrap_or(false);
                }
                "max_tokens" => max_tokens = max_tokens.or(token_count(json, "max_tokens")?),
                "max_completion_tokens" => {
                    // The newer name wins when both are sent, as OpenAI documents.
                    max_tokens = token_count(json, "max_completion_tokens")?.or(max_tokens);
                }
                "stream_options" => {
                    client_wants_usage = include_usage(json)?;
                }
                k if k == endpoint.prompt_field() => {
                    prompt_bytes = Some(check_prompt(endpoint, json)?);
                }
                _ => {}
            }
        }
        let model = model.ok_or(ParseError::Missing("model"))?;
        let prompt_bytes = prompt_bytes.ok_or(ParseError::Missing(endpoint.prompt_field()))?;
        Ok(Self {
            endpoint,
            body,
            fields,
            model,
            stream,
            max_tokens,
            prompt_bytes,
            client_wants_usage,
        })
    }

    /// The endpoint this request is for.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The model group asked for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether the client asked for a stream.
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// `max_completion_tokens`, else `max_tokens`, if sent.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// Estimated prompt tokens: the prompt's JSON size ÷ 4 (OpenAI's rule of thumb of about
    /// four characters per token for English text), at least 1. An estimate for the
    /// reservation only; the response's `usage` settles the real count.
    pub fn prompt_tokens_estimate(&self) -> u64 {
        (self.prompt_bytes as u64).div_ceil(4).max(1)
    }

    /// The body as received.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The top-level keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.key(&self.body))
    }

    /// Whether the client asked for a final usage chunk in its stream.
    pub fn client_wants_usage(&self) -> bool {
        self.client_wants_usage
    }

    /// The body to send upstream for a deployment: the fields `policy` allows, in their
    /// order, as the client wrote them (slices of its body: see [`Body`]), with `model` set to
    /// `upstream_model` (and written first). A stream also asks for
    /// `stream_options.include_usage`, so the response can settle the token count.
    ///
    /// # Errors
    /// [`ParseError::UnknownField`] when `policy` rejects unknown fields and one is present.
    pub fn shape(&self, upstream_model: &str, policy: &impl Policy) -> Result<Shaped, ParseError> {
        let options_allowed = policy.verdict(self.endpoint, "stream_options") == Verdict::Keep;
        let inject = self.stream
            && self.endpoint != Endpoint::Embeddings
            && !self.client_wants_usage
            && options_allowed;
        let mut out = BodyBuilder::new(upstream_model.len() + 48);
        out.own(|o| {
            o.extend_from_slice(b"{\"model\":");
            write_json_string(o, upstream_model);
        });
        let mut wrote_options = false;
        let mut dropped = Vec::new();
        for (i, f) in self.fields.iter().enumerate() {
            let key = f.key(&self.body);
            if key == "model" {
                continue;
            }
            match policy.verdict(self.endpoint, key) {
                Verdict::Keep => {}
                Verdict::Drop(reason) => {
                    dropped.push(Dropped {
                        label: policy.label(key),
                        reason,
                    });
                    continue;
                }
                Verdict::Reject => return Err(ParseError::UnknownField(key.to_owned())),
            }
            let merge_usage = inject && key == "stream_options";
            if let (Key::Plain(at), false) = (&f.key, merge_usage) {
                // `"key": value` as it came (the key's quotes enclose its range; no escapes in
                // it, and `parse` validated the body), continuing the last piece when that
                // ends with the value of the field before this one in the client's body (the
                // separator between them comes along).
                let before = i.checked_sub(1).and_then(|b| self.fields.get(b));
                let start = match before {
                    Some(b) if out.client_run_ends_at(b.value.end) => b.value.end,
                    _ => {
                        out.own(|o| o.push(b','));
                        at.start.saturating_sub(1)
                    }
                };
                out.client(start..f.value.end);
                continue;
            }
            out.own(|o| {
                o.push(b',');
                write_json_string(o, key);
                o.push(b':');
            });
            if merge_usage {
                out.own(|o| write_with_usage(o, &self.body[f.value.clone()]));
                wrote_options = true;
            } else {
                out.client(f.value.clone());
            }
        }
        out.own(|o| {
            if inject && !wrote_options {
                o.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
            }
            o.push(b'}');
        });
        Ok(Shaped {
            body: out.finish(&self.body),
            injected_usage: inject,
            dropped,
        })
    }
}

/// `stream_options` with `include_usage: true` merged in (the object is tiny).
fn write_with_usage(out: &mut Vec<u8>, raw: &[u8]) {
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(raw).unwrap_or_default();
    map.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
    let _ = serde_json::to_writer(&mut *out, &map);
}

/// Reads `stream_options.include_usage` (absent or null counts as false).
fn include_usage(json: &str) -> Result<bool, ParseError> {
    #[derive(serde::Deserialize)]
    struct Options {
        include_usage: Option<bool>,
    }
    let bad = ParseError::Invalid {
        field: "stream_options",
        why: "expected an object with a boolean `include_usage`",
    };
    let opts: Option<Options> = serde_json::from_str(json).map_err(|_| bad)?;
    Ok(opts.and_then(|o| o.include_usage).unwrap_or(false))
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn token_count(json: &str, field: &'static str) -> Result<Option<u64>, ParseError> {
    let n: Option<u64> = serde_json::from_str(json).map_err(|_| ParseError::Invalid {
        field,
        why: "expected a non-negative integer",
    })?;
    match n {
        Some(n) if n > MAX_TOKENS_CEILING => Err(ParseError::Invalid {
            field,
            why: "larger than any model accepts",
        }),
        n => Ok(n),
    }
}

/// Checks the prompt field's JSON type and returns its size in bytes.
fn check_prompt(endpoint: Endpoint, json: &str) -> Result<usize, ParseError> {
    let first = json.as_bytes().first().copied();
    let ok = match endpoint {
        Endpoint::ChatCompletions => first == Some(b'['),
        Endpoint::Completions | Endpoint::Embeddings => matches!(first, Some(b'"' | b'[')),
    };
    if ok {
        Ok(json.len())
    } else {
        Err(ParseError::Invalid {
            field: endpoint.prompt_field(),
            why: match endpoint {
                Endpoint::ChatCompletions => "expected an array of messages",
                _ => "expected a string or an array",
            },
        })
    }
}

/// Splits a JSON object into its top-level fields (where each key and value lie in `text`),
/// validating the whole of it (every value it steps over included; see [`crate::walk`]) and
/// rejecting duplicate keys. A key with escapes is decoded here (serde_json); the rest are
/// ranges of the body.
fn top_level_fields(text: &str) -> Result<Vec<Field>, ParseError> {
    let mut out: Vec<Field> = Vec::with_capacity(16);
    walk::object_fields(text.as_bytes(), MAX_DEPTH, |raw| {
        let key = if raw.key_escaped {
            let quoted = text
                .get(raw.key.start - 1..raw.key.end + 1)
                .unwrap_or_default();
            let decoded: String = serde_json::from_str(quoted)
                .map_err(|e| ParseError::Json(format!("an object key could not be read: {e}")))?;
            Key::Decoded(decoded)
        } else {
            Key::Plain(raw.key)
        };
        let field = Field {
            key,
            value: raw.value,
        };
        let name = field.key_in(text);
        if out.iter().any(|f| f.key_in(text) == name) {
            return Err(ParseError::DuplicateKey(name.to_owned()));
        }
        out.push(field);
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::filter::FieldPolicy;

    /// A policy that keeps every field of these tests.
    fn open_policy() -> FieldPolicy {
        FieldPolicy {
            openai: true,
            extra_allowed: vec!["weird\"key".into()],
            ..FieldPolicy::default()
        }
    }

    fn parse(body: &str) -> Result<Request, ParseError> {
        Request::parse(Endpoint::ChatCompletions, Bytes::from(body.to_owned()))
    }

    #[test]
    fn brackets_inside_a_string_do_not_count_towards_the_depth() {
        let deep = format!(
            "{{\"model\":\"m\",\"messages\":[],\"x\":\"{}\\\"{}\"}}",
            "a".repeat(20),
            "[".repeat(200)
        );
        assert!(parse(&deep).is_ok());
    }

    #[test]
    fn reads_what_admission_needs() {
        let r = parse(
            r#"{"messages":[{"role":"user","content":"hello there"}],"model":"gpt-4o","stream":true,"max_tokens":50,"max_completion_tokens":70}"#,
        )
        .unwrap();
        assert_eq!(r.model(), "gpt-4o");
        assert!(r.stream());
        assert_eq!(r.max_tokens(), Some(70));
        let messages = r#"[{"role":"user","content":"hello there"}]"#;
        assert_eq!(
            r.prompt_tokens_estimate(),
            (messages.len() as u64).div_ceil(4)
        );
        assert_eq!(
            r.keys().collect::<Vec<_>>(),
            [
                "messages",
                "model",
                "stream",
                "max_tokens",
                "max_completion_tokens"
            ]
        );
    }

    #[test]
    fn shape_rewrites_model_and_copies_values_verbatim() {
        let body = r#"{ "model" : "group", "messages":[{"role":"user","content":"a\u00e9\n"}],
            "temperature": 0.70, "weird\"key": {"x": [1, 2]} }"#;
        let r = parse(body).unwrap();
        let out = r
            .shape("real-model", &open_policy())
            .unwrap()
            .body
            .to_bytes();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with(r#"{"model":"real-model","#), "{text}");
        // Raw bytes, not re-encoded: the escape, the 0.70 and the client's spacing between
        // fields it kept side by side survive as written.
        assert!(text.contains(r#""content":"a\u00e9\n""#), "{text}");
        assert!(
            text.contains(
                r#"}],
            "temperature": 0.70,"#
            ),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["weird\"key"]["x"][1], 2);
        assert_eq!(v.as_object().unwrap().len(), 4);
        // The same body through the default policy: the unknown key is dropped and counted.
        let shaped = r.shape("real-model", &FieldPolicy::default()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&shaped.body.to_bytes()).unwrap();
        assert!(v.get("weird\"key").is_none() && v["temperature"] == 0.7);
        assert_eq!(
            shaped.dropped,
            [Dropped {
                label: "other",
                reason: crate::DropReason::Unknown
            }]
        );
    }

    /// The client's fields are slices of its body, not copies; fields side by side are one
    /// run (a dropped field or a rewritten one ends it).
    #[test]
    fn a_shaped_body_is_own_bytes_and_runs_of_the_clients_body() {
        let r = parse(r#"{"model":"g","messages":[1], "temperature": 0.5,"_x":1,"n":2}"#).unwrap();
        let body = r.shape("real", &FieldPolicy::default()).unwrap().body;
        let pieces: Vec<&[u8]> = body.pieces().collect();
        assert_eq!(
            pieces,
            [
                &br#"{"model":"real","#[..],
                br#""messages":[1], "temperature": 0.5"#,
                b",",
                br#""n":2"#,
                b"}",
            ]
        );
        let client = r.body().as_ptr_range();
        assert!(client.contains(&pieces[1].as_ptr()) && client.contains(&pieces[3].as_ptr()));
        assert_eq!(body.len(), body.to_bytes().len());
    }

    /// A key is taken as written (a range of the body) exactly when it has no escapes, and
    /// read the same either way.
    #[test]
    fn a_key_is_kept_as_written_exactly_when_it_has_no_escapes() {
        for (written, decoded) in [
            ("a", "a"),
            ("temperature", "temperature"),
            (r#"a\"b"#, "a\"b"),
            (r#"\"ab"#, "\"ab"),
            (r#"ab\""#, "ab\""),
            (r#"x\"\"yy"#, "x\"\"yy"),
            (r#"\\"#, "\\"),
            (r#"\"\\"#, "\"\\"),
            (r#"q\u0041"#, "qA"),
            (r#"\u00e9t\u00e9"#, "été"),
        ] {
            for spacing in ["", " \n\t"] {
                let r = parse(&format!(
                    r#"{{"model":"a","messages":[],"{written}"{spacing}:{spacing}2}}"#
                ))
                .unwrap();
                assert_eq!(r.keys().last(), Some(decoded));
                let kept = r.fields.last().map(|f| &f.key);
                match kept {
                    Some(Key::Plain(at)) => {
                        assert!(!written.contains('\\'));
                        assert_eq!(&r.body()[at.clone()], written.as_bytes());
                    }
                    Some(Key::Decoded(_)) => assert!(written.contains('\\'), "{written}"),
                    None => panic!("no fields"),
                }
            }
        }
    }

    #[test]
    fn keys_with_escapes_are_read_and_written_decoded() {
        let r = parse(r#"{"model":"m","max_tok\u0065ns":5,"messages":[],"top_p":1}"#).unwrap();
        assert_eq!(r.max_tokens(), Some(5));
        assert_eq!(
            r.keys().collect::<Vec<_>>(),
            ["model", "max_tokens", "messages", "top_p"]
        );
        let out = r.shape("u", &open_policy()).unwrap().body.to_bytes();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"u","max_tokens":5,"messages":[],"top_p":1}"#
        );
        // Written either way, it is the same key.
        assert!(matches!(
            parse(r#"{"model":"m","messages":[],"mod\u0065l":"n"}"#),
            Err(ParseError::DuplicateKey(k)) if k == "model"
        ));
    }

    #[test]
    fn streams_ask_for_usage_unless_the_client_did() {
        let plain = parse(r#"{"model":"m","stream":true,"messages":[]}"#)
            .unwrap()
            .shape("u", &open_policy())
            .unwrap();
        assert!(plain.injected_usage);
        let v: serde_json::Value = serde_json::from_slice(&plain.body.to_bytes()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let merged = parse(r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1},"messages":[]}"#)
            .unwrap()
            .shape("u", &open_policy())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged.body.to_bytes()).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert_eq!(
            v.as_object().unwrap().len(),
            4,
            "no duplicate stream_options"
        );
        let asked = parse(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        )
        .unwrap();
        assert!(
            asked.client_wants_usage() && !asked.shape("u", &open_policy()).unwrap().injected_usage
        );
        let not_stream = parse(r#"{"model":"m","messages":[]}"#)
            .unwrap()
            .shape("u", &open_policy())
            .unwrap();
        assert!(
            !not_stream.injected_usage
                && !std::str::from_utf8(&not_stream.body.to_bytes())
                    .unwrap()
                    .contains("stream_options")
        );
    }

    #[test]
    fn bad_bodies_are_named() {
        assert_eq!(parse("").unwrap_err(), ParseError::Empty);
        assert_eq!(parse("  \n").unwrap_err(), ParseError::Empty);
        assert!(matches!(parse("{").unwrap_err(), ParseError::Json(_)));
        assert!(matches!(parse("[1]").unwrap_err(), ParseError::Json(_)));
        assert!(matches!(
            parse(r#"{"model":"a","messages":[]} x"#).unwrap_err(),
            ParseError::Json(_)
        ));
        assert_eq!(
            parse(r#"{"messages":[]}"#).unwrap_err(),
            ParseError::Missing("model")
        );
        assert_eq!(
            parse(r#"{"model":"a"}"#).unwrap_err(),
            ParseError::Missing("messages")
        );
        assert_eq!(
            parse(r#"{"model":"a","model":"b","messages":[]}"#).unwrap_err(),
            ParseError::DuplicateKey("model".into())
        );
        for (body, field) in [
            (r#"{"model":3,"messages":[]}"#, "model"),
            (r#"{"model":"a","messages":"hi"}"#, "messages"),
            (r#"{"model":"a","messages":[],"stream":"yes"}"#, "stream"),
            (
                r#"{"model":"a","messages":[],"max_tokens":-1}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"a","messages":[],"max_tokens":999999999999}"#,
                "max_tokens",
            ),
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.param(), Some(field), "{body}: {err}");
        }
        let not_utf8 = Request::parse(
            Endpoint::Embeddings,
            Bytes::from_static(b"{\"model\":\"\xff\"}"),
        );
        assert_eq!(not_utf8.unwrap_err(), ParseError::NotUtf8);
    }

    #[test]
    fn numbers_beyond_a_float_are_refused_wherever_they_are() {
        for body in [
            r#"{"model":"a","messages":[],"max_tokens":1e400}"#,
            r#"{"model":"a","messages":[],"logit_bias":{"50256":-1E+999}}"#,
        ] {
            assert!(
                matches!(parse(body), Err(ParseError::NumberOutOfRange(_))),
                "{body}"
            );
        }
        let long = format!(
            r#"{{"model":"a","messages":[],"seed":{}}}"#,
            "9".repeat(400)
        );
        assert!(matches!(parse(&long), Err(ParseError::NumberOutOfRange(_))));
        // Large but finite, and anything inside a string, is fine.
        parse(r#"{"model":"a","messages":[{"role":"user","content":"1e999"}],"x":1e308}"#).unwrap();
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            r#"{{"model":"a","messages":[],"x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(parse(&deep).unwrap_err(), ParseError::TooDeep);
        let ok_depth = format!(
            r#"{{"model":"a","messages":[],"x":{}"[[[[\\"{}}}"#,
            "[".repeat(MAX_DEPTH - 2),
            "]".repeat(MAX_DEPTH - 2)
        );
        assert!(
            parse(&ok_depth).is_ok(),
            "brackets inside strings must not count"
        );
        // Nor after escapes of every kind, one right after another; and the string's end is
        // found after them (the brackets that follow it count).
        let escapes = r#"a\n\n\"\\\u00e9\t"#;
        let inside = format!(
            r#"{{"model":"a","messages":[],"x":"{escapes}{}{escapes}","y":{}{}}}"#,
            "[".repeat(MAX_DEPTH * 2),
            "[".repeat(MAX_DEPTH - 2),
            "]".repeat(MAX_DEPTH - 2)
        );
        assert!(parse(&inside).is_ok());
        let past = format!(
            r#"{{"model":"a","messages":[],"x":"{escapes}","y":{}{}}}"#,
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert_eq!(parse(&past).unwrap_err(), ParseError::TooDeep);
    }

    /// Strings, numbers and literals at the edges of the grammar are judged as serde_json's
    /// walk over a raw value judges them (the property test
    /// `json_is_judged_as_serde_json_judges_it` flips bytes at random, these are the cases
    /// random flips seldom make). Like it, a lone surrogate escape (`"\ud800"`) passes: what
    /// it stands for is the reader's business, and Python's `json` reads it.
    #[test]
    fn edge_cases_of_the_grammar_are_judged_as_serde_json_judges_them() {
        for value in [
            r#""\u00e9""#,
            r#""\ud83d\ude00""#,
            r#""\ud800""#,
            r#""\udc00x""#,
            r#""\u12""#,
            r#""\u12g4""#,
            r#""\x""#,
            r#""\/\b\f\n\r\t\"\\""#,
            "\"tab\there\"",
            "\"nul\u{0}\"",
            "\"del\u{7f}\"",
            r#""a\""#,
            "-0",
            "-",
            "01",
            "1.",
            ".5",
            "1e",
            "1e+",
            "-1.5E-3",
            "tru",
            "nulls",
            "[1,]",
            "[,1]",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{1:2}"#,
            "[1 2]",
            "[]",
            "{}",
        ] {
            let body = format!(r#"{{"model":"a","messages":[],"x":{value}}}"#);
            let serde_ok = serde_json::from_str::<&serde_json::value::RawValue>(&body).is_ok();
            let ours = parse(&body);
            assert_eq!(
                !matches!(ours, Err(ParseError::Json(_))),
                serde_ok,
                "{value}: {:?}",
                ours.err()
            );
        }
        for body in [
            " {} ",
            "{}\n",
            "{} {}",
            "{}}",
            "{\"a\":1}x",
            "\u{feff}{}",
            "{\u{c}}",
            r#"{"\u12g4":1}"#,
            r#"{"\u00e9":1}"#,
        ] {
            let serde_ok = serde_json::from_str::<&serde_json::value::RawValue>(body).is_ok();
            let ours = top_level_fields(body);
            assert_eq!(ours.is_ok(), serde_ok, "{body:?}: {ours:?}");
        }
    }

    /// The deepest nesting accepted parses well within a worker thread's stack (2 MiB), here
    /// in an eighth of it (the walk does not recurse; serde_json, reading a decoded key or a
    /// field's value, never sees a nested one deeper than it allows).
    #[test]
    fn the_deepest_body_accepted_parses_on_a_small_stack() {
        let deepest = format!(
            r#"{{"model":"a","messages":[],"x":{}{{"y":"z"}}{}}}"#,
            "[".repeat(MAX_DEPTH - 2),
            "]".repeat(MAX_DEPTH - 2)
        );
        let parsed = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || parse(&deepest).map(|r| r.keys().count()))
            .map(|t| t.join());
        assert!(matches!(parsed, Ok(Ok(Ok(3)))), "{parsed:?}");
    }

    #[test]
    fn endpoints_match_with_and_without_v1() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::from_path("/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::from_path("/v1/embeddings"),
            Some(Endpoint::Embeddings)
        );
        assert_eq!(
            Endpoint::from_path("/completions"),
            Some(Endpoint::Completions)
        );
        assert_eq!(Endpoint::from_path("/v1/models"), None);
        let e = Request::parse(
            Endpoint::Embeddings,
            Bytes::from_static(br#"{"model":"e","input":"hi"}"#),
        );
        assert_eq!(e.unwrap().prompt_tokens_estimate(), 1);
    }
}
