//! Prometheus metrics (text format at `GET /metrics`, or on `server.admin_listen`).
//!
//! Label values are bounded by construction: deployment, group and limit names come from the
//! config; routes, status classes, reasons and results are closed enums with `as_str`. A
//! client-chosen value never becomes a label (an unknown model is `unknown`, an unknown
//! request field is `other`). Values that are state, not events (remaining budget, the
//! overshoot bound, modes, cooldown state), are read at scrape time.

use std::sync::OnceLock;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use sluice_openai::Endpoint;
use sluice_ratelimit::{ClaimResult, LedgerOp, LimitHandle, Limiter, Mode, Observer};

/// The route a request took (`route` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// An OpenAI API endpoint.
    Api(Endpoint),
    /// `/v1/models`.
    Models,
    /// `/health/*`.
    Health,
    /// `/metrics`.
    Metrics,
    /// Anything else (404/405).
    Other,
}

impl Route {
    /// How many routes there are (`index` is below this).
    const COUNT: usize = Endpoint::COUNT + 4;

    /// A dense index, for per-route arrays: the endpoints' own, then the other routes.
    fn index(self) -> usize {
        match self {
            Self::Api(e) => e.index(),
            Self::Models => Endpoint::COUNT,
            Self::Health => Endpoint::COUNT + 1,
            Self::Metrics => Endpoint::COUNT + 2,
            Self::Other => Endpoint::COUNT + 3,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api(e) => e.as_str(),
            Self::Models => "models",
            Self::Health => "health",
            Self::Metrics => "metrics",
            Self::Other => "other",
        }
    }
}

/// The `status_class` label values, indexed by [`class_index`].
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Where an HTTP status's class (`2xx`, `4xx`, …) is in [`CLASSES`]; the last (`error`) for
/// no status at all (0) or one outside 100–599.
fn class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => CLASSES.len() - 1,
    }
}

/// Handles to the series the request path updates, per model group and per deployment,
/// resolved at first use. `with_label_values` hashes the label values and takes the family's
/// lock on every call (callgrind: ~220 instructions, seven calls per request, ~2 % of a
/// request); a resolved handle is an atomic add. A series still appears in the exposition
/// with its first event (or at [`Metrics::init`]), exactly as without the cache. The names come
/// from the config (plus `none` and `unknown`); a name not in it takes `with_label_values`.
#[derive(Default)]
struct Resolved {
    groups: crate::Map<Box<str>, GroupSeries>,
    deployments: crate::Map<Box<str>, DeploymentSeries>,
}

#[derive(Default)]
struct GroupSeries {
    requests: [[OnceLock<IntCounter>; CLASSES.len()]; Route::COUNT],
    duration: [OnceLock<Histogram>; Route::COUNT],
}

#[derive(Default)]
struct DeploymentSeries {
    requests: [OnceLock<IntCounter>; CLASSES.len()],
    duration: OnceLock<Histogram>,
    ttft: OnceLock<Histogram>,
    prompt: OnceLock<IntCounter>,
    completion: OnceLock<IntCounter>,
}

/// Applies `f` to the metric in `slot`, resolving it with `resolve` the first time; without a
/// slot (a name the cache does not know), to a freshly resolved one.
fn with<M>(slot: Option<&OnceLock<M>>, resolve: impl FnOnce() -> M, f: impl FnOnce(&M)) {
    match slot {
        Some(slot) => f(slot.get_or_init(resolve)),
        None => f(&resolve()),
    }
}

/// Which kind of scope refused a request (`sluice_ratelimit_rejections_total{scope_kind}`).
#[derive(Debug, Clone, Copy)]
pub enum ScopeKind {
    /// A deployment's `tpm`/`rpm`.
    Deployment,
    /// A key's limits.
    Key,
}

impl ScopeKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "deployment",
            Self::Key => "key",
        }
    }
}

