//! A mock OpenAI-compatible upstream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How a [`MockUpstream`] behaves. Change it while running with [`MockUpstream::configure`].
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// A name echoed in responses (`"content": "hello from <name>"`).
    pub name: String,
    /// Delay before answering (before the first byte of a stream).
    pub latency: Duration,
    /// Answer every request with this status and an OpenAI-shaped error body.
    pub status: Option<u16>,
    /// `Retry-After` (seconds) on forced-status and RPM-limit answers.
    pub retry_after: Option<u64>,
    /// The upstream's own requests-per-minute limit (sliding 60 s window): beyond it, 429.
    pub rpm_limit: Option<usize>,
    /// Reject top-level fields outside OpenAI's published request schema with 400, as OpenAI
    /// does ("Unrecognized request argument supplied: x").
    pub strict: bool,
    /// Require this credential (`Authorization: Bearer …` or Azure's `api-key`); 401 otherwise.
    pub api_key: Option<String>,
    /// Pause after the first SSE chunk.
    pub stream_pause: Duration,
    /// Number of content chunks in a stream.
    pub stream_chunks: usize,
    /// `usage.completion_tokens` reported.
    pub completion_tokens: u64,
    /// `error.code` in forced-status answers (e.g. `context_length_exceeded`,
    /// `content_filter`).
    pub error_code: Option<String>,
    /// Break the connection after the first SSE chunk, as a crashing upstream would.
    pub stream_break: bool,
    /// Pause between stream events after the first (a slow generation).
    pub stream_interval: Duration,
    /// Misbehave on successful answers.
    pub fault: Option<Fault>,
}

/// Ways a successful answer goes wrong, as broken upstreams do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A JSON answer declares its whole length, sends half of it, and the connection is cut.
    CutJson,
    /// The answer stops: a JSON answer after its header, a stream after its first event.
    /// The connection stays open (for 30 s).
    Stall,
    /// A 200 `application/json` whose body is not JSON.
    MalformedJson,
    /// A stream whose events are not JSON, ending without `[DONE]`.
    MalformedSse,
    /// Answers without `usage`, even when a stream asked for it.
    NoUsage,
}

/// How long a stalled answer holds its connection open.
const STALL: Duration = Duration::from_secs(30);

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            name: "mock".to_owned(),
            latency: Duration::ZERO,
            status: None,
            retry_after: None,
            rpm_limit: None,
            strict: false,
            api_key: None,
            stream_pause: Duration::ZERO,
            stream_chunks: 3,
            completion_tokens: 7,
            error_code: None,
            stream_break: false,
            stream_interval: Duration::ZERO,
            fault: None,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path (without query).
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// When it arrived (tokio's clock).
    pub at: Instant,
}

impl Recorded {
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

struct State {
    config: Mutex<MockConfig>,
    log: Mutex<Vec<Recorded>>,
    window: Mutex<VecDeque<Instant>>,
    connections: AtomicUsize,
    cancelled: AtomicUsize,
    /// Woken whenever `cancelled` grows.
    cancel: tokio::sync::Notify,
}

/// A running mock upstream on `127.0.0.1:<ephemeral>`. Stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts a mock on a free loopback port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0", config).await
    }

    /// Starts a mock on `addr`.
    ///
    /// # Errors
    /// When `addr` cannot be bound.
    pub async fn bind(addr: &str, config: MockConfig) -> std::io::Result<Self> {
        let at = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{addr}: no address")))?;
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(at)?;
        // A deep accept queue: a load bench opens a thousand connections at once, and a full
        // queue makes the kernel reset connections the client already thinks are open.
        let listener: TcpListener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config: Mutex::new(config),
            log: Mutex::new(Vec::new()),
            window: Mutex::new(VecDeque::new()),
            connections: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            cancel: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Self { addr, state, task })
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>/v1`, the `api_base` to configure.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Changes the behaviour for the requests that follow.
    pub fn configure(&self, f: impl FnOnce(&mut MockConfig)) {
        f(&mut lock(&self.state.config));
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.log).clone()
    }

    /// How many requests were received.
    pub fn calls(&self) -> usize {
        lock(&self.state.log).len()
    }

    /// How many streams were cut off by the client (Sluice) before their end.
    pub fn cancelled(&self) -> usize {
        self.state.cancelled.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` streams were cut off (see [`Self::cancelled`]), for at most
    /// `within`; whether they were.
    pub async fn wait_cancelled(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            // Registered before the check, so a cancellation in between is not missed.
            let woken = self.state.cancel.notified();
            if self.cancelled() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return self.cancelled() >= n;
            }
        }
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take every later assertion down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // OpenAI names every answer; a gateway passes it on as `x-upstream-request-id`.
    r.headers_mut()
        .insert("x-request-id", http::HeaderValue::from_static("req_mock"));
    r
}

