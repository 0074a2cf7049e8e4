//! Prometheus metrics (text format at `GET /metrics`).
//!
//! Label values are bounded: limit names come from the config (`deployment:<id>:tpm`,
//! `key:<alias>:rpm`), other labels from closed enums. Values that are state, not events
//! (remaining budget, the overshoot bound, the limiter's mode), are read at scrape time.

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use sluice_ratelimit::{LimitHandle, Limiter, Mode};

/// The metric families Sluice exports so far.
pub struct Metrics {
    registry: Registry,
    overshoot_bound: IntGaugeVec,
    remaining: IntGaugeVec,
    consumed: IntGaugeVec,
    mode: IntGaugeVec,
    replicas: IntGauge,
    redis_up: IntGauge,
    claims: IntGauge,
    rejections: IntCounterVec,
    dropped_fields: IntCounterVec,
    fallbacks: IntCounterVec,
    skips: IntCounterVec,
    deployment_state: IntGaugeVec,
    cooldowns: IntCounterVec,
    cooldowns_seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
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

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g =
        IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    g
}

impl Metrics {
    /// Registers every family in a fresh registry.
    ///
    /// # Panics
    /// Only on a programming error in the metric definitions (a bad name or a duplicate),
    /// which the tests exercise.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let rejections = IntCounterVec::new(
            Opts::new(
                "sluice_ratelimit_rejections_total",
                "Requests refused by a limit, by scope kind",
            ),
            &["scope_kind"],
        )
        .expect("valid metric");
        r.register(Box::new(rejections.clone()))
            .expect("unique metric");
        let dropped_fields = IntCounterVec::new(
            Opts::new(
                "sluice_filter_dropped_fields_total",
                "Request fields the outbound allow-list left out (field: its name when known, else other)",
            ),
            &["endpoint", "field"],
        )
        .expect("valid metric");
        r.register(Box::new(dropped_fields.clone()))
            .expect("unique metric");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let fallbacks = counter_vec(
            "sluice_fallbacks_total",
            "Attempts on a fallback group, by requested group, fallback group and reason",
            &["from", "to", "reason"],
        );
        let skips = counter_vec(
            "sluice_skips_total",
            "Candidates passed over before anything was sent, by reason (cooldown, budget, context_window)",
            &["deployment", "reason"],
        );
        let cooldowns = counter_vec(
            "sluice_deployment_cooldowns_total",
            "Times a deployment was cooled down",
            &["deployment"],
        );
        let deployment_state = gauge_vec(
            r,
            "sluice_deployment_state",
            "0 healthy, 1 cooling down",
            &["deployment"],
        );
        let build = gauge_vec(r, "sluice_build_info", "Build information", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Self {
            overshoot_bound: gauge_vec(
                r,
                "sluice_ratelimit_overshoot_bound",
                "How far a window's admitted budget may exceed the limit, summed over replicas",
                &["scope"],
            ),
            remaining: gauge_vec(
                r,
                "sluice_ratelimit_remaining",
                "Budget left in the window (this replica's view)",
                &["scope"],
            ),
            consumed: gauge_vec(
                r,
                "sluice_ratelimit_consumed",
                "Usage settled on this replica since start",
                &["scope"],
            ),
            mode: gauge_vec(
                r,
                "sluice_ratelimit_mode",
                "1 for the mode limits are enforced in",
                &["mode"],
            ),
            replicas: gauge(
                "sluice_ratelimit_replicas",
                "Live replicas sharing the limits",
            ),
            redis_up: gauge("sluice_redis_up", "1 while the shared ledger answers"),
            claims: gauge("sluice_ratelimit_claims", "Ledger claims made since start"),
            rejections,
            dropped_fields,
            fallbacks,
            skips,
            deployment_state,
            cooldowns,
            cooldowns_seen: std::sync::Mutex::default(),
            registry,
        }
    }

    /// Counts a request refused by a limit.
    pub fn rejected(&self, kind: ScopeKind) {
        self.rejections.with_label_values(&[kind.as_str()]).inc();
    }

    /// Counts a request field the filter left out; `field` is already a bounded label.
    pub fn dropped_field(&self, endpoint: sluice_openai::Endpoint, field: &'static str) {
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

    /// The text exposition, with state read from `limiter` for `limits`.
    pub fn render<'a>(
        &self,
        router: &sluice_router::Router,
        limiter: &Limiter,
        limits: impl Iterator<Item = &'a LimitHandle>,
    ) -> Vec<u8> {
        for h in limits {
            let id = h.spec().id.as_str();
            let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.overshoot_bound
                .with_label_values(&[id])
                .set(as_i64(limiter.overshoot_bound(h)));
            self.remaining
                .with_label_values(&[id])
                .set(as_i64(limiter.remaining(h)));
            self.consumed
                .with_label_values(&[id])
                .set(as_i64(limiter.consumed(h)));
        }
        let current = limiter.mode();
        for m in [Mode::Global, Mode::Local, Mode::Open, Mode::Closed] {
            self.mode
                .with_label_values(&[m.as_str()])
                .set(i64::from(m == current));
        }
        self.replicas
            .set(i64::try_from(limiter.replicas()).unwrap_or(i64::MAX));
        self.redis_up
            .set(i64::from(current == Mode::Global && limiter.ready()));
        self.claims
            .set(i64::try_from(limiter.claims()).unwrap_or(i64::MAX));
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
        let mut out = Vec::with_capacity(4096);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
