//! Which deployments a request may go to, in what order, and which to leave alone.
//!
//! A [`Chain`] is one request's walk over its candidates:
//!
//! 1. the requested group's deployments, by `order` (lower first), then by the
//!    `routing_strategy` (`simple-shuffle` weighted by `weight`/`rpm`/`tpm`, `least-busy`,
//!    `usage-based-routing-v2` = most remaining budget, `latency-based-routing` = lowest
//!    latency EWMA); a deployment whose `max_input_tokens` the prompt exceeds is skipped, and
//!    the group's `context_window_fallbacks` come next;
//! 2. the group's `fallbacks`, then `default_fallbacks`, each expanded the same way;
//! 3. on an upstream context-length or content-filter error, the proxy calls
//!    [`Chain::escalate`] and the matching fallback groups are tried next.
//!
//! "Look before you leap": [`Chain::next`] skips a deployment in cooldown before anything is
//! sent (and records the skip); the proxy skips one without budget the same way. One chain
//! has one attempt budget (`num_retries` + 1 upstream attempts) and one deadline
//! (`router_settings.timeout`), whatever the number of groups.
//!
//! Health is shared: `allowed_fails` failures within a minute cool a deployment down for
//! `cooldown_time`; an upstream 429 cools it down for as long as its `Retry-After` (or
//! `x-ratelimit-reset-*`) says. The request path reads health with atomics only.
//!
//! Not here: I/O and limits. Budget comes through the [`Budget`] trait.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use sluice_config::{Config, Deployment, ModelGroup, RoutingStrategy};
use tokio::time::Instant;

/// How much budget a deployment has left, for `usage-based-routing-v2`.
pub trait Budget {
    /// Remaining budget of deployment `id` (its tightest limit), `None` when unlimited.
    fn remaining(&self, id: &str) -> Option<u64>;
}

/// A [`Budget`] that knows nothing: every deployment is unlimited.
pub struct NoBudget;

impl Budget for NoBudget {
    fn remaining(&self, _: &str) -> Option<u64> {
        None
    }
}

/// Why a candidate is in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A deployment of the requested group.
    Primary,
    /// From `fallbacks` or `default_fallbacks`.
    Fallback,
    /// From `context_window_fallbacks`.
    ContextWindow,
    /// From `content_policy_fallbacks`.
    ContentPolicy,
}

impl Reason {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Fallback => "fallback",
            Self::ContextWindow => "context_window",
            Self::ContentPolicy => "content_policy",
        }
    }
}

/// Why a candidate was passed over without being tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Cooling down after failures or an upstream 429.
    Cooldown,
    /// The prompt exceeds its `max_input_tokens`.
    ContextWindow,
}

/// One deployment to try.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'r> {
    /// The deployment.
    pub deployment: &'r Deployment,
    /// The group it belongs to.
    pub group: &'r str,
    /// Why it is in the chain.
    pub reason: Reason,
}

/// A deployment's health, shared by every request.
#[derive(Debug, Default)]
struct Health {
    /// Milliseconds since the router's epoch until which it cools down (0: healthy).
    cooldown_until: AtomicU64,
    /// Failure times within the last minute (touched on failures only).
    failures: Mutex<VecDeque<Instant>>,
    in_flight: AtomicU64,
    /// Time to response headers, EWMA, microseconds (0: unknown yet).
    latency_us: AtomicU64,
    cooldowns: AtomicU64,
}

/// The request path's lookup maps: built from the config, read per request. foldhash instead
/// of std's SipHash, which was ~1 % of a request's instructions over four lookups; the keys
/// come from the config, so a client can only look up, never fill a map with collisions.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Groups, fallbacks, strategy and health; one per configuration.
pub struct Router {
    groups: Vec<ModelGroup>,
    health: Map<String, Health>,
    strategy: RoutingStrategy,
    fallbacks: Map<String, Vec<String>>,
    context_window: Map<String, Vec<String>>,
    content_policy: Map<String, Vec<String>>,
    default_fallbacks: Vec<String>,
    allowed_fails: usize,
    cooldown_time: Duration,
    max_attempts: u32,
    timeout: Duration,
    epoch: Instant,
}