fn error(
    status: StatusCode,
    kind: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response<Body> {
    error_with_code(status, kind, message, retry_after, None)
}

fn error_with_code(
    status: StatusCode,
    kind: &str,
    message: &str,
    retry_after: Option<u64>,
    code: Option<&str>,
) -> Response<Body> {
    let mut r = full(
        status,
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    );
    if let Some(s) = retry_after {
        r.headers_mut().insert(http::header::RETRY_AFTER, s.into());
    }
    r
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completions,
    Embeddings,
}

fn route(path: &str) -> Option<Kind> {
    // OpenAI style (`/v1/chat/completions`, or without `/v1`) and Azure style
    // (`/openai/deployments/<name>/chat/completions`).
    let tail = path.rsplit_once("/deployments/").map_or(path, |(_, rest)| {
        rest.split_once('/').map_or("", |(_, t)| t)
    });
    let tail = tail.trim_start_matches('/');
    let tail = tail.strip_prefix("v1/").unwrap_or(tail);
    match tail {
        "chat/completions" => Some(Kind::Chat),
        "completions" => Some(Kind::Completions),
        "embeddings" => Some(Kind::Embeddings),
        _ => None,
    }
}

/// Top-level request fields of OpenAI's API reference (2025 revision), per endpoint. Used only
/// by strict mode. Kept here on purpose rather than imported from `sluice-openai`'s filter: the
/// mock stands in for OpenAI, and a leak test that took its strictness from the table it checks
/// would prove nothing.
fn allowed(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Chat => &[
            "model",
            "messages",
            "audio",
            "frequency_penalty",
            "function_call",
            "functions",
            "logit_bias",
            "logprobs",
            "max_completion_tokens",
            "max_tokens",
            "metadata",
            "modalities",
            "n",
            "parallel_tool_calls",
            "prediction",
            "presence_penalty",
            "prompt_cache_key",
            "reasoning_effort",
            "response_format",
            "safety_identifier",
            "seed",
            "service_tier",
            "stop",
            "store",
            "stream",
            "stream_options",
            "temperature",
            "tool_choice",
            "tools",
            "top_logprobs",
            "top_p",
            "user",
            "verbosity",
            "web_search_options",
        ],
        Kind::Completions => &[
            "model",
            "prompt",
            "best_of",
            "echo",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "max_tokens",
            "n",
            "presence_penalty",
            "seed",
            "stop",
            "stream",
            "stream_options",
            "suffix",
            "temperature",
            "top_p",
            "user",
        ],
        Kind::Embeddings => &["model", "input", "dimensions", "encoding_format", "user"],
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    lock(&state.log).push(Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: body.clone(),
        at: Instant::now(),
    });
    let config = lock(&state.config).clone();
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    if let Some(status) = config.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = if status == StatusCode::TOO_MANY_REQUESTS {
            "rate_limit_exceeded"
        } else {
            "server_error"
        };
        return Ok(error_with_code(
            status,
            kind,
            "forced by the mock",
            config.retry_after,
            config.error_code.as_deref(),
        ));
    }
    if let Some(expected) = &config.api_key {
        let bearer = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let azure = parts.headers.get("api-key").and_then(|v| v.to_str().ok());
        if bearer != Some(expected.as_str()) && azure != Some(expected.as_str()) {
            return Ok(error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect API key provided",
                None,
            ));
        }
    }
    if let Some(limit) = config.rpm_limit {
        let now = Instant::now();
        let mut window = lock(&state.window);
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            window.pop_front();
        }
        if window.len() >= limit {
            let retry = config.retry_after.or_else(|| {
                window.front().map(|t| {
                    60u64
                        .saturating_sub(now.duration_since(*t).as_secs())
                        .max(1)
                })
            });
            drop(window);
            return Ok(error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "Rate limit reached for requests",
                retry,
            ));
        }
        window.push_back(now);
    }
    if parts.method != Method::POST {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not found",
            None,
        ));
    }
    let Some(kind) = route(parts.uri.path()) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown path",
            None,
        ));
    };
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "We could not parse the JSON body of your request.",
            None,
        ));
    };
    if config.strict {
        if let Some(bad) = fields.keys().find(|k| !allowed(kind).contains(&k.as_str())) {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("Unrecognized request argument supplied: {bad}"),
                None,
            ));
        }
    }
    Ok(answer(kind, &fields, &config, &state))
}

fn answer(
    kind: Kind,
    fields: &Map<String, Value>,
    config: &MockConfig,
    state: &Arc<State>,
) -> Response<Body> {
    let model = fields
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let prompt_field = match kind {
        Kind::Chat => "messages",
        Kind::Completions => "prompt",
        Kind::Embeddings => "input",
    };
    let prompt_tokens = fields
        .get(prompt_field)
        .map_or(1, |v| (v.to_string().len() as u64).div_ceil(4).max(1));
    let completion_tokens = if kind == Kind::Embeddings {
        0
    } else {
        config.completion_tokens
    };
    let usage = if config.fault == Some(Fault::NoUsage) {
        Value::Null
    } else {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        })
    };
    let text = format!("hello from {}", config.name);
    let stream = fields
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match kind {
        Kind::Embeddings => full(
            StatusCode::OK,
            json!({"object": "list", "model": model, "usage": usage,
                "data": [{"object": "embedding", "index": 0,
                          "embedding": [0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7, 0.8]}]}),
        ),
        _ if stream => {
            let include_usage = fields
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            sse(
                kind,
                model,
                text,
                usage,
                include_usage,
                config,
                state.clone(),
            )
        }
        _ => match config.fault {
            Some(Fault::CutJson) => cut_json(kind, &model, &text, &usage),
            Some(Fault::Stall) => stalled(),
            Some(Fault::MalformedJson) => {
                let mut r = full(StatusCode::OK, Value::Null);
                *r.body_mut() =
                    Full::new(Bytes::from_static(b"{\"id\": \"chatcmpl-mock\", \"choi"))
                        .map_err(|never: Infallible| match never {})
                        .boxed();
                r
            }
            _ => whole(kind, &model, &text, &usage),
        },
    }
}

