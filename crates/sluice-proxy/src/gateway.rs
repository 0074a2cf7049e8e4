//! The request path: auth → read body → parse → plan → send (with fallback) → stream back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use sluice_config::{Config, KeyDigest, VirtualKey};
use sluice_openai::{Endpoint, Request, SseRelay};
use sluice_ratelimit::{Admitted, Kind, LimitHandle, Limiter};
use sluice_router::{Budget, Reason, Router, Skip};
use smallvec::SmallVec;
use tokio::time::Instant;

use crate::access::Access;
use crate::access::Outcome;
use crate::alarm::Alarm;
use crate::downstream::{h1, AnswerHead, BodyError, Client, Field, KeyOwner, Own};
use crate::limits::{RateHeaders, Scopes};
use crate::metrics::{Metrics, Route, ScopeKind};
use crate::reject::Rejection;
use crate::upstream::{
    ClientHeaders, Connections, Exchange, Failure, Head, Upstream, UpstreamAnswer,
};
use crate::Map;

/// Largest non-streamed response body Sluice buffers a copy of to read `usage`; a larger one
/// is settled by its estimate.
const USAGE_SCAN_LIMIT: usize = 8 * 1024 * 1024;

/// How an upstream's error answer steers the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamError {
    /// 429: out of budget upstream; cool the deployment down and try the next.
    RateLimited,
    /// 5xx, 401, 403: the deployment (or its credential) is failing; count it, try the next.
    Failing,
    /// The prompt is too long for this model: try `context_window_fallbacks`.
    ContextLength,
    /// A content filter refused it: try `content_policy_fallbacks`.
    ContentPolicy,
    /// Any other 4xx: the request is wrong; pass the answer on.
    Client,
}

fn classify_error(status: u16, body: &[u8]) -> UpstreamError {
    match status {
        429 => return UpstreamError::RateLimited,
        401 | 403 | 500..=599 => return UpstreamError::Failing,
        _ => {}
    }
    #[derive(serde::Deserialize)]
    struct Wire {
        error: Option<Inner>,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        code: Option<serde_json::Value>,
        message: Option<String>,
    }
    let inner = serde_json::from_slice::<Wire>(body)
        .ok()
        .and_then(|w| w.error);
    let code = inner
        .as_ref()
        .and_then(|e| e.code.as_ref())
        .and_then(|c| c.as_str())
        .unwrap_or_default();
    let message = inner
        .as_ref()
        .and_then(|e| e.message.as_deref())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if code == "context_length_exceeded" || message.contains("maximum context length") {
        UpstreamError::ContextLength
    } else if matches!(code, "content_filter" | "content_policy_violation")
        || message.contains("content management policy")
    {
        UpstreamError::ContentPolicy
    } else {
        UpstreamError::Client
    }
}

/// What a chain ran into, to answer with when no candidate served the request.
#[derive(Default)]
struct ChainOutcome {
    /// The last upstream error answer (passed on as is).
    answer: Option<(String, UpstreamAnswer)>,
    /// The last failure without an answer (connect error, timeout).
    failure: Option<Failure>,
    /// The limit that frees up first, among those that refused.
    limited: Option<sluice_ratelimit::Rejected>,
    /// The shortest remaining cooldown among skipped deployments.
    cooldown: Option<Duration>,
}

impl ChainOutcome {
    fn limited(&mut self, r: sluice_ratelimit::Rejected) {
        if self
            .limited
            .as_ref()
            .is_none_or(|l| r.retry_after < l.retry_after)
        {
            self.limited = Some(r);
        }
    }

    fn cooling(&mut self, left: Duration) {
        self.cooldown = Some(self.cooldown.map_or(left, |c| c.min(left)));
        if let Some(l) = self.limited.as_mut() {
            l.retry_after = l.retry_after.min(left);
        }
    }
}

/// Remaining budget per deployment, for `usage-based-routing-v2`.
struct GatewayBudget<'a>(&'a Ctx<'a>);

impl Budget for GatewayBudget<'_> {
    fn remaining(&self, id: &str) -> Option<u64> {
        self.0
            .st
            .scopes
            .deployment(id)
            .iter()
            .map(|h| self.0.gw.limiter.remaining(h))
            .min()
    }
}

/// The `usage` an answer carried, as far as it has been read.
fn usage_so_far(sse: &Option<SseRelay>, json: &Option<BytesMut>) -> Option<sluice_openai::Usage> {
    match (sse, json) {
        (Some(r), _) => r.usage(),
        (None, Some(copy)) => sluice_openai::usage_of_json(copy),
        (None, None) => None,
    }
}

/// Whether a 2xx answer is one to read whole before replying: JSON (not a stream) with a
/// declared length Sluice is willing to hold.
fn answer_fits(exchange: &Exchange) -> bool {
    let h = exchange.head();
    let length = h
        .get("content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<usize>().ok());
    !is_event_stream(h) && length.is_some_and(|n| n <= USAGE_SCAN_LIMIT)
}

/// Whether an answer is a server-sent event stream.
fn is_event_stream(h: &Head) -> bool {
    h.get("content-type")
        .is_some_and(|v| v.starts_with(b"text/event-stream"))
}

/// A successful attempt, handed to the relay.
struct Served<'a> {
    upstream: &'a Upstream,
    exchange: Exchange,
    admitted: Admitted<'a>,
    /// Sluice asked for the usage chunk: it must not reach the client.
    injected_usage: bool,
    rate: RateHeaders,
    sent_at: Instant,
    /// The prompt's token estimate: with the events relayed, what a stream the client
    /// abandoned has cost.
    prompt_tokens: u64,
}

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