const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl Router {
    /// A router for `config`'s groups and `router_settings`.
    pub fn new(config: &Config) -> Self {
        let r = &config.router;
        let health = config
            .groups
            .iter()
            .flat_map(|g| g.deployments.iter())
            .map(|d| (d.id.clone(), Health::default()))
            .collect();
        let map = |m: &std::collections::BTreeMap<String, Vec<String>>| {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        Self {
            groups: config.groups.clone(),
            health,
            strategy: r.routing_strategy,
            fallbacks: map(&r.fallbacks),
            context_window: map(&r.context_window_fallbacks),
            content_policy: map(&r.content_policy_fallbacks),
            default_fallbacks: r.default_fallbacks.clone(),
            allowed_fails: r.allowed_fails as usize,
            cooldown_time: r.cooldown_time,
            max_attempts: r.num_retries.saturating_add(1),
            timeout: r.timeout,
            epoch: Instant::now(),
        }
    }

    fn group(&self, name: &str) -> Option<&ModelGroup> {
        self.groups.iter().find(|g| g.name == name)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Remaining cooldown of deployment `id`, if it is cooling down.
    pub fn cooldown(&self, id: &str) -> Option<Duration> {
        let until = self.health.get(id)?.cooldown_until.load(Ordering::Relaxed);
        if until == 0 {
            return None; // never cooled down: no clock read (one per candidate otherwise)
        }
        let now = self.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// How many times deployment `id` was cooled down.
    pub fn cooldowns(&self, id: &str) -> u64 {
        self.health
            .get(id)
            .map_or(0, |h| h.cooldowns.load(Ordering::Relaxed))
    }

    /// Every deployment id.
    pub fn deployments(&self) -> impl Iterator<Item = &str> {
        self.health.keys().map(String::as_str)
    }

    fn cool(&self, h: &Health, for_: Duration) {
        let now = self.now_ms();
        let until = now + for_.as_millis() as u64;
        // A new cooldown when the previous one (if any) had already ended.
        if h.cooldown_until.fetch_max(until, Ordering::Relaxed) <= now {
            h.cooldowns.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a failure of `id` (connect error, timeout, 5xx, 401/403, 429). With
    /// `retry_after` (an upstream 429's), it cools down that long at once; otherwise it cools
    /// down for `cooldown_time` once more than `allowed_fails` failures fall within a minute.
    /// Returns whether it is cooling down now.
    pub fn record_failure(&self, id: &str, retry_after: Option<Duration>) -> bool {
        let Some(h) = self.health.get(id) else {
            return false;
        };
        if let Some(d) = retry_after {
            self.cool(h, d);
            return true;
        }
        let now = Instant::now();
        let recent = {
            let mut f = h
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while f
                .front()
                .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
            {
                f.pop_front();
            }
            f.push_back(now);
            f.len()
        };
        if recent > self.allowed_fails {
            self.cool(h, self.cooldown_time);
            if let Ok(mut f) = h.failures.lock() {
                f.clear();
            }
            return true;
        }
        false
    }

    /// Records an upstream 429 from `id`: it cools down for the `retry_after` the upstream
    /// asked for, else for `cooldown_time`.
    pub fn record_rate_limited(&self, id: &str, retry_after: Option<Duration>) {
        self.record_failure(id, Some(retry_after.unwrap_or(self.cooldown_time)));
    }

    /// Records a success of `id` and its time to response headers.
    pub fn record_success(&self, id: &str, latency: Duration) {
        if let Some(h) = self.health.get(id) {
            let us = latency.as_micros().max(1) as u64;
            let old = h.latency_us.load(Ordering::Relaxed);
            let new = if old == 0 { us } else { (old * 4 + us) / 5 };
            h.latency_us.store(new, Ordering::Relaxed);
        }
    }

    /// Marks a request in flight to `id` until the guard drops (for `least-busy`).
    pub fn start(&self, id: &str) -> InFlight<'_> {
        let h = self.health.get(id);
        if let Some(h) = h {
            h.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight(h)
    }

    /// The chain for a request to `group` with a prompt of about `prompt_tokens`; `None` when
    /// the group does not exist.
    pub fn chain<'r>(
        &'r self,
        group: &str,
        prompt_tokens: u64,
        budget: &dyn Budget,
        rng: &mut impl Rng,
    ) -> Option<Chain<'r>> {
        self.chain_at(group, prompt_tokens, budget, rng, Instant::now())
    }

    /// [`Router::chain`] for a chain that starts at `now` (its deadline counts from there), for a
    /// caller that has just read the clock.
    pub fn chain_at<'r>(
        &'r self,
        group: &str,
        prompt_tokens: u64,
        budget: &dyn Budget,
        rng: &mut impl Rng,
        now: Instant,
    ) -> Option<Chain<'r>> {
        let primary = self.group(group)?;
        let mut chain = Chain {
            router: self,
            primary: &primary.name,
            queue: VecDeque::new(),
            seen: Vec::new(),
            attempts: 0,
            asked: false,
            deadline: now + self.timeout,
            skipped: Vec::new(),
            prompt_tokens,
        };
        let too_long = chain.push_group(&primary.name, Reason::Primary, false, budget, rng);
        if too_long {
            chain.push_groups(Reason::ContextWindow, false, budget, rng);
        }
        for g in self
            .fallbacks
            .get(group)
            .into_iter()
            .flatten()
            .chain(&self.default_fallbacks)
        {
            chain.push_group(g, Reason::Fallback, false, budget, rng);
        }
        Some(chain)
    }

    /// Orders a group's deployments for one request.
    fn order<'r>(
        &'r self,
        group: &'r ModelGroup,
        budget: &dyn Budget,
        rng: &mut impl Rng,
    ) -> Vec<&'r Deployment> {
        let mut keyed: Vec<(u32, f64, &Deployment)> = group
            .deployments
            .iter()
            .map(|d| {
                let jitter: f64 = rng.gen_range(f64::EPSILON..1.0);
                let h = self.health.get(&d.id);
                // Smaller key = earlier.
                let key = match self.strategy {
                    // Weighted random order (Efraimidis–Spirakis): u^(1/w), largest first.
                    RoutingStrategy::SimpleShuffle => -jitter.powf(1.0 / shuffle_weight(d)),
                    RoutingStrategy::LeastBusy => {
                        h.map_or(0, |h| h.in_flight.load(Ordering::Relaxed)) as f64 + jitter
                    }
                    RoutingStrategy::UsageBased => {
                        -(budget.remaining(&d.id).map_or(f64::MAX / 2.0, |r| r as f64)) - jitter
                    }
                    RoutingStrategy::LatencyBased => {
                        h.map_or(0, |h| h.latency_us.load(Ordering::Relaxed)) as f64 + jitter
                    }
                };
                (d.order, key, d)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        keyed.into_iter().map(|(_, _, d)| d).collect()
    }
}

/// `weight` when set, else `rpm`, else `tpm`, else 1 — LiteLLM's order of preference.
fn shuffle_weight(d: &Deployment) -> f64 {
    if d.weight != 1.0 {
        return d.weight;
    }
    d.rpm.or(d.tpm).map_or(1.0, |v| v as f64)
}

/// Keeps a deployment's in-flight count up while alive.
pub struct InFlight<'r>(Option<&'r Health>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.0 {
            h.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One request's walk over its candidates (see the crate docs).
pub struct Chain<'r> {
    router: &'r Router,
    primary: &'r str,
    queue: VecDeque<Candidate<'r>>,
    seen: Vec<&'r str>,
    attempts: u32,
    /// Whether `next` has been called (the first call skips the deadline check).
    asked: bool,
    deadline: Instant,
    /// Deployments passed over without being tried, in order.
    pub skipped: Vec<(&'r str, Skip)>,
    prompt_tokens: u64,
}

impl<'r> Chain<'r> {
    /// Adds a group's deployments (at the back, or the front); returns whether any was
    /// skipped because the prompt is too long for it.
    fn push_group(
        &mut self,
        name: &str,
        reason: Reason,
        front: bool,
        budget: &dyn Budget,
        rng: &mut impl Rng,
    ) -> bool {
        let Some(group) = self.router.group(name) else {
            return false;
        };
        if self.seen.contains(&group.name.as_str()) {
            return false;
        }
        self.seen.push(&group.name);
        let mut too_long = false;
        let mut picked = 0;
        for d in self.router.order(group, budget, rng) {
            if d.max_input_tokens.is_some_and(|m| self.prompt_tokens > m) {
                self.skipped.push((&d.id, Skip::ContextWindow));
                too_long = true;
                continue;
            }
            self.queue.push_back(Candidate {
                deployment: d,
                group: &group.name,
                reason,
            });
            picked += 1;
        }
        if front {
            // The group's candidates, in their order, ahead of everything queued before.
            self.queue.rotate_right(picked);
        }
        too_long
    }

    fn push_groups(
        &mut self,
        reason: Reason,
        front: bool,
        budget: &dyn Budget,
        rng: &mut impl Rng,
    ) {
        let router = self.router;
        let table = match reason {
            Reason::ContextWindow => &router.context_window,
            Reason::ContentPolicy => &router.content_policy,
            Reason::Primary | Reason::Fallback => &router.fallbacks,
        };
        let groups: Vec<&String> = table.get(self.primary).into_iter().flatten().collect();
        // At the front, in their configured order.
        let iter: Box<dyn Iterator<Item = &&String>> = if front {
            Box::new(groups.iter().rev())
        } else {
            Box::new(groups.iter())
        };
        for g in iter {
            self.push_group(g, reason, front, budget, rng);
        }
    }

    /// After an upstream context-length (`ContextWindow`) or content-filter (`ContentPolicy`)
    /// error: the matching fallback groups are tried next. Returns whether any was added.
    pub fn escalate(&mut self, reason: Reason, budget: &dyn Budget, rng: &mut impl Rng) -> bool {
        let before = self.queue.len();
        self.push_groups(reason, true, budget, rng);
        self.queue.len() > before
    }

    /// Counts one upstream attempt (a body was sent) against `num_retries`.
    pub fn attempted(&mut self) {
        self.attempts += 1;
    }

    /// Upstream attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The chain's deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The requested group.
    pub fn primary(&self) -> &'r str {
        self.primary
    }
}

impl<'r> Iterator for Chain<'r> {
    type Item = Candidate<'r>;

    /// The next candidate worth trying: `None` when the chain is exhausted, its attempts are
    /// used up, or its deadline has passed. Deployments in cooldown are skipped (and recorded
    /// in [`Self::skipped`]).
    fn next(&mut self) -> Option<Candidate<'r>> {
        // The first call needs no clock read: the deadline was set a moment ago, when the
        // chain was made, and the timeout is positive (the config refuses zero).
        if self.attempts >= self.router.max_attempts
            || (self.asked && Instant::now() >= self.deadline)
        {
            return None;
        }
        self.asked = true;
        while let Some(c) = self.queue.pop_front() {
            if self.router.cooldown(&c.deployment.id).is_some() {
                self.skipped.push((&c.deployment.id, Skip::Cooldown));
                continue;
            }
            return Some(c);
        }
        None
    }
}

/// The cooldown an upstream 429 asks for: `Retry-After` (seconds), `retry-after-ms`, else the
/// longest of OpenAI's `x-ratelimit-reset-requests`/`-tokens` (`"1s"`, `"6m0s"`, `"20ms"`).
pub fn retry_after(header: impl Fn(&str) -> Option<String>) -> Option<Duration> {
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    if let Some(s) = header("retry-after").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(s).ok();
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|h| header(h).and_then(|v| parse_go_duration(&v)))
        .max()
}

/// Parses Go-style durations as OpenAI sends them: `1h2m3.5s`, `6m0s`, `20ms`.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests;