/// A JSON answer, whole.
fn whole(kind: Kind, model: &str, text: &str, usage: &Value) -> Response<Body> {
    full(StatusCode::OK, whole_json(kind, model, text, usage))
}

fn whole_json(kind: Kind, model: &str, text: &str, usage: &Value) -> Value {
    match kind {
        Kind::Chat => json!({"id": "chatcmpl-mock", "object": "chat.completion",
            "created": 1_700_000_000, "model": model, "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}),
        Kind::Completions => json!({"id": "cmpl-mock", "object": "text_completion",
            "created": 1_700_000_000, "model": model, "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "text": text, "logprobs": null}]}),
        Kind::Embeddings => json!({"object": "list", "model": model, "usage": usage, "data": []}),
    }
}

/// [`Fault::CutJson`]: the whole answer's length is declared, half of it is sent.
fn cut_json(kind: Kind, model: &str, text: &str, usage: &Value) -> Response<Body> {
    let bytes = Bytes::from(whole_json(kind, model, text, usage).to_string());
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(2);
    let half = bytes.slice(..bytes.len() / 2);
    let len = bytes.len();
    tokio::spawn(async move {
        if tx.send_data(half).await.is_ok() {
            tx.abort(std::io::Error::other("upstream crashed"));
        }
    });
    declared_json(body, len)
}

/// [`Fault::Stall`] for a JSON answer: its header, then nothing (for [`STALL`]).
fn stalled() -> Response<Body> {
    let (tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
    tokio::spawn(async move {
        tokio::time::sleep(STALL).await;
        drop(tx);
    });
    declared_json(body, 100)
}

/// A JSON answer declaring `len` bytes, whose body comes (or does not) from a channel.
fn declared_json(
    body: http_body_util::channel::Channel<Bytes, std::io::Error>,
    len: usize,
) -> Response<Body> {
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

fn sse(
    kind: Kind,
    model: String,
    text: String,
    usage: Value,
    include_usage: bool,
    config: &MockConfig,
    state: Arc<State>,
) -> Response<Body> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(4);
    let chunks = config.stream_chunks.max(1);
    let pause = config.stream_pause;
    let stream_break = config.stream_break;
    let interval = config.stream_interval;
    let fault = config.fault;
    let include_usage = include_usage && !usage.is_null();
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| match kind {
            Kind::Chat => json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": 1_700_000_000, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
            _ => json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or_default(),
                             "finish_reason": finish}]}),
        };
        let mut events = Vec::with_capacity(chunks + 3);
        for i in 0..chunks {
            let piece = if i == 0 {
                text.clone()
            } else {
                format!(" {i}")
            };
            let mut delta = json!({"content": piece});
            if i == 0 && kind == Kind::Chat {
                delta["role"] = json!("assistant");
            }
            events.push(chunk(delta, Value::Null));
        }
        events.push(chunk(json!({}), json!("stop")));
        if include_usage {
            let mut last = chunk(json!({}), Value::Null);
            last["choices"] = json!([]);
            last["usage"] = usage;
            events.push(last);
        }
        if fault == Some(Fault::MalformedSse) {
            for _ in 0..3 {
                let _ = tx
                    .send_data(Bytes::from_static(b"data: {not json\n\n"))
                    .await;
            }
            return; // and no [DONE]
        }
        for (i, event) in events.iter().enumerate() {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if tx
                .send_data(Bytes::from(format!("data: {event}\n\n")))
                .await
                .is_err()
            {
                state.cancelled.fetch_add(1, Ordering::Relaxed);
                state.cancel.notify_waiters();
                return;
            }
            if i == 0 && fault == Some(Fault::Stall) {
                tokio::time::sleep(STALL).await;
                return;
            }
            if i == 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if i == 0 && stream_break {
                // The body errors: hyper cuts the connection mid-stream.
                tx.abort(std::io::Error::other("upstream crashed"));
                return;
            }
        }
        let _ = tx.send_data(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(route("/v1/chat/completions") == Some(Kind::Chat));
        assert!(route("/chat/completions") == Some(Kind::Chat));
        assert!(route("/openai/deployments/gpt/chat/completions") == Some(Kind::Chat));
        assert!(route("/v1/embeddings") == Some(Kind::Embeddings));
        assert!(route("/v1/models").is_none());
    }
}