/// Buckets for whole requests and upstream calls: LLM calls run from milliseconds to minutes.
const SLOW: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets for what Sluice itself adds and for ledger claims: microseconds to a second.
const FAST: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Every metric family Sluice exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    overhead: Histogram,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_ttft: HistogramVec,
    tokens: IntCounterVec,
    rejections: IntCounterVec,
    remaining: IntGaugeVec,
    overshoot_bound: IntGaugeVec,
    consumed: IntGaugeVec,
    held: IntGaugeVec,
    claims: IntCounterVec,
    claim_duration: Histogram,
    mode: IntGaugeVec,
    replicas: IntGauge,
    redis_up: IntGauge,
    redis_errors: IntCounterVec,
    fallbacks: IntCounterVec,
    skips: IntCounterVec,
    deployment_state: IntGaugeVec,
    cooldowns: IntCounterVec,
    cooldowns_seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    dropped_fields: IntCounterVec,
    resolved: ArcSwap<Resolved>,
}

/// Registers metric definitions. They are fixed at compile time, so a failure is a
/// programming error the tests catch, not something a request or config can cause.
struct Reg<'a>(&'a Registry);

#[allow(clippy::expect_used)]
impl Reg<'_> {
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.0.register(Box::new(m.clone())).expect("unique metric");
        m
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.0.register(Box::new(m.clone())).expect("unique metric");
        m
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let m = IntGauge::new(name, help).expect("valid metric");
        self.0.register(Box::new(m.clone())).expect("unique metric");
        m
    }

    fn histograms(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let m = HistogramVec::new(opts, labels).expect("valid metric");
        self.0.register(Box::new(m.clone())).expect("unique metric");
        m
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let m = Histogram::with_opts(opts).expect("valid metric");
        self.0.register(Box::new(m.clone())).expect("unique metric");
        m
    }
}

impl Metrics {
    /// Registers every family in a fresh registry (one per gateway, so tests can run several).
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Reg(&registry);
        let build = r.gauges("sluice_build_info", "Build information", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Self {
            requests: r.counters(
                "sluice_requests_total",
                "Requests answered, by route, model group and status class",
                &["route", "model_group", "status_class"],
            ),
            request_duration: r.histograms(
                "sluice_request_duration_seconds",
                "Time from request to the end of the answer",
                &["route", "model_group"],
                SLOW,
            ),
            overhead: r.histogram(
                "sluice_overhead_duration_seconds",
                "Time Sluice adds to an API request, excluding time spent with upstreams",
                FAST,
            ),
            upstream_requests: r.counters(
                "sluice_upstream_requests_total",
                "Calls to upstream deployments, by status class (error: no answer)",
                &["deployment", "status_class"],
            ),
            upstream_duration: r.histograms(
                "sluice_upstream_duration_seconds",
                "Time from sending to an upstream to the end of its answer",
                &["deployment"],
                SLOW,
            ),
            upstream_ttft: r.histograms(
                "sluice_upstream_ttft_seconds",
                "Time from sending to an upstream to the first byte of its answer's body",
                &["deployment"],
                SLOW,
            ),
            tokens: r.counters(
                "sluice_tokens_total",
                "Tokens upstreams reported in usage",
                &["deployment", "kind"],
            ),
            rejections: r.counters(
                "sluice_ratelimit_rejections_total",
                "Candidates refused by a limit, by scope kind",
                &["scope_kind"],
            ),
            remaining: r.gauges(
                "sluice_ratelimit_remaining",
                "Budget left in the window (this replica's view)",
                &["scope"],
            ),
            overshoot_bound: r.gauges(
                "sluice_ratelimit_overshoot_bound",
                "How far a window's admitted budget may exceed the limit, summed over replicas",
                &["scope"],
            ),
            consumed: r.gauges(
                "sluice_ratelimit_consumed",
                "Usage settled on this replica since start",
                &["scope"],
            ),
            held: r.gauges(
                "sluice_ratelimit_held",
                "Budget this replica holds in leases and has not spent yet",
                &["scope"],
            ),
            claims: r.counters(
                "sluice_ratelimit_claims_total",
                "Ledger claims, by result",
                &["result"],
            ),
            claim_duration: r.histogram(
                "sluice_ratelimit_claim_duration_seconds",
                "Time one ledger claim took",
                FAST,
            ),
            mode: r.gauges(
                "sluice_ratelimit_mode",
                "1 for the mode limits are enforced in",
                &["mode"],
            ),
            replicas: r.gauge("sluice_ratelimit_replicas", "Live replicas sharing the limits"),
            redis_up: r.gauge("sluice_redis_up", "1 while the shared ledger answers"),
            redis_errors: r.counters(
                "sluice_redis_errors_total",
                "Failed ledger calls, by operation",
                &["op"],
            ),
            fallbacks: r.counters(
                "sluice_fallbacks_total",
                "Attempts on a fallback group, by requested group, fallback group and reason",
                &["from", "to", "reason"],
            ),
            skips: r.counters(
                "sluice_skips_total",
                "Candidates passed over before anything was sent (cooldown, budget, context_window)",
                &["deployment", "reason"],
            ),
            deployment_state: r.gauges(
                "sluice_deployment_state",
                "0 healthy, 1 cooling down",
                &["deployment"],
            ),
            cooldowns: r.counters(
                "sluice_deployment_cooldowns_total",
                "Times a deployment was cooled down",
                &["deployment"],
            ),
            cooldowns_seen: std::sync::Mutex::default(),
            dropped_fields: r.counters(
                "sluice_filter_dropped_fields_total",
                "Request fields the outbound allow-list left out (field: its name when known, else other)",
                &["endpoint", "field"],
            ),
            resolved: ArcSwap::default(),
            registry,
        }
    }

