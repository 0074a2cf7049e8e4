//! The request path: auth → read body → parse → plan → send (with fallback) → stream back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use sluice_config::{Config, KeyDigest, VirtualKey};
use sluice_openai::{Endpoint, Request, SseRelay};
use sluice_ratelimit::{Admitted, Kind, LimitHandle, Limiter};
use sluice_router::Plan;
use tokio::time::Instant;

use crate::limits::{RateHeaders, Scopes};
use crate::metrics::{Metrics, ScopeKind};
use crate::reject::Rejection;
use crate::upstream::{ClientHeaders, Exchange, Failure, Upstream};

/// How long Sluice waits for the next piece of a client's request before giving up on it.
const DOWNSTREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Response headers never copied from an upstream: hop-by-hop (RFC 9110 §7.6.1) and framing,
/// which Sluice's own server sets for the client connection.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Statuses after which the same request goes to the next candidate, if there is one: the
/// upstream is out of budget, failing, or refusing this deployment's credential, and nothing
/// has reached the client yet.
fn retryable(status: u16) -> bool {
    matches!(status, 401 | 403 | 429 | 500 | 502 | 503 | 504)
}

/// Largest non-streamed response body Sluice buffers a copy of to read `usage`; a larger one
/// is settled by its estimate.
const USAGE_SCAN_LIMIT: usize = 8 * 1024 * 1024;

/// Who is calling.
enum Caller<'a> {
    /// The master key, or any caller when no keys are configured.
    Admin,
    /// A virtual key, with its index in `config.keys`.
    Key(&'a VirtualKey, usize),
}

impl Caller<'_> {
    fn allows(&self, group: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Key(k, _) => k.allows(group),
        }
    }
}

/// Sluice's HTTP application: owns the configuration-derived state and the upstream
/// connection pools. One instance serves every listener thread.
pub struct Gateway {
    config: Config,
    keys: HashMap<KeyDigest, usize>,
    upstreams: HashMap<String, Upstream>,
    connector: Connector,
    draining: AtomicBool,
    limiter: Arc<Limiter>,
    scopes: Scopes,
    metrics: Metrics,
}