/// Everything derived from one configuration. A reload builds a new one and swaps it in whole;
/// requests already running keep the one they started with.
pub struct State {
    /// Tells this state from every other one built by the process (connections remember
    /// whose key they saw under a generation: see `Client::remembered_key`).
    generation: u64,
    config: Config,
    keys: Map<KeyDigest, usize>,
    upstreams: Map<String, Upstream>,
    scopes: Scopes,
    router: Router,
}

impl State {
    /// Builds the state for `config`, registering its limits with `limiter` (a limit whose
    /// spec is unchanged keeps its state: budget survives a reload).
    fn new(config: Config, limiter: &Limiter, connections: &Connections) -> Self {
        static GENERATIONS: AtomicU64 = AtomicU64::new(0);
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
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
                    Upstream::new(d.clone(), config.reject_unknown_fields, connections),
                )
            })
            .collect();
        if config.master_key.is_none() && config.keys.is_empty() {
            log::warn!(
                "no master_key and no keys configured: every caller is accepted \
                 (set general_settings.master_key to require one)"
            );
        }
        let scopes = Scopes::register(&config, limiter);
        let router = Router::new(&config);
        Self {
            generation,
            config,
            keys,
            upstreams,
            scopes,
            router,
        }
    }
}

/// Sluice's HTTP application. One instance serves every listener thread; what comes from the
/// configuration sits in a swappable `State`, what must outlive a reload (connection pools,
/// limit state, metrics, draining) sits here.
pub struct Gateway {
    state: ArcSwap<State>,
    config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    connections: Connections,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    server_options: pingora_core::apps::HttpServerOptions,
}

impl Gateway {
    /// A gateway for `config`, enforcing its limits through `limiter`; `runtime_per_worker`
    /// says whether each worker thread runs a runtime of its own (then each keeps its own idle
    /// upstream connections: see `upstream::h1::Pool`).
    pub fn new(config: Config, limiter: Arc<Limiter>, runtime_per_worker: bool) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.init(&config);
        limiter.set_observer(metrics.clone());
        let mut server_options = pingora_core::apps::HttpServerOptions::default();
        server_options.h2c = config.server.h2c;
        let connections = Connections::new(runtime_per_worker);
        Self {
            server_options,
            state: ArcSwap::from_pointee(State::new(config, &limiter, &connections)),
            config_path: std::sync::Mutex::new(None),
            connections,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            limiter,
            metrics,
        }
    }

    /// Swaps in `config` for the requests that follow. Limits whose spec is unchanged keep
    /// their budget; connections and metrics carry on. (Listen addresses and thread counts
    /// take effect at the next start.)
    pub fn reload(&self, config: Config) {
        self.metrics.init(&config);
        self.state.store(Arc::new(State::new(
            config,
            &self.limiter,
            &self.connections,
        )));
        log::info!("configuration reloaded");
    }

    /// Where [`Self::reload_from_file`] reads the config from.
    pub fn set_config_path(&self, path: Option<std::path::PathBuf>) {
        if let Ok(mut p) = self.config_path.lock() {
            *p = path;
        }
    }

    /// Re-reads the config file, validates it, and swaps it in. A config that does not load
    /// leaves the running one in place.
    ///
    /// # Errors
    /// When there is no config file, it cannot be read, or it does not load (every problem).
    pub fn reload_from_file(&self) -> Result<(), String> {
        let path = self
            .config_path
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .ok_or("no config file to reload from")?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let loaded = sluice_config::load(&text).map_err(|e| e.to_string())?;
        for w in &loaded.warnings {
            log::warn!("{}: {w}", path.display());
        }
        self.reload(loaded.config);
        Ok(())
    }

    /// The limiter enforcing this gateway's limits.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// `server.admin_listen`, if set.
    pub fn admin_listen(&self) -> Option<String> {
        self.state.load().config.server.admin_listen.clone()
    }

    /// How long deployment `id` still cools down, if it does.
    pub fn cooldown(&self, id: &str) -> Option<Duration> {
        self.state.load().router.cooldown(id)
    }

    /// The limit named `id` (`deployment:<id>:tpm`, `key:<alias>:rpm`, …), if configured.
    pub fn limiter_handle(&self, id: &str) -> Option<LimitHandle> {
        self.state.load().scopes.handle(id)
    }

    /// Closes pooled upstream connections that idled too long or that their upstream closed
    /// (so they do not sit in `CLOSE_WAIT` between bursts of traffic).
    pub fn sweep_pools(&self) {
        self.connections.sweep();
    }

    /// Marks the gateway as draining: readiness answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether it is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `server.client_timeout` of the live config.
    pub fn client_timeout(&self) -> Duration {
        self.state.load().config.server.client_timeout
    }

    /// How Pingora should treat new connections (h2c).
    pub fn server_options(&self) -> Option<&pingora_core::apps::HttpServerOptions> {
        Some(&self.server_options)
    }

    /// Handles one admin-listener request.
    pub(crate) async fn handle_admin(&self, session: &mut ServerSession) {
        let st = self.state.load_full();
        Ctx { gw: self, st: &st }
            .handle_admin(&mut Client::Pingora(session))
            .await;
    }
}

/// One request's view: the gateway and the [`State`] loaded when it started.
struct Ctx<'a> {
    gw: &'a Gateway,
    st: &'a State,
}