    /// Creates, at zero, every series whose labels the config already determines, so that
    /// each family is in the exposition (and `rate()` starts from 0) before its first event.
    pub fn init(&self, config: &sluice_config::Config) {
        let deployments = || config.groups.iter().flat_map(|g| g.deployments.iter());
        let groups = config.groups.iter().map(|g| g.name.as_str());
        self.resolved.store(std::sync::Arc::new(Resolved {
            groups: (groups.chain(["none", "unknown"]))
                .map(|g| (g.into(), GroupSeries::default()))
                .collect(),
            deployments: deployments()
                .map(|d| (d.id.as_str().into(), DeploymentSeries::default()))
                .collect(),
        }));
        for d in deployments() {
            let id = d.id.as_str();
            for class in ["2xx", "4xx", "5xx", "error"] {
                self.upstream_requests.with_label_values(&[id, class]);
            }
            for kind in ["prompt", "completion"] {
                self.tokens.with_label_values(&[id, kind]);
            }
            for reason in ["cooldown", "budget", "context_window"] {
                self.skips.with_label_values(&[id, reason]);
            }
        }
        let r = &config.router;
        for g in &config.groups {
            let from = g.name.as_str();
            let tables = [
                (sluice_router::Reason::Fallback, r.fallbacks.get(from)),
                (
                    sluice_router::Reason::ContextWindow,
                    r.context_window_fallbacks.get(from),
                ),
                (
                    sluice_router::Reason::ContentPolicy,
                    r.content_policy_fallbacks.get(from),
                ),
            ];
            for (reason, to) in tables {
                for to in to.into_iter().flatten() {
                    self.fallbacks
                        .with_label_values(&[from, to, reason.as_str()]);
                }
            }
            for to in &r.default_fallbacks {
                self.fallbacks.with_label_values(&[
                    from,
                    to,
                    sluice_router::Reason::Fallback.as_str(),
                ]);
            }
        }
        for kind in [ScopeKind::Deployment, ScopeKind::Key] {
            self.rejections.with_label_values(&[kind.as_str()]);
        }
        for result in [
            ClaimResult::Granted,
            ClaimResult::Denied,
            ClaimResult::Error,
        ] {
            self.claims.with_label_values(&[result.as_str()]);
        }
        for op in [LedgerOp::Claim, LedgerOp::Refund, LedgerOp::Heartbeat] {
            self.redis_errors.with_label_values(&[op.as_str()]);
        }
        for e in [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Embeddings,
        ] {
            self.dropped_fields
                .with_label_values(&[e.as_str(), "other"]);
        }
    }