impl Gateway {
    /// Builds the state for `config`, enforcing its limits through `limiter`.
    pub fn new(config: Config, limiter: Arc<Limiter>) -> Self {
        let keys = config
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.digest, i))
            .collect();
        let upstreams = config
            .groups
            .iter()
            .flat_map(|g| g.deployments.iter())
            .map(|d| {
                (
                    d.id.clone(),
                    Upstream::new(d.clone(), config.reject_unknown_fields),
                )
            })
            .collect();
        if config.master_key.is_none() && config.keys.is_empty() {
            log::warn!(
                "no master_key and no keys configured: every caller is accepted \
                 (set general_settings.master_key to require one)"
            );
        }
        let scopes = Scopes::register(&config, &limiter);
        Self {
            config,
            keys,
            upstreams,
            connector: Connector::new(None),
            draining: AtomicBool::new(false),
            limiter,
            scopes,
            metrics: Metrics::new(),
        }
    }

    /// The limiter enforcing this gateway's limits.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The limit named `id` (`deployment:<id>:tpm`, `key:<alias>:rpm`, …), if configured.
    pub fn limiter_handle(&self, id: &str) -> Option<LimitHandle> {
        self.scopes.handle(id)
    }

    /// Marks the gateway as draining: readiness answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn authenticate(&self, session: &ServerSession) -> Result<Caller<'_>, Rejection> {
        if self.config.master_key.is_none() && self.config.keys.is_empty() {
            return Ok(Caller::Admin);
        }
        let presented = bearer(session).ok_or(Rejection::MissingKey)?;
        let digest = KeyDigest::of(presented);
        if self.config.master_key == Some(digest) {
            return Ok(Caller::Admin);
        }
        self.keys
            .get(&digest)
            .and_then(|i| self.config.keys.get(*i).map(|k| Caller::Key(k, *i)))
            .ok_or(Rejection::BadKey)
    }

    /// Handles one request; the response is written to `session` (errors included).
    async fn handle(&self, session: &mut ServerSession) {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let result = match (method.as_str(), path.as_str()) {
            ("GET" | "HEAD", "/health/liveness") => {
                write_json(session, 200, br#"{"status":"ok"}"#).await;
                Ok(())
            }
            ("GET" | "HEAD", "/health/readiness") => {
                if self.draining.load(Ordering::Relaxed) {
                    Err(Rejection::Draining)
                } else if !self.limiter.ready() {
                    Err(Rejection::NotReady)
                } else {
                    let body = format!(
                        r#"{{"status":"ready","limits":"{}","replicas":{}}}"#,
                        self.limiter.mode().as_str(),
                        self.limiter.replicas()
                    );
                    write_json(session, 200, body.as_bytes()).await;
                    Ok(())
                }
            }
            ("GET", "/v1/models" | "/models") => self.models(session).await,
            ("GET", "/metrics") => {
                let body = self.metrics.render(&self.limiter, self.scopes.all());
                write_with_type(session, 200, &body, "text/plain; version=0.0.4").await;
                Ok(())
            }
            (_, "/health/liveness" | "/health/readiness" | "/v1/models" | "/models") => {
                Err(Rejection::MethodNotAllowed)
            }
            _ => match Endpoint::from_path(&path) {
                Some(endpoint) if method == http::Method::POST => self.api(session, endpoint).await,
                Some(_) => Err(Rejection::MethodNotAllowed),
                None => Err(Rejection::NotFound),
            },
        };
        if let Err(rejection) = result {
            log::debug!(
                "{method} {path}: {} ({})",
                rejection.status(),
                rejection.as_str()
            );
            respond_error(session, &rejection).await;
        }
    }

    async fn models(&self, session: &mut ServerSession) -> Result<(), Rejection> {
        let caller = self.authenticate(session)?;
        let data: Vec<serde_json::Value> = self
            .config
            .groups
            .iter()
            .filter(|g| caller.allows(&g.name))
            .map(|g| serde_json::json!({"id": g.name, "object": "model", "created": 0, "owned_by": "sluice"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data}).to_string();
        write_json(session, 200, body.as_bytes()).await;
        Ok(())
    }

    /// An OpenAI API call: the whole path of DESIGN.md §1.
    async fn api(&self, session: &mut ServerSession, endpoint: Endpoint) -> Result<(), Rejection> {
        let caller = self.authenticate(session)?;
        let body = read_body(session, self.config.server.max_body_bytes).await?;
        let request = Request::parse(endpoint, body).map_err(Rejection::BadRequest)?;
        let group = self
            .config
            .group(request.model())
            .ok_or_else(|| Rejection::UnknownModel(request.model().to_owned()))?;
        if !caller.allows(&group.name) {
            return Err(Rejection::ModelNotAllowed(group.name.clone()));
        }
        let plan = Plan::new(group, &mut rand::thread_rng());
        let header_bytes = |name: &str| session.get_header(name).map(|v| v.as_bytes().to_vec());
        let (accept, user_agent, openai_beta) = (
            header_bytes("accept"),
            header_bytes("user-agent"),
            header_bytes("openai-beta"),
        );
        let client_headers = ClientHeaders {
            accept: accept.as_deref(),
            user_agent: user_agent.as_deref(),
            openai_beta: openai_beta.as_deref(),
        };
        let tokens = request.prompt_tokens_estimate()
            + match endpoint {
                Endpoint::Embeddings => 0,
                _ => request
                    .max_tokens()
                    .unwrap_or(self.config.limits.default_max_tokens),
            };
        let key_scopes: &[LimitHandle] = match caller {
            Caller::Key(_, i) => self.scopes.key(i, &group.name),
            Caller::Admin => &[],
        };
        let candidates = plan.candidates();
        let mut last_failure = None;
        let mut limited: Option<sluice_ratelimit::Rejected> = None;
        for (i, deployment) in candidates.iter().enumerate() {
            let Some(upstream) = self.upstreams.get(&deployment.id) else {
                continue;
            };
            let is_last = i + 1 == candidates.len();
            // Shape first: a body this deployment refuses to take is the client's error.
            let shaped = request
                .shape(&deployment.upstream_model, &upstream.policy)
                .map_err(Rejection::BadRequest)?;
            // Look before leaping: reserve budget on every scope this candidate touches.
            let handles: Vec<&LimitHandle> = key_scopes
                .iter()
                .chain(self.scopes.deployment(&deployment.id))
                .collect();
            let costs: Vec<(&LimitHandle, u64)> = handles
                .iter()
                .map(|h| {
                    let cost = match h.spec().kind {
                        Kind::Tokens => tokens,
                        Kind::Requests => 1,
                    };
                    (*h, cost)
                })
                .collect();
            let admitted = match self.limiter.try_admit(&costs) {
                Some(a) => Ok(a),
                None => self.limiter.admit(&costs).await,
            };
            let admitted = match admitted {
                Ok(a) => a,
                Err(r) => {
                    log::debug!(
                        "deployment {} skipped: limit {} exhausted",
                        deployment.id,
                        r.limit
                    );
                    let key_scope = r.limit.starts_with("key:");
                    self.metrics.rejected(if key_scope {
                        ScopeKind::Key
                    } else {
                        ScopeKind::Deployment
                    });
                    if limited
                        .as_ref()
                        .is_none_or(|l| r.retry_after < l.retry_after)
                    {
                        limited = Some(r);
                    }
                    if key_scope {
                        break; // the caller's own budget: no other deployment helps
                    }
                    continue;
                }
            };
            // Counted per body actually sent.
            for d in &shaped.dropped {
                self.metrics.dropped_field(endpoint, d.label);
            }
            let deadline = Instant::now() + deployment.timeout;
            let exchange = upstream
                .send(
                    &self.connector,
                    endpoint,
                    &shaped.body,
                    client_headers,
                    deadline,
                )
                .await;
            let exchange = match exchange {
                Ok(x) => x,
                Err(failure) => {
                    log::warn!("deployment {}: {failure}", deployment.id);
                    last_failure = Some(failure);
                    continue; // `admitted` is released: nothing was served
                }
            };
            let status = exchange
                .session
                .response_header()
                .map_or(502, |h| h.status.as_u16());
            if retryable(status) && !is_last {
                log::info!(
                    "deployment {} answered {status}; trying the next",
                    deployment.id
                );
                upstream.discard(&self.connector, exchange, deadline).await;
                continue;
            }
            let rate = RateHeaders::of(&self.limiter, &handles);
            self.relay(
                session,
                upstream,
                exchange,
                admitted,
                shaped.injected_usage,
                rate,
            )
            .await;
            return Ok(());
        }
        if let Some(r) = limited {
            if last_failure.is_none() {
                let rate = self.scopes.rate_headers_for(&self.limiter, &r.limit);
                return Err(Rejection::RateLimited(r, rate));
            }
        }
        Err(match last_failure {
            Some(Failure::Timeout) => Rejection::UpstreamTimeout,
            _ => Rejection::UpstreamUnreachable,
        })
    }

    /// Streams the upstream's answer to the client as it arrives, chunk by chunk, reading
    /// `usage` on the way to settle the reservation.
    async fn relay(
        &self,
        session: &mut ServerSession,
        upstream: &Upstream,
        mut exchange: Exchange,
        mut admitted: Admitted<'_>,
        injected_usage: bool,
        rate: RateHeaders,
    ) {
        let Some(up) = exchange.session.response_header() else {
            return;
        };
        let ok = up.status.is_success();
        let sse = up
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let mut resp = match ResponseHeader::build(up.status, Some(up.headers.len() + 6)) {
            Ok(r) => r,
            Err(_) => return,
        };
        for (name, value) in &up.headers {
            // A stripped usage chunk changes the length: let the server re-frame it.
            let reframed = injected_usage && *name == header::CONTENT_LENGTH;
            if !HOP_BY_HOP.contains(name) && !reframed {
                let _ = resp.append_header(name.clone(), value.clone());
            }
        }
        if self.config.server.deployment_header {
            let _ = resp.insert_header("x-sluice-deployment", upstream.deployment.id.as_str());
        }
        rate.apply(&mut resp);
        if session.write_response_header(Box::new(resp)).await.is_err() {
            return; // unsent: dropping `admitted` releases it
        }
        admitted.mark_sent();
        let mut sse_relay = sse.then(|| SseRelay::new(injected_usage));
        let mut json_copy = (!sse && ok).then(BytesMut::new);
        loop {
            match exchange.session.read_response_body().await {
                Ok(Some(chunk)) => {
                    let out = match sse_relay.as_mut() {
                        Some(r) => r.feed(chunk),
                        None => {
                            if let Some(copy) = json_copy.as_mut() {
                                if copy.len() + chunk.len() <= USAGE_SCAN_LIMIT {
                                    copy.extend_from_slice(&chunk);
                                } else {
                                    json_copy = None; // too large: settle by estimate
                                }
                            }
                            chunk
                        }
                    };
                    if !out.is_empty() && session.write_response_body(out, false).await.is_err() {
                        // The client went away: stop reading the upstream (dropping the
                        // session closes that connection, which cancels the generation).
                        // The estimate stays charged.
                        session.set_keepalive(None);
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!(
                        "deployment {}: response broke off: {e}",
                        upstream.deployment.id
                    );
                    // Headers are out; the only honest signal left is to cut the connection.
                    session.set_keepalive(None);
                    return;
                }
            }
        }
        let tail = sse_relay.as_mut().map(SseRelay::finish).unwrap_or_default();
        let _ = session.write_response_body(tail, true).await;
        let usage = match (&sse_relay, &json_copy) {
            (Some(r), _) => r.usage(),
            (None, Some(copy)) => sluice_openai::usage_of_json(copy),
            (None, None) => None,
        };
        match usage {
            Some(u) => admitted.settle(u.tokens()),
            // An upstream error without usage consumed no tokens; a success without usage
            // keeps its estimate (dropping a sent reservation charges it).
            None if !ok => admitted.settle(0),
            None => drop(admitted),
        }
        upstream.release(&self.connector, exchange).await;
    }
}

#[async_trait]
impl HttpServerApp for Gateway {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        session.set_read_timeout(Some(DOWNSTREAM_READ_TIMEOUT));
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) | Err(_) => return None,
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        self.handle(&mut session).await;
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }
}