impl<'a> Ctx<'a> {
    fn authenticate(&self, session: &mut Client<'_>) -> Result<Caller<'a>, Rejection> {
        if self.st.config.master_key.is_none() && self.st.config.keys.is_empty() {
            return Ok(Caller::Admin);
        }
        let generation = self.st.generation;
        let owner = match session.remembered_key(generation) {
            Some(owner) => owner,
            None => {
                let presented = bearer(session).ok_or(Rejection::MissingKey)?;
                let digest = KeyDigest::of(presented);
                let owner = if self.st.config.master_key == Some(digest) {
                    KeyOwner::Admin
                } else {
                    KeyOwner::Key(*self.st.keys.get(&digest).ok_or(Rejection::BadKey)?)
                };
                session.remember_key(generation, owner);
                owner
            }
        };
        match owner {
            KeyOwner::Admin => Ok(Caller::Admin),
            KeyOwner::Key(i) => self
                .st
                .config
                .keys
                .get(i)
                .map(|k| Caller::Key(k, i))
                .ok_or(Rejection::BadKey),
        }
    }

    /// Handles one request; the response is written to `session` (errors included). Returns
    /// when it ended (the clock read for its duration).
    async fn handle(&self, session: &mut Client<'_>) -> Instant {
        let started = Instant::now();
        let method = session.method().clone();
        let mut path = session.path().to_owned();
        let mut route = Route::Other;
        let mut group = "none";
        let mut access = None;
        let result = match (method.as_str(), path.as_str()) {
            ("GET" | "HEAD", "/health/liveness" | "/health/readiness") => {
                route = Route::Health;
                self.health(session, &path).await
            }
            ("GET", "/v1/models" | "/models") => {
                route = Route::Models;
                self.models(session).await
            }
            ("POST", "/admin/reload") => self.admin_reload(session).await,
            ("GET", "/metrics") if self.st.config.server.admin_listen.is_none() => {
                route = Route::Metrics;
                self.write_metrics(session).await;
                Ok(())
            }
            (_, "/health/liveness" | "/health/readiness" | "/v1/models" | "/models") => {
                Err(Rejection::MethodNotAllowed)
            }
            _ => match Endpoint::from_path(&path) {
                Some(endpoint) if method == http::Method::POST => {
                    route = Route::Api(endpoint);
                    let id = session.header(Field::RequestId).map(<[u8]>::to_vec);
                    let a = access.insert(Access::start(
                        started,
                        method.clone(),
                        std::mem::take(&mut path), // the record keeps it from here on
                        id,
                    ));
                    let result = self.api(session, endpoint, a).await;
                    // Only names from the config become label values.
                    group = a
                        .group
                        .and_then(|g| self.st.config.group(g))
                        .map_or("unknown", |g| g.name.as_str());
                    result
                }
                Some(_) => Err(Rejection::MethodNotAllowed),
                None => Err(Rejection::NotFound),
            },
        };
        if let Err(rejection) = result {
            log::debug!(
                "{method} {}: {} ({})",
                access.as_ref().map_or(path.as_str(), Access::path),
                rejection.status(),
                rejection.as_str()
            );
            let id = access.as_ref().map(Access::request_id);
            respond_error(session, &rejection, id).await;
        }
        let status = session.status().map_or(0, |s| s.as_u16());
        let ended = Instant::now();
        let took = ended.saturating_duration_since(started);
        self.gw.metrics.request(route, group, status, took);
        if let Some(a) = access {
            self.gw
                .metrics
                .overhead(took.saturating_sub(a.upstream_time));
            a.finish(status, took, self.st.config.server.access_log);
        }
        ended
    }

    /// `/health/liveness` (always 200) and `/health/readiness` (503 while draining or before
    /// the limiter has reached its ledger).
    async fn health(&self, session: &mut Client<'_>, path: &str) -> Result<(), Rejection> {
        if path == "/health/liveness" {
            write_json(session, 200, br#"{"status":"ok"}"#).await;
            return Ok(());
        }
        if self.gw.draining.load(Ordering::Relaxed) {
            return Err(Rejection::Draining);
        }
        if !self.gw.limiter.ready() {
            return Err(Rejection::NotReady);
        }
        let body = format!(
            r#"{{"status":"ready","limits":"{}","replicas":{}}}"#,
            self.gw.limiter.mode().as_str(),
            self.gw.limiter.replicas()
        );
        write_json(session, 200, body.as_bytes()).await;
        Ok(())
    }

    async fn write_metrics(&self, session: &mut Client<'_>) {
        let body = self
            .gw
            .metrics
            .render(&self.st.router, &self.gw.limiter, self.st.scopes.all());
        write_with_type(session, 200, &body, "text/plain; version=0.0.4").await;
    }

    /// The admin listener's routes: `/metrics` and health only.
    async fn handle_admin(&self, session: &mut Client<'_>) {
        let path = session.path().to_owned();
        let result = match (session.method().as_str(), path.as_str()) {
            ("GET", "/metrics") => {
                self.write_metrics(session).await;
                Ok(())
            }
            ("GET" | "HEAD", "/health/liveness" | "/health/readiness") => {
                self.health(session, &path).await
            }
            _ => Err(Rejection::NotFound),
        };
        if let Err(rejection) = result {
            respond_error(session, &rejection, None).await;
        }
    }

    /// `POST /admin/reload`: the master key only.
    async fn admin_reload(&self, session: &mut Client<'_>) -> Result<(), Rejection> {
        if self.st.config.master_key.is_none() {
            return Err(Rejection::NotFound); // no master key, no admin API
        }
        if !matches!(self.authenticate(session)?, Caller::Admin) {
            return Err(Rejection::AdminOnly);
        }
        match self.gw.reload_from_file() {
            Ok(()) => {
                write_json(session, 200, br#"{"status":"reloaded"}"#).await;
                Ok(())
            }
            Err(e) => Err(Rejection::ReloadRefused(e)),
        }
    }

    async fn models(&self, session: &mut Client<'_>) -> Result<(), Rejection> {
        let caller = self.authenticate(session)?;
        let data: Vec<serde_json::Value> = self
            .st.config
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
    async fn api(
        &self,
        session: &mut Client<'_>,
        endpoint: Endpoint,
        access: &mut Access<'a>,
    ) -> Result<(), Rejection> {
        let caller = self.authenticate(session)?;
        access.key = match caller {
            Caller::Admin => Some("master"),
            Caller::Key(k, _) => Some(&k.alias),
        };
        if !declares_json(session) {
            return Err(Rejection::UnsupportedMediaType);
        }
        // The body's time counts from the request's start (a clock read saved; what comes
        // before the body is read takes microseconds). No timer unless the body has to be
        // waited for (it usually came with the head).
        let body = crate::alarm::by(
            access.started() + self.st.config.server.client_timeout,
            read_body(session, self.st.config.server.max_body_bytes),
        )
        .await
        .ok_or_else(|| {
            session.close_after();
            Rejection::RequestTimeout
        })??;
        let request = Request::parse(endpoint, body).map_err(Rejection::BadRequest)?;
        let group = self
            .st
            .config
            .group(request.model())
            .ok_or_else(|| Rejection::UnknownModel(request.model().to_owned()))?;
        access.group = Some(&group.name);
        if !caller.allows(&group.name) {
            return Err(Rejection::ModelNotAllowed(group.name.clone()));
        }
        let tokens = request.prompt_tokens_estimate()
            + match endpoint {
                Endpoint::Embeddings => 0,
                _ => request
                    .max_tokens()
                    .unwrap_or(self.st.config.limits.default_max_tokens),
            };
        let budget = GatewayBudget(self);
        // Seeded per request: the chain's rng lives across awaits, which `ThreadRng` may not.
        // The order only spreads load, it guards nothing, so a small fast generator will do
        // (seeding a ChaCha `StdRng` per request was ~1 % of the request's instructions).
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(rand::random());
        // One clock read for the chain's start and the first send, unless admission waits in
        // between (then the send reads the clock again, as every later attempt does).
        let now = Instant::now();
        let mut unspent_now = Some(now);
        let Some(mut chain) = self.st.router.chain_at(
            &group.name,
            request.prompt_tokens_estimate(),
            &budget,
            &mut rng,
            now,
        ) else {
            return Err(Rejection::UnknownModel(group.name.clone()));
        };
        let mut outcome = ChainOutcome::default();
        while let Some(candidate) = chain.next() {
            let deployment = candidate.deployment;
            let Some(upstream) = self.st.upstreams.get(&deployment.id) else {
                continue;
            };
            // Shape first: a body this deployment refuses to take is the client's error.
            let shaped = request
                .shape(&deployment.upstream_model, &upstream.policy)
                .map_err(Rejection::BadRequest)?;
            // Look before leaping: reserve budget on every scope this candidate touches.
            let key_scopes: &[LimitHandle] = match caller {
                Caller::Key(_, i) => self.st.scopes.key(i, candidate.group),
                Caller::Admin => &[],
            };
            // Inline: a key's and a deployment's limits are two each (tpm, rpm), so four in
            // all but for a key with per-group limits; no allocation per candidate.
            let handles: SmallVec<[&LimitHandle; 4]> = key_scopes
                .iter()
                .chain(self.st.scopes.deployment(&deployment.id))
                .collect();
            let costs: SmallVec<[(&LimitHandle, u64); 4]> = handles
                .iter()
                .map(|h| match h.spec().kind {
                    Kind::Tokens => (*h, tokens),
                    Kind::Requests => (*h, 1),
                })
                .collect();
            let admitted = match self.gw.limiter.try_admit(&costs) {
                Some(a) => Ok(a),
                None => {
                    unspent_now = None;
                    self.gw.limiter.admit(&costs).await
                }
            };
            let mut admitted = match admitted {
                Ok(a) => a,
                Err(r) => {
                    log::debug!(
                        "deployment {} skipped: limit {} exhausted",
                        deployment.id,
                        r.limit
                    );
                    self.gw.metrics.skipped(&deployment.id, "budget");
                    access.skipped(&deployment.id, "budget");
                    let key_wide = self.st.scopes.is_key_wide(&r.limit);
                    self.gw.metrics.rejected(if r.limit.starts_with("key:") {
                        ScopeKind::Key
                    } else {
                        ScopeKind::Deployment
                    });
                    outcome.limited(r);
                    if key_wide {
                        break; // the caller's own budget: no other deployment helps
                    }
                    continue;
                }
            };
            for d in &shaped.dropped {
                self.gw.metrics.dropped_field(endpoint, d.label);
            }
            if candidate.reason != Reason::Primary {
                self.gw
                    .metrics
                    .fallback(chain.primary(), candidate.group, candidate.reason);
            }
            chain.attempted();
            let _busy = self.st.router.start(&deployment.id);
            let sent_at = unspent_now.take().unwrap_or_else(Instant::now);
            let deadline = (sent_at + deployment.timeout).min(chain.deadline());
            let exchange = upstream
                .send(
                    &self.gw.connections,
                    endpoint,
                    &shaped.body,
                    // Borrowed for the send only (the session and the access record are
                    // written to after it): no copies of the fields.
                    ClientHeaders {
                        accept: session.header(Field::Accept),
                        user_agent: session.header(Field::UserAgent),
                        openai_beta: session.header(Field::OpenaiBeta),
                        request_id: Some(access.request_id().as_bytes()),
                    },
                    sent_at,
                    deadline,
                )
                .await;
            let exchange = match exchange {
                Ok(x) => x,
                Err(failure) => {
                    log::warn!("deployment {}: {failure}", deployment.id);
                    access.tried(&deployment.id, Outcome::Failed(failure.label()));
                    self.st.router.record_failure(&deployment.id, None);
                    let took = sent_at.elapsed();
                    self.gw.metrics.upstream(&deployment.id, 0, took);
                    access.upstream_time += took;
                    outcome.failure = Some(failure);
                    continue; // `admitted` is released: nothing was served
                }
            };
            let status = exchange.head().status().as_u16();
            if (200..300).contains(&status) && answer_fits(&exchange) {
                // A JSON answer is read whole before the client sees a byte: a broken or
                // malformed one still leaves the chain free to try the next candidate, and
                // header and body leave in one write.
                admitted.mark_sent(); // the upstream may have done the work
                let whole = upstream
                    .read_whole(exchange, deadline, USAGE_SCAN_LIMIT)
                    .await;
                let took = match &whole {
                    Ok(answer) => answer.at.saturating_duration_since(sent_at),
                    Err(_) => sent_at.elapsed(),
                };
                access.upstream_time += took;
                let failure = match whole {
                    Ok(answer) => match sluice_openai::json_answer(&answer.body) {
                        Some(usage) => {
                            access.tried(&deployment.id, Outcome::Http(status));
                            self.note_skips(&chain.skipped, &mut ChainOutcome::default(), access);
                            self.st.router.record_success(&deployment.id, took);
                            self.gw.metrics.ttft(&deployment.id, took);
                            self.gw.metrics.upstream(&deployment.id, status, took);
                            self.settle(admitted, usage, true, &deployment.id, access);
                            let rate = RateHeaders::of(&self.gw.limiter, &handles);
                            self.write_answer(session, &deployment.id, &answer, rate, access)
                                .await;
                            return Ok(());
                        }
                        None => Failure::Protocol("malformed JSON answer".into()),
                    },
                    Err(failure) => failure,
                };
                log::warn!("deployment {}: {failure}", deployment.id);
                access.tried(&deployment.id, Outcome::Failed(failure.label()));
                self.st.router.record_failure(&deployment.id, None);
                self.gw.metrics.upstream(&deployment.id, 0, took);
                outcome.failure = Some(failure);
                continue; // the estimate stays charged
            }
            access.tried(&deployment.id, Outcome::Http(status));
            if (200..300).contains(&status) {
                self.note_skips(&chain.skipped, &mut ChainOutcome::default(), access);
                self.st
                    .router
                    .record_success(&deployment.id, sent_at.elapsed());
                let rate = RateHeaders::of(&self.gw.limiter, &handles);
                let served = Served {
                    upstream,
                    exchange,
                    admitted,
                    injected_usage: shaped.injected_usage,
                    rate,
                    sent_at,
                    prompt_tokens: request.prompt_tokens_estimate(),
                };
                // Boxed, like the error answers below: a stream lives for seconds and this is one
                // allocation for it, while inline its 2.5 KB state would size every request's
                // future (and so every connection's task) for it.
                Box::pin(self.relay(session, served, access)).await;
                return Ok(());
            }
            // An error answer: read it (it is small) to decide whether the next candidate
            // should have the request, keeping it to pass on if none does.
            let Some(error) = upstream.read_error(exchange, deadline).await else {
                self.st.router.record_failure(&deployment.id, None);
                let took = sent_at.elapsed();
                self.gw.metrics.upstream(&deployment.id, 0, took);
                access.upstream_time += took;
                outcome.failure = Some(Failure::Protocol("unreadable error answer".into()));
                continue;
            };
            let took = error.at.saturating_duration_since(sent_at);
            self.gw.metrics.upstream(&deployment.id, status, took);
            access.upstream_time += took;
            let kind = classify_error(status, &error.body);
            log::info!("deployment {} answered {status} ({kind:?})", deployment.id);
            match kind {
                UpstreamError::RateLimited => {
                    let ra = sluice_router::retry_after(|h| error.header(h));
                    self.st.router.record_rate_limited(&deployment.id, ra);
                }
                UpstreamError::Failing => {
                    self.st.router.record_failure(&deployment.id, None);
                }
                UpstreamError::ContextLength => {
                    chain.escalate(Reason::ContextWindow, &budget, &mut rng);
                }
                UpstreamError::ContentPolicy => {
                    chain.escalate(Reason::ContentPolicy, &budget, &mut rng);
                }
                UpstreamError::Client => {
                    // The request itself is wrong: no other deployment will take it either.
                    admitted.settle(0);
                    // Rare: boxed, so that its state does not size every request's future.
                    let rate = RateHeaders::default();
                    Box::pin(self.write_answer(session, &deployment.id, &error, rate, access))
                        .await;
                    return Ok(());
                }
            }
            outcome.answer = Some((deployment.id.clone(), error));
        }
        self.note_skips(&chain.skipped, &mut outcome, access);
        match outcome {
            ChainOutcome {
                answer: Some((id, error)),
                ..
            } => {
                let rate = RateHeaders::default();
                Box::pin(self.write_answer(session, &id, &error, rate, access)).await;
                Ok(())
            }
            ChainOutcome {
                failure: Some(Failure::Timeout),
                ..
            } => Err(Rejection::UpstreamTimeout),
            ChainOutcome {
                failure: Some(Failure::Protocol(_)),
                ..
            } => Err(Rejection::UpstreamBroken),
            ChainOutcome {
                failure: Some(_), ..
            } => Err(Rejection::UpstreamUnreachable),
            ChainOutcome {
                limited: Some(r), ..
            } => {
                let rate = self.st.scopes.rate_headers_for(&self.gw.limiter, &r.limit);
                Err(Rejection::RateLimited(r, rate))
            }
            ChainOutcome {
                cooldown: Some(left),
                ..
            } => Err(Rejection::RateLimited(
                sluice_ratelimit::Rejected {
                    limit: format!(
                        "model group {} (every deployment is cooling down)",
                        group.name
                    ),
                    retry_after: left,
                },
                RateHeaders::default(),
            )),
            ChainOutcome { .. } => Err(Rejection::BadRequest(sluice_openai::ParseError::Invalid {
                field: "messages",
                why: "the prompt is longer than every deployment of this model accepts",
            })),
        }
    }

    /// Counts the candidates a chain passed over, and notes the cooldowns among them.
    fn note_skips(
        &self,
        skipped: &[(&'a str, Skip)],
        outcome: &mut ChainOutcome,
        access: &mut Access<'a>,
    ) {
        for (id, skip) in skipped {
            access.skipped(
                id,
                match skip {
                    Skip::Cooldown => "cooldown",
                    Skip::ContextWindow => "context_window",
                },
            );
            match skip {
                Skip::Cooldown => {
                    self.gw.metrics.skipped(id, "cooldown");
                    if let Some(left) = self.st.router.cooldown(id) {
                        outcome.cooling(left);
                    }
                }
                Skip::ContextWindow => self.gw.metrics.skipped(id, "context_window"),
            }
        }
    }

    /// Settles a reservation with the answer's `usage`, and counts its tokens.
    fn settle(
        &self,
        admitted: Admitted<'_>,
        usage: Option<sluice_openai::Usage>,
        ok: bool,
        id: &str,
        access: &mut Access<'a>,
    ) {
        if let Some(u) = usage {
            self.gw
                .metrics
                .tokens(id, u.prompt_tokens, u.completion_tokens);
            access.tokens = Some(u.tokens());
        }
        match usage {
            Some(u) => admitted.settle(u.tokens()),
            // An upstream error without usage consumed no tokens; a success without usage
            // keeps its estimate (dropping a sent reservation charges it).
            None if !ok => admitted.settle(0),
            None => drop(admitted),
        }
    }

    /// Writes a whole upstream answer read into memory — a 2xx JSON answer, or an error answer
    /// passed on — the upstream's headers but hop-by-hop ones, Sluice's own, and the body, in
    /// one go.
    async fn write_answer(
        &self,
        session: &mut Client<'_>,
        id: &str,
        answer: &UpstreamAnswer,
        rate: RateHeaders,
        access: &Access<'a>,
    ) {
        let Some(mut head) = self.answer_head(&answer.head, false, id, rate, access) else {
            return;
        };
        if answer.head.get("content-type").is_none() {
            // Sluice read it as JSON (a 2xx), or passes on an error answer: labelled JSON.
            head.own
                .push((header::CONTENT_TYPE, Own::Text("application/json")));
        }
        let length = answer.body.len() as u64;
        head.own.push((header::CONTENT_LENGTH, Own::Number(length)));
        if let Err(e) = session.write_answer(&head, Some(&answer.body)).await {
            log::debug!("request {}: answer not delivered: {e}", access.request_id());
        }
    }

    /// The client's response head for an upstream's answer: the upstream's fields but
    /// hop-by-hop ones (and `Content-Length` unless `keep_length`), then Sluice's own (the
    /// upstream's `x-request-id` goes out as `x-upstream-request-id`, Sluice's replaces it).
    fn answer_head<'h>(
        &'h self,
        up: &'h Head,
        keep_length: bool,
        id: &'h str,
        rate: RateHeaders,
        access: &'h Access<'a>,
    ) -> Option<AnswerHead<'h>> {
        let mut own = Vec::with_capacity(8);
        if self.st.config.server.deployment_header {
            own.push((
                HeaderName::from_static("x-sluice-deployment"),
                AnswerHead::text(id)?,
            ));
        }
        let request_id = HeaderName::from_static("x-request-id");
        if let Some(theirs) = up.get("x-request-id") {
            own.push((
                HeaderName::from_static("x-upstream-request-id"),
                Own::Value(theirs),
            ));
        }
        if let Some(ours) = AnswerHead::text(access.request_id()) {
            own.push((request_id, ours));
        }
        for (name, n) in rate.fields().into_iter().flatten() {
            own.push((name, Own::Number(n)));
        }
        Some(AnswerHead {
            status: up.status(),
            upstream: up,
            keep_length,
            own,
        })
    }

    /// Settles an answer the client hung up on. A stream is charged what it generated so far
    /// (the prompt estimate + one token per event relayed, or its `usage` if that came); a
    /// JSON answer keeps its estimate, since the upstream may have finished the work.
    fn abandoned(
        &self,
        admitted: Option<Admitted<'_>>,
        sse: Option<&SseRelay>,
        prompt_tokens: u64,
        access: &mut Access<'a>,
    ) {
        log::debug!(
            "request {}: the client hung up mid-answer",
            access.request_id()
        );
        let (Some(admitted), Some(relay)) = (admitted, sse) else {
            return; // settled already, or JSON: dropping a sent reservation keeps the estimate
        };
        let tokens = relay
            .usage()
            .map_or(prompt_tokens + relay.chunks(), |u| u.tokens());
        access.tokens = Some(tokens);
        admitted.settle(tokens);
    }

    /// Streams the upstream's answer to the client as it arrives, chunk by chunk, reading
    /// `usage` on the way to settle the reservation.
    async fn relay(&self, session: &mut Client<'_>, served: Served<'_>, access: &mut Access<'a>) {
        let Served {
            upstream,
            mut exchange,
            mut admitted,
            injected_usage,
            rate,
            sent_at,
            prompt_tokens,
        } = served;
        let id = upstream.deployment.id.as_str();
        let idle = upstream.deployment.stream_timeout;
        let up = exchange.head();
        let ok = up.status().is_success();
        let sse = is_event_stream(up);
        // A stripped usage chunk changes the length: let the server re-frame it.
        let Some(head) = self.answer_head(up, !injected_usage, id, rate, access) else {
            return;
        };
        if session.write_answer(&head, None).await.is_err() {
            return; // unsent: dropping `admitted` releases it
        }
        admitted.mark_sent();
        let mut admitted = Some(admitted);
        let mut sse_relay = sse.then(|| SseRelay::new(injected_usage));
        let mut json_copy = (!sse && ok).then(BytesMut::new);
        let mut first = true;
        // Whatever way the relay ends, the time with the upstream is accounted for.
        let upstream_time = |access: &mut Access<'a>| {
            let took = sent_at.elapsed();
            access.upstream_time += took;
            took
        };
        loop {
            // A stream waits on the upstream but notices a client that hangs up meanwhile: a
            // stream it abandoned must not keep the upstream generating (and charging) until
            // the end. A JSON answer is short; a hang-up shows on the write (and it saves the
            // idle probe's syscall on the hot path).
            let read = if sse {
                tokio::select! {
                    r = exchange.read_chunk(idle) => r,
                    () = session.hung_up() => {
                        self.abandoned(admitted.take(), sse_relay.as_ref(), prompt_tokens, access);
                        session.close_after();
                        upstream_time(access);
                        return; // dropping `exchange` closes the upstream connection
                    }
                }
            } else {
                exchange.read_chunk(idle).await
            };
            match read {
                Ok(Some(chunk)) => {
                    if first {
                        first = false;
                        self.gw.metrics.ttft(id, sent_at.elapsed());
                    }
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
                    // Settle before the client can see the end of the answer, so its next
                    // request finds the budget already corrected.
                    if exchange.done() {
                        if let Some(a) = admitted.take() {
                            let status = exchange.head().status().as_u16();
                            self.gw.metrics.upstream(id, status, upstream_time(access));
                            self.settle(a, usage_so_far(&sse_relay, &json_copy), ok, id, access);
                        }
                    }
                    if !out.is_empty() && session.write_body(out, false).await.is_err() {
                        // The client went away: stop reading the upstream (dropping the
                        // session closes that connection, which cancels the generation).
                        self.abandoned(admitted.take(), sse_relay.as_ref(), prompt_tokens, access);
                        session.close_after();
                        upstream_time(access);
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!(
                        "deployment {}: response broke off: {e}",
                        upstream.deployment.id
                    );
                    self.st.router.record_failure(&upstream.deployment.id, None);
                    if sse {
                        // Headers and some events are out: no retry now. End the stream
                        // with an error event clients can read.
                        let event = format!(
                            "data: {}\n\n",
                            String::from_utf8_lossy(
                                &sluice_openai::ErrorBody::new(
                                    sluice_openai::ErrorType::Api,
                                    Some("upstream_stream_broken"),
                                    "The upstream stream broke off",
                                )
                                .to_json()
                            )
                        );
                        let _ = session.write_body(Bytes::from(event), true).await;
                    }
                    // A JSON body cannot be mended: cutting the connection is the honest signal.
                    session.close_after();
                    upstream_time(access);
                    return;
                }
            }
        }
        // A chunked upstream body ends only here: settle before the client sees the end.
        let tail = sse_relay.as_mut().map(SseRelay::finish).unwrap_or_default();
        if let Some(a) = admitted.take() {
            let status = exchange.head().status().as_u16();
            self.gw.metrics.upstream(id, status, upstream_time(access));
            self.settle(a, usage_so_far(&sse_relay, &json_copy), ok, id, access);
        }
        let _ = session.write_body(tail, true).await;
        let _ = upstream.release(exchange, Instant::now());
    }
}

#[async_trait]
impl HttpServerApp for Gateway {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        self.serve(session, shutdown).await
    }
}

impl Gateway {
    /// One request on `session`: reads it, answers it, and hands the connection back when it
    /// may carry another. [`HttpServerApp::process_new_http`] for Pingora's loops (HTTP/2,
    /// TLS), and called directly by the plain HTTP/1 loop (`Front::serve_h1`), whose
    /// connection future then holds this one instead of a box per request.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let client_timeout = self.state.load().config.server.client_timeout;
        // Pipelined HTTP/1.1 requests are answered in order, one after the other.
        session.set_pipelining_enabled(true);
        // The whole header within `client_timeout`, however slowly it trickles in (a tokio
        // timer, freed with the read; no Pingora read timeout, whose timers outlive reads).
        match tokio::time::timeout(client_timeout, session.read_request()).await {
            Ok(Ok(true)) => {}
            _ => return None,
        }
        self.answer(&mut Client::Pingora(&mut session), shutdown)
            .await;
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }

    /// One request on a connection Sluice's own HTTP/1.1 side serves (`downstream::h1`): reads
    /// its head, within `client_timeout` of `quiet_since` (when the connection opened or its
    /// previous answer was written: a keep-alive connection's idle time counts, as in nginx's
    /// `keepalive_timeout`, and no clock is read for it), answers it, and says what the
    /// connection does next. `alarm` is the connection's timer for that limit.
    pub(crate) async fn serve_h1(
        &self,
        conn: &mut h1::Conn,
        alarm: &mut Alarm,
        quiet_since: Instant,
        shutdown: &ShutdownWatch,
    ) -> Next {
        let client_timeout = self.state.load().config.server.client_timeout;
        match alarm
            .until(quiet_since + client_timeout, conn.read_head())
            .await
        {
            Some(Ok(h1::Head::Ready)) => {}
            Some(Ok(h1::Head::Declined)) => return Next::Pingora,
            _ => return Next::Close,
        }
        let answered = self.answer(&mut Client::H1(conn), shutdown).await;
        if conn.finish().await {
            Next::Another(answered)
        } else {
            Next::Close
        }
    }

    /// Answers a request whose head was read; returns when the answer was written.
    async fn answer(&self, client: &mut Client<'_>, shutdown: &ShutdownWatch) -> Instant {
        if *shutdown.borrow() {
            client.close_after();
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let st = self.state.load_full();
        let answered = Ctx { gw: self, st: &st }.handle(client).await;
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        answered
    }
}

/// What a connection served by Sluice's HTTP/1.1 side does after [`Gateway::serve_h1`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Wait for another request; the answer was written at this instant.
    Another(Instant),
    /// Close.
    Close,
    /// Go on with Pingora's session, which takes the request just declined.
    Pingora,
}

/// The client's key: `Authorization: Bearer <key>`, or Azure clients' `api-key: <key>`.
fn bearer<'a>(session: &'a Client<'_>) -> Option<&'a [u8]> {
    if let Some(v) = session.header(Field::Authorization) {
        let scheme = v.get(..7)?;
        return scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| v[7..].trim_ascii())
            .filter(|k| !k.is_empty());
    }
    session
        .header(Field::ApiKey)
        .map(<[u8]>::trim_ascii)
        .filter(|k| !k.is_empty())
}

/// Whether the request's body may be taken for JSON: `Content-Type` is `application/json`
/// (any parameters), a `+json` type, or absent (many SDK-less clients send none). Anything
/// else (curl -d's form encoding, `text/plain`) is refused rather than guessed at.
fn declares_json(session: &Client<'_>) -> bool {
    let Some(v) = session.header(Field::ContentType) else {
        return true;
    };
    let essence = v.split(|b| *b == b';').next().unwrap_or_default();
    let essence = essence.trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() > 5
            && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
            && essence[..12.min(essence.len())].eq_ignore_ascii_case(b"application/"))
}