    /// Counts a finished request.
    pub fn request(&self, route: Route, group: &str, status: u16, took: Duration) {
        let resolved = self.resolved.load();
        let series = resolved.groups.get(group);
        let (r, class) = (route.index(), class_index(status));
        with(
            series.map(|s| &s.requests[r][class]),
            || {
                self.requests
                    .with_label_values(&[route.as_str(), group, CLASSES[class]])
            },
            IntCounter::inc,
        );
        with(
            series.map(|s| &s.duration[r]),
            || {
                self.request_duration
                    .with_label_values(&[route.as_str(), group])
            },
            |h| h.observe(took.as_secs_f64()),
        );
    }

    /// Records the time Sluice itself added to an API request.
    pub fn overhead(&self, took: Duration) {
        self.overhead.observe(took.as_secs_f64());
    }

    /// Counts one upstream call and how long it took (`status` 0: no answer).
    pub fn upstream(&self, deployment: &str, status: u16, took: Duration) {
        let resolved = self.resolved.load();
        let series = resolved.deployments.get(deployment);
        let class = class_index(status);
        with(
            series.map(|s| &s.requests[class]),
            || {
                self.upstream_requests
                    .with_label_values(&[deployment, CLASSES[class]])
            },
            IntCounter::inc,
        );
        with(
            series.map(|s| &s.duration),
            || self.upstream_duration.with_label_values(&[deployment]),
            |h| h.observe(took.as_secs_f64()),
        );
    }

    /// Records the time to an upstream answer's first body byte.
    pub fn ttft(&self, deployment: &str, took: Duration) {
        let resolved = self.resolved.load();
        with(
            resolved.deployments.get(deployment).map(|s| &s.ttft),
            || self.upstream_ttft.with_label_values(&[deployment]),
            |h| h.observe(took.as_secs_f64()),
        );
    }

    /// Counts the tokens an upstream reported.
    pub fn tokens(&self, deployment: &str, prompt: u64, completion: u64) {
        let resolved = self.resolved.load();
        let series = resolved.deployments.get(deployment);
        with(
            series.map(|s| &s.prompt),
            || self.tokens.with_label_values(&[deployment, "prompt"]),
            |c| c.inc_by(prompt),
        );
        with(
            series.map(|s| &s.completion),
            || self.tokens.with_label_values(&[deployment, "completion"]),
            |c| c.inc_by(completion),
        );
    }

    /// Counts a candidate refused by a limit.
    pub fn rejected(&self, kind: ScopeKind) {
        self.rejections.with_label_values(&[kind.as_str()]).inc();
    }

    /// Counts a request field the filter left out; `field` is already a bounded label.
    pub fn dropped_field(&self, endpoint: Endpoint, field: &'static str) {
        self.dropped_fields
            .with_label_values(&[endpoint.as_str(), field])
            .inc();
    }

    /// Counts an attempt on a fallback group.
    pub fn fallback(&self, from: &str, to: &str, reason: sluice_router::Reason) {
        self.fallbacks
            .with_label_values(&[from, to, reason.as_str()])
            .inc();
    }

    /// Counts a candidate passed over; `reason` is `cooldown`, `budget` or `context_window`.
    pub fn skipped(&self, deployment: &str, reason: &'static str) {
        self.skips.with_label_values(&[deployment, reason]).inc();
    }