/// The client's key: `Authorization: Bearer <key>`, or Azure clients' `api-key: <key>`.
fn bearer(session: &ServerSession) -> Option<&[u8]> {
    if let Some(v) = session.get_header(header::AUTHORIZATION) {
        let v = v.as_bytes();
        let scheme = v.get(..7)?;
        return scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| v[7..].trim_ascii())
            .filter(|k| !k.is_empty());
    }
    session
        .get_header("api-key")
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

/// Reads the whole request body, refusing more than `max` bytes.
async fn read_body(session: &mut ServerSession, max: usize) -> Result<Bytes, Rejection> {
    let declared = session
        .get_header(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        // The unread body makes the connection unusable for another request.
        session.set_keepalive(None);
        return Err(Rejection::TooLarge(max));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max {
                    session.set_keepalive(None);
                    return Err(Rejection::TooLarge(max));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                log::debug!("reading request body: {e}");
                session.set_keepalive(None);
                return Err(Rejection::BadRequest(sluice_openai::ParseError::Json(
                    "the request body could not be read completely".to_owned(),
                )));
            }
        }
    }
}

async fn write_json(session: &mut ServerSession, status: u16, body: &[u8]) {
    write_body_with(session, status, body, |_| {}).await;
}

async fn write_with_type(
    session: &mut ServerSession,
    status: u16,
    body: &[u8],
    content_type: &str,
) {
    write_body_with(session, status, body, |resp| {
        let _ = resp.insert_header(header::CONTENT_TYPE, content_type);
    })
    .await;
}

async fn write_body_with(
    session: &mut ServerSession,
    status: u16,
    body: &[u8],
    extra: impl FnOnce(&mut ResponseHeader),
) {
    let Ok(mut resp) = ResponseHeader::build(status, Some(8)) else {
        return;
    };
    let _ = resp.insert_header(header::CONTENT_TYPE, "application/json");
    extra(&mut resp);
    let _ = resp.insert_header(header::CONTENT_LENGTH, body.len().to_string());
    if session.write_response_header(Box::new(resp)).await.is_ok() {
        let _ = session
            .write_response_body(Bytes::copy_from_slice(body), true)
            .await;
    }
}

async fn respond_error(session: &mut ServerSession, rejection: &Rejection) {
    let body = rejection.body().to_json();
    write_body_with(session, rejection.status(), &body, |resp| {
        if let Rejection::RateLimited(r, rate) = rejection {
            let secs = r.retry_after.as_millis().div_ceil(1000).max(1);
            let _ = resp.insert_header(header::RETRY_AFTER, secs.to_string());
            rate.apply(resp);
        }
    })
    .await;
}