/// Reads the whole request body, refusing more than `max` bytes.
async fn read_body(session: &mut Client<'_>, max: usize) -> Result<Bytes, Rejection> {
    session.read_whole_body(max).await.map_err(|e| {
        // The unread rest of the body makes the connection unusable for another request.
        session.close_after();
        match e {
            BodyError::TooLarge => Rejection::TooLarge(max),
            BodyError::Read(e) => {
                log::debug!("reading request body: {e}");
                Rejection::BadRequest(sluice_openai::ParseError::Json(
                    "the request body could not be read completely".to_owned(),
                ))
            }
        }
    })
}

async fn write_json(session: &mut Client<'_>, status: u16, body: &[u8]) {
    write_body_with(session, status, body, |_| {}).await;
}

async fn write_with_type(session: &mut Client<'_>, status: u16, body: &[u8], content_type: &str) {
    write_body_with(session, status, body, |resp| {
        let _ = resp.insert_header(header::CONTENT_TYPE, content_type);
    })
    .await;
}

async fn write_body_with(
    session: &mut Client<'_>,
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
    let _ = session
        .write_whole(Box::new(resp), Bytes::copy_from_slice(body))
        .await;
}

async fn respond_error(session: &mut Client<'_>, rejection: &Rejection, request_id: Option<&str>) {
    let body = rejection.body().to_json();
    write_body_with(session, rejection.status(), &body, |resp| {
        // Sluice's own answer: nothing of an upstream's to keep (an upstream's answer, and its
        // `x-request-id`, go out through `answer_head`).
        if let Some(id) = request_id.and_then(|id| http::HeaderValue::from_str(id).ok()) {
            let _ = resp.insert_header("x-request-id", id);
        }
        if let Rejection::RateLimited(r, rate) = rejection {
            let secs = r.retry_after.as_millis().div_ceil(1000).max(1);
            let _ = resp.insert_header(header::RETRY_AFTER, secs.to_string());
            rate.apply(resp);
        }
    })
    .await;
}