    /// The text exposition, with state read from `router`, `limiter` and its `limits`.
    pub fn render<'a>(
        &self,
        router: &sluice_router::Router,
        limiter: &Limiter,
        limits: impl Iterator<Item = &'a LimitHandle>,
    ) -> Vec<u8> {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for h in limits {
            let id = h.spec().id.as_str();
            self.overshoot_bound
                .with_label_values(&[id])
                .set(as_i64(limiter.overshoot_bound(h)));
            self.remaining
                .with_label_values(&[id])
                .set(as_i64(limiter.remaining(h)));
            self.consumed
                .with_label_values(&[id])
                .set(as_i64(limiter.consumed(h)));
            self.held
                .with_label_values(&[id])
                .set(as_i64(limiter.held(h)));
        }
        let current = limiter.mode();
        for m in [Mode::Global, Mode::Local, Mode::Open, Mode::Closed] {
            self.mode
                .with_label_values(&[m.as_str()])
                .set(i64::from(m == current));
        }
        self.replicas.set(as_i64(limiter.replicas()));
        self.redis_up
            .set(i64::from(current == Mode::Global && limiter.ready()));
        if let Ok(mut seen) = self.cooldowns_seen.lock() {
            for id in router.deployments() {
                self.deployment_state
                    .with_label_values(&[id])
                    .set(i64::from(router.cooldown(id).is_some()));
                let now = router.cooldowns(id);
                let before = seen.insert(id.to_owned(), now).unwrap_or(0);
                self.cooldowns
                    .with_label_values(&[id])
                    .inc_by(now.saturating_sub(before));
            }
        }
        self.render_registry()
    }

    /// The registry's text exposition as it stands.
    fn render_registry(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Metrics {
    fn claim(&self, result: ClaimResult, took: Duration) {
        self.claims.with_label_values(&[result.as_str()]).inc();
        self.claim_duration.observe(took.as_secs_f64());
    }

    fn ledger_error(&self, op: LedgerOp) {
        self.redis_errors.with_label_values(&[op.as_str()]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> sluice_config::Config {
        let yaml = "model_list:\n  - model_name: g\n    litellm_params:\n      model: openai/m\n      api_base: http://127.0.0.1:9/v1\n";
        match sluice_config::load(yaml) {
            Ok(l) => l.config,
            Err(e) => panic!("{e}"),
        }
    }

    fn value(m: &Metrics, series: &str) -> f64 {
        let text = String::from_utf8_lossy(&m.render_registry()).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(-1.0)
    }

    #[test]
    fn status_classes() {
        let class = |s| CLASSES[class_index(s)];
        assert_eq!(class(0), "error");
        assert_eq!(class(99), "error");
        assert_eq!(class(100), "1xx");
        assert_eq!(class(200), "2xx");
        assert_eq!(class(299), "2xx");
        assert_eq!(class(302), "3xx");
        assert_eq!(class(429), "4xx");
        assert_eq!(class(599), "5xx");
        assert_eq!(class(600), "error");
    }

    /// Resolved handles, the fallback for unknown names and a re-`init` (a reload) all count
    /// into the same series, and nothing is lost across the reload.
    #[test]
    fn resolved_series_count_into_the_families() {
        let m = Metrics::new();
        let chat = Route::Api(Endpoint::ChatCompletions);
        m.init(&config());
        let ms = Duration::from_millis(1);
        m.request(chat, "g", 200, ms);
        m.request(chat, "g", 200, ms);
        m.request(chat, "not-in-config", 503, ms);
        m.upstream("g.0", 200, ms);
        m.ttft("g.0", ms);
        m.tokens("g.0", 7, 3);
        m.upstream("gone.0", 0, ms);
        m.init(&config());
        m.request(chat, "g", 200, ms);
        m.upstream("g.0", 200, ms);
        m.tokens("g.0", 1, 1);
        let req = |g: &str, c: &str| {
            format!(
                r#"sluice_requests_total{{model_group="{g}",route="chat_completions",status_class="{c}"}}"#
            )
        };
        assert_eq!(value(&m, &req("g", "2xx")), 3.0);
        assert_eq!(value(&m, &req("not-in-config", "5xx")), 1.0);
        assert_eq!(
            value(
                &m,
                r#"sluice_request_duration_seconds_count{model_group="g",route="chat_completions"}"#
            ),
            3.0
        );
        let up = r#"sluice_upstream_requests_total{deployment="g.0",status_class="2xx"}"#;
        assert_eq!(value(&m, up), 2.0);
        let err = r#"sluice_upstream_requests_total{deployment="gone.0",status_class="error"}"#;
        assert_eq!(value(&m, err), 1.0);
        assert_eq!(
            value(
                &m,
                r#"sluice_upstream_duration_seconds_count{deployment="g.0"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &m,
                r#"sluice_upstream_ttft_seconds_count{deployment="g.0"}"#
            ),
            1.0
        );
        assert_eq!(
            value(&m, r#"sluice_tokens_total{deployment="g.0",kind="prompt"}"#),
            8.0
        );
        assert_eq!(
            value(
                &m,
                r#"sluice_tokens_total{deployment="g.0",kind="completion"}"#
            ),
            4.0
        );
        // Series without an event stay out of the exposition, as before the cache.
        assert_eq!(value(&m, &req("g", "1xx")), -1.0);
    }
}
