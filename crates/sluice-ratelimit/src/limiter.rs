//! The limiter: local leases in front of a ledger. See the crate docs for the protocol.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use smallvec::SmallVec;
use tokio::time::Instant;

use crate::ledger::{Grant, LeaseRef, Ledger, MemoryLedger, Window};
use crate::local::Shards;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Tokens (prompt + completion); settled with the response's `usage`.
    Tokens,
    /// Requests; one per admitted request.
    Requests,
}

/// One limit to enforce: a scope's token or request budget per window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    /// Stable name, also the ledger key and the metric label (`deployment:gpt4.0:tpm`).
    pub id: String,
    /// Budget per window.
    pub limit: u64,
    /// What it counts.
    pub kind: Kind,
}

/// What to do while the shared ledger cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisError {
    /// Enforce `limit ÷ N` per replica from an in-process ledger (N last known).
    #[default]
    Local,
    /// Admit everything.
    Open,
    /// Refuse everything.
    Closed,
}

/// Where budget is coming from right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The ledger (Redis, or the in-process ledger when no Redis is configured).
    Global,
    /// Redis is down: per-replica share from an in-process ledger.
    Local,
    /// Redis is down: admitting everything.
    Open,
    /// Redis is down: refusing everything.
    Closed,
}

impl Mode {
    /// Label value for metrics and readiness output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Local => "local",
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Local,
            2 => Self::Open,
            3 => Self::Closed,
            _ => Self::Global,
        }
    }
}

/// How a ledger claim ended (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimResult {
    /// Budget granted.
    Granted,
    /// The window had too little left.
    Denied,
    /// The ledger could not be reached.
    Error,
}

impl ClaimResult {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

/// A ledger operation (for error metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerOp {
    /// A claim.
    Claim,
    /// A refund.
    Refund,
    /// A heartbeat.
    Heartbeat,
}

impl LedgerOp {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Refund => "refund",
            Self::Heartbeat => "heartbeat",
        }
    }
}

/// Receives what the limiter does with its ledger, for metrics. Calls happen off the request
/// path's fast case (claims, refunds, heartbeats only) and must not block.
pub trait Observer: Send + Sync {
    /// A claim ended with `result` after `took`.
    fn claim(&self, result: ClaimResult, took: Duration);
    /// A ledger call failed.
    fn ledger_error(&self, op: LedgerOp);
}

/// Tuning. The defaults fit a 60 s window; tests shrink `window` to seconds.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The ledger's window.
    pub window: Window,
    /// How long a lease is held before its unused part is refunded.
    pub lease_ttl: Duration,
    /// Leases cover this much of the replica's own demand.
    pub horizon: Duration,
    /// Largest lease as a fraction of the limit (besides `remaining ÷ N`); sets the bound.
    pub max_lease_fraction: f64,
    /// Local shards per limit (one per worker thread is right).
    pub shards: usize,
    /// Behaviour while the ledger is unreachable.
    pub on_redis_error: OnRedisError,
    /// How often this replica heartbeats (and learns N).
    pub heartbeat: Duration,
    /// This replica's name in the heartbeat set.
    pub replica_id: String,
    /// Maintenance tick: EWMA sampling, lease expiry, prefetch.
    pub tick: Duration,
    /// Longest a request waits on a ledger claim before it is served on credit, charged to
    /// the ledger when the claim, which goes on in the background, completes (see
    /// `Limiter::claim_patiently` for when credit is given).
    pub admit_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            window: Window::default(),
            lease_ttl: Duration::from_secs(5),
            horizon: Duration::from_millis(500),
            max_lease_fraction: 0.05,
            shards: 2,
            on_redis_error: OnRedisError::Local,
            heartbeat: Duration::from_secs(1),
            replica_id: "replica".to_owned(),
            tick: Duration::from_millis(50),
            admit_wait: Duration::from_millis(20),
        }
    }
}

/// Where a lease came from, so its refund goes back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Ledger,
    Fallback,
    Open,
}

#[derive(Debug)]
struct Lease {
    grant: LeaseRef,
    expires: Instant,
    source: Source,
}

/// How much longer than `lease_ttl` a shared ledger keeps a lease record before it presumes
/// the holder dead and takes the lease back: the holder ends its leases on its maintenance
/// tick after `lease_ttl`, one ledger round trip later. At least 2 s, or 4 ticks.
fn lease_grace(tick: Duration) -> Duration {
    (tick * 4).max(Duration::from_secs(2))
}

/// EWMA time constant for demand.
const DEMAND_TAU: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Sample {
    at: Instant,
    admitted: u64,
    requests: u64,
}

/// The state of one limit on this replica.
#[derive(Debug)]
struct LimitState {
    spec: LimitSpec,
    local: Shards,
    leases: Mutex<VecDeque<Lease>>,
    claim_lock: tokio::sync::Mutex<()>,
    prefetching: AtomicBool,
    /// Requests waiting on an on-demand claim: a cold burst is served by one claim.
    waiting: AtomicU64,
    /// Admitted cost per second (EWMA), f64 bits.
    rate: AtomicU64,
    /// Average cost of one admission (EWMA), f64 bits.
    avg_cost: AtomicU64,
    sample: Mutex<Sample>,
    /// What the ledger said was left, after this replica's last claim.
    remaining: AtomicU64,
    /// Largest single admission cost seen (for the bound).
    max_cost: AtomicU64,
    /// The ledger's last refusal of a claim for a caller: when, for how much, and its
    /// retry-after. Callers queued behind that claim take its answer ([`Limiter::claim_for`]).
    refused: Mutex<Option<Refusal>>,
}

/// A ledger's refusal of a claim made for a caller.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    at: Instant,
    missing: u64,
    retry_after: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn load_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

fn store_f64(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Ordering::Relaxed);
}

/// A limit registered with a [`Limiter`]; the proxy keeps these next to its routes, so the
/// request path never looks a limit up by name.
#[derive(Debug, Clone)]
pub struct LimitHandle(Arc<LimitState>);

impl LimitHandle {
    /// The limit's spec.
    pub fn spec(&self) -> &LimitSpec {
        &self.0.spec
    }
}

/// A request that does not fit.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The limit that refused it.
    pub limit: String,
    /// When budget should be back.
    pub retry_after: Duration,
}

/// The shared ledger's health, so outages switch modes and recover with backoff.
#[derive(Debug)]
struct Health {
    down_until: Mutex<Option<Instant>>,
    backoff: Mutex<Duration>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Local leases in front of a ledger; see the crate docs.
pub struct Limiter {
    settings: Settings,
    ledger: Arc<dyn Ledger>,
    fallback: MemoryLedger,
    limits: DashMap<String, Arc<LimitState>>,
    replicas: AtomicU64,
    mode: AtomicU8,
    contacted: AtomicBool,
    health: Health,
    claims: AtomicU64,
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits.len())
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// A limiter over `ledger`.
    pub fn new(settings: Settings, ledger: Arc<dyn Ledger>) -> Arc<Self> {
        let fallback = MemoryLedger::new(settings.window);
        let contacted = !ledger.shared();
        Arc::new(Self {
            settings,
            ledger,
            fallback,
            limits: DashMap::new(),
            replicas: AtomicU64::new(1),
            mode: AtomicU8::new(0),
            contacted: AtomicBool::new(contacted),
            health: Health {
                down_until: Mutex::new(None),
                backoff: Mutex::new(BACKOFF_MIN),
            },
            claims: AtomicU64::new(0),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Sets who hears about claims and ledger errors (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn Observer>) {
        let _ = self.observer.set(observer);
    }

    fn observe_claim(&self, result: ClaimResult, took: Duration) {
        if let Some(o) = self.observer.get() {
            o.claim(result, took);
        }
    }

    fn observe_error(&self, op: LedgerOp) {
        if let Some(o) = self.observer.get() {
            o.ledger_error(op);
        }
    }

    /// Registers (or finds) the limit `spec.id`. A changed `limit` replaces the old state.
    pub fn register(&self, spec: LimitSpec) -> LimitHandle {
        if let Some(existing) = self.limits.get(&spec.id) {
            if existing.spec == spec {
                return LimitHandle(existing.clone());
            }
        }
        let state = Arc::new(LimitState {
            local: Shards::new(self.settings.shards),
            leases: Mutex::new(VecDeque::new()),
            claim_lock: tokio::sync::Mutex::new(()),
            prefetching: AtomicBool::new(false),
            waiting: AtomicU64::new(0),
            rate: AtomicU64::new(0f64.to_bits()),
            avg_cost: AtomicU64::new(0f64.to_bits()),
            sample: Mutex::new(Sample {
                at: Instant::now(),
                admitted: 0,
                requests: 0,
            }),
            remaining: AtomicU64::new(spec.limit),
            max_cost: AtomicU64::new(0),
            refused: Mutex::new(None),
            spec: spec.clone(),
        });
        self.limits.insert(spec.id, state.clone());
        LimitHandle(state)
    }

    /// Where budget comes from right now.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// Whether the ledger has answered at least once (always true without Redis).
    pub fn ready(&self) -> bool {
        self.contacted.load(Ordering::Relaxed)
    }

    /// Live replicas as last seen through heartbeats (1 without Redis).
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Ledger claims made so far (for the Redis-commands-per-request figure).
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::Relaxed)
    }

    /// B: how far admitted budget for `limit` may exceed it in one window, summed over
    /// replicas: N × the largest lease a replica takes (crate docs, "Bound"; a window ending
    /// while claims are slower than `admit_wait` can take one more lease per replica, on
    /// credit, charged a claim's latency later).
    pub fn overshoot_bound(&self, limit: &LimitHandle) -> u64 {
        self.replicas() * self.max_lease(&limit.0)
    }

    /// An estimate of what is left of `limit`: the ledger's last answer plus what this
    /// replica holds.
    pub fn remaining(&self, limit: &LimitHandle) -> u64 {
        let held = limit.0.local.total().max(0) as u64;
        (limit.0.remaining.load(Ordering::Relaxed) + held).min(limit.0.spec.limit)
    }

    /// What this replica holds of `limit` in leases and has not spent yet.
    pub fn held(&self, limit: &LimitHandle) -> u64 {
        limit.0.local.total().max(0) as u64
    }

    /// Usage settled against `limit` so far on this replica.
    pub fn consumed(&self, limit: &LimitHandle) -> u64 {
        limit.0.local.counts().consumed
    }

    fn max_lease(&self, st: &LimitState) -> u64 {
        let cap = (st.spec.limit as f64 * self.settings.max_lease_fraction).ceil() as u64;
        cap.max(1).max(st.max_cost.load(Ordering::Relaxed))
    }

    /// Reserves `cost` on every limit in `costs`, all or nothing.
    ///
    /// While budget is local this touches only atomics. A limit without enough local budget
    /// claims from the ledger first (one round trip, shared by concurrent callers).
    ///
    /// # Errors
    /// [`Rejected`] naming the first limit that has no budget, with when it will.
    pub async fn admit<'a>(
        self: &Arc<Self>,
        costs: &[(&'a LimitHandle, u64)],
    ) -> Result<Admitted<'a>, Rejected> {
        if let Ok(admitted) = self.take(costs) {
            return Ok(admitted);
        }
        // Slow path, limit by limit: local budget if there is some, else a claim whose grant
        // serves this request first (what it does not need goes to the shards). Nothing
        // claimed on a request's behalf can be taken by another one first.
        for (reserved, (h, cost)) in costs.iter().enumerate() {
            let outcome = if h.0.local.try_take(*cost as i64) {
                Ok(())
            } else {
                self.claim_patiently(&h.0, *cost).await
            };
            if let Err(retry_after) = outcome {
                for (h, cost) in &costs[..reserved] {
                    h.0.local.put(*cost as i64);
                }
                return Err(Rejected {
                    limit: h.0.spec.id.clone(),
                    retry_after,
                });
            }
        }
        Ok(self.record(costs))
    }

    /// The hot path: reserves every cost from local budget, or nothing. Only atomics on this
    /// replica's shards; `None` means some limit needs a claim (use [`Self::admit`]).
    pub fn try_admit<'a>(&self, costs: &[(&'a LimitHandle, u64)]) -> Option<Admitted<'a>> {
        self.take(costs).ok()
    }

    fn take<'a>(&self, costs: &[(&'a LimitHandle, u64)]) -> Result<Admitted<'a>, usize> {
        self.try_take_all(costs)?;
        Ok(self.record(costs))
    }

    /// Counts an admission whose costs are already taken, and wraps it.
    fn record<'a>(&self, costs: &[(&'a LimitHandle, u64)]) -> Admitted<'a> {
        for (h, cost) in costs {
            let st = &h.0;
            st.local.record_admission(*cost);
            if *cost > st.max_cost.load(Ordering::Relaxed) {
                st.max_cost.fetch_max(*cost, Ordering::Relaxed);
            }
        }
        // Prefetching is the maintenance tick's job: checking the low-water mark here would
        // read every shard (other cores' cache lines) on every request.
        Admitted {
            parts: costs.iter().map(|(h, c)| (&*h.0, *c)).collect(),
            sent: false,
            settled: false,
        }
    }

    /// Takes every cost locally or none; on failure, the index of the limit that lacked.
    fn try_take_all(&self, costs: &[(&LimitHandle, u64)]) -> Result<(), usize> {
        for (i, (h, cost)) in costs.iter().enumerate() {
            if !h.0.local.try_take(*cost as i64) {
                for (h, cost) in &costs[..i] {
                    h.0.local.put(*cost as i64);
                }
                return Err(i);
            }
        }
        Ok(())
    }

    /// A claim for one request that waits at most `admit_wait` (G3: a slow ledger must not
    /// slow the request path). A ledger slower than that, but not known to be down (a failed
    /// claim marks it down, and claims then take the outage path at once), serves the request
    /// on credit: its cost becomes debt on the local budget, which the claim still under way
    /// repays when it is granted (what it reserved for this caller goes to the shards, below)
    /// and which any later grant repays first when it is not. The request is charged to the
    /// ledger either way, a claim's latency late; nothing is handed out that the ledger never
    /// sees. Credit is given while this replica owes at most one lease and the ledger's last
    /// answer left room for it ([`Self::credit`]); otherwise the caller waits for the claim's
    /// answer (each ledger call is bounded by `redis_timeout`, and a refusal answers every
    /// caller queued behind it), and with `on_redis_error: closed` it is refused.
    ///
    /// (Served from the local share as in an outage, as before, each slow claim gave the
    /// replica a lease the ledger never saw: on a loaded CI machine, five replicas admitted
    /// 128 % of a limit in one period, past the overshoot bound.)
    async fn claim_patiently(
        self: &Arc<Self>,
        st: &Arc<LimitState>,
        cost: u64,
    ) -> Result<(), Duration> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let (this, claimer) = (self.clone(), st.clone());
        tokio::spawn(async move {
            let outcome = this.claim_for(&claimer, cost, true).await;
            if let Err(Ok(())) = tx.send(outcome) {
                // The caller went on without waiting: what was reserved for it goes to the
                // shards, where it repays the caller's credit.
                claimer.local.put(cost as i64);
            }
        });
        let answer = match tokio::time::timeout(self.settings.admit_wait, &mut rx).await {
            Ok(answer) => answer,
            Err(_) if self.settings.on_redis_error == OnRedisError::Closed => {
                return Err(BACKOFF_MAX);
            }
            Err(_) if self.credit(st, cost) => {
                log::debug!(
                    "ledger slower than {:?}: {} served on credit",
                    self.settings.admit_wait,
                    st.spec.id
                );
                return Ok(()); // `rx` is dropped: the claim's reservation repays the credit
            }
            Err(_) => rx.await,
        };
        // An `Err` from the channel: the claim task died (the runtime is shutting down).
        answer.unwrap_or(Err(BACKOFF_MAX))
    }

    /// Takes `cost` on credit (as debt on the local budget) if this replica then owes at most
    /// one lease and this replica's part of what the ledger last said was left covers what it
    /// owes: a replica that may be at the limit waits for the ledger's answer instead. Owing at
    /// most a lease keeps what is admitted ahead of the ledger within the size of the bound's
    /// own term for this replica. (Two workers checking at once may both pass: a request's
    /// cost over, at most, per worker.)
    fn credit(&self, st: &LimitState, cost: u64) -> bool {
        let owed = (-st.local.total()).max(0) as u64;
        let room = self
            .max_lease(st)
            .min(st.remaining.load(Ordering::Relaxed) / self.replicas());
        if owed + cost > room {
            return false;
        }
        st.local.put(-(cost as i64));
        true
    }

    /// Demand-sized lease for `st`, at least `need`.
    ///
    /// Demand is the larger of the sampled rate and the rate since the last sample (over at
    /// least one tick). The sampled rate decays while a replica idles, so without the second a
    /// burst after a quiet spell would claim request by request, each request waiting on the
    /// ledger, until the next sample: measured at 2,000 requests/s after an idle pause, 72
    /// claims of one request's worth in the first 50 ms. With it, leases grow with the burst
    /// from its first requests. Either way a lease stays within the cap below, so the
    /// overshoot bound is unchanged.
    fn lease_size(&self, st: &LimitState, need: u64) -> u64 {
        let recent = {
            let s = lock(&st.sample);
            let since = Instant::now()
                .duration_since(s.at)
                .max(self.settings.tick)
                .as_secs_f64();
            st.local.counts().admitted.saturating_sub(s.admitted) as f64 / since
        };
        let rate = load_f64(&st.rate).max(recent);
        let want = (rate * self.settings.horizon.as_secs_f64()).ceil() as u64;
        let share = st.remaining.load(Ordering::Relaxed) / self.replicas();
        let cap = self.max_lease(st).min(share.max(1));
        want.min(cap).max(need)
    }

    /// Takes `need` for the caller from `st`: from local budget when a concurrent claim
    /// filled it, else from a fresh claim (single-flight per limit) whose grant serves the
    /// caller first, the rest going to the shards. On `Err`, nothing was taken.
    ///
    /// A prefetch (`for_caller` false) takes nothing: it tops the shards up to `need`.
    async fn claim_for(
        &self,
        st: &Arc<LimitState>,
        need: u64,
        for_caller: bool,
    ) -> Result<(), Duration> {
        let asked = Instant::now();
        st.waiting.fetch_add(1, Ordering::AcqRel);
        let _guard = st.claim_lock.lock().await;
        let queued = st.waiting.fetch_sub(1, Ordering::AcqRel).max(1);
        let (have, missing) = if for_caller {
            if st.local.try_take(need as i64) {
                return Ok(()); // a concurrent claim filled it
            }
            // A claim for as much or less was refused while this one queued: the ledger's
            // answer stands for it too, without a round trip of its own. (Callers queue here
            // when the ledger is slow near the limit; asking again one after another, each
            // would wait for every refusal before its own.)
            let missing_now = (need as i64 - st.local.total()).max(0) as u64;
            if let Some(r) = *lock(&st.refused) {
                if r.at >= asked && missing_now >= r.missing {
                    let waited = r.at.elapsed();
                    return Err(r
                        .retry_after
                        .saturating_sub(waited)
                        .max(Duration::from_millis(1)));
                }
            }
            // Use what is local, claim the rest, plus any debt (a grant repays it first).
            let have = st.local.drain_upto(need as i64);
            let debt = (-st.local.total()).max(0) as u64;
            (have, need - have as u64 + debt)
        } else {
            let total = st.local.total();
            if total >= need as i64 {
                return Ok(());
            }
            (0, (need as i64 - total) as u64)
        };
        // Ask for the requests queued behind this one too (within the lease cap), so a burst
        // before demand is measured costs one round trip, not one per request.
        let burst = (need * queued).min(self.max_lease(st)).max(missing);
        let ask = self.lease_size(st, missing).max(burst);
        let (grant, source) = self.ledger_claim(st, ask, missing).await;
        if grant.granted == 0 {
            st.local.put(have);
            if for_caller {
                *lock(&st.refused) = Some(Refusal {
                    at: Instant::now(),
                    missing,
                    retry_after: grant.retry_after,
                });
            }
            return Err(grant.retry_after.max(Duration::from_millis(1)));
        }
        let reserved = if for_caller { need - have as u64 } else { 0 };
        self.accept(st, grant, source, reserved);
        Ok(())
    }

    /// Takes in a grant: `reserved` of it is the caller's already, the rest goes to the shards.
    fn accept(&self, st: &LimitState, grant: Grant, source: Source, reserved: u64) {
        st.local
            .deposit(grant.granted.saturating_sub(reserved) as i64);
        if source == Source::Ledger {
            st.remaining.store(grant.remaining, Ordering::Relaxed);
        }
        if source != Source::Open {
            lock(&st.leases).push_back(Lease {
                grant: grant.lease_ref(),
                expires: Instant::now() + self.settings.lease_ttl,
                source,
            });
        }
    }

    /// One claim, falling back per [`OnRedisError`] while the ledger is down.
    async fn ledger_claim(&self, st: &LimitState, ask: u64, min: u64) -> (Grant, Source) {
        if self.ledger_usable() {
            self.claims.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            match self
                .ledger
                .claim(&st.spec.id, st.spec.limit, ask, min, self.lease_hold())
                .await
            {
                Ok(g) => {
                    self.ledger_up();
                    let result = if g.granted > 0 {
                        ClaimResult::Granted
                    } else {
                        ClaimResult::Denied
                    };
                    self.observe_claim(result, started.elapsed());
                    return (g, Source::Ledger);
                }
                Err(e) => {
                    self.observe_claim(ClaimResult::Error, started.elapsed());
                    self.observe_error(LedgerOp::Claim);
                    self.ledger_down(&e.to_string());
                }
            }
        }
        self.fallback_grant(st, ask, min)
    }

    /// A grant while the ledger cannot serve: per [`OnRedisError`].
    fn fallback_grant(&self, st: &LimitState, ask: u64, min: u64) -> (Grant, Source) {
        match self.settings.on_redis_error {
            OnRedisError::Open => (
                Grant {
                    granted: ask,
                    slot: 0,
                    remaining: st.spec.limit,
                    retry_after: Duration::ZERO,
                    lease: 0,
                },
                Source::Open,
            ),
            OnRedisError::Closed => (
                Grant {
                    granted: 0,
                    slot: 0,
                    remaining: 0,
                    retry_after: BACKOFF_MAX,
                    lease: 0,
                },
                Source::Fallback,
            ),
            OnRedisError::Local => {
                let share = st.spec.limit.div_ceil(self.replicas());
                let g = self
                    .fallback
                    .claim_now(&st.spec.id, share, ask.min(share.max(min)), min);
                (g, Source::Fallback)
            }
        }
    }

    /// How long a shared ledger keeps this replica's lease records ([`Ledger::claim`]).
    fn lease_hold(&self) -> Duration {
        self.settings.lease_ttl + lease_grace(self.settings.tick)
    }

    fn ledger_usable(&self) -> bool {
        lock(&self.health.down_until).is_none_or(|t| Instant::now() >= t)
    }

    fn ledger_up(&self) {
        self.contacted.store(true, Ordering::Relaxed);
        if self.mode.swap(0, Ordering::Relaxed) != 0 {
            log::info!("ledger reachable again: limits are global");
        }
        *lock(&self.health.down_until) = None;
        *lock(&self.health.backoff) = BACKOFF_MIN;
    }

    fn ledger_down(&self, why: &str) {
        let mode = match self.settings.on_redis_error {
            OnRedisError::Local => Mode::Local,
            OnRedisError::Open => Mode::Open,
            OnRedisError::Closed => Mode::Closed,
        };
        if self.mode.swap(mode as u8, Ordering::Relaxed) != mode as u8 {
            log::warn!("ledger unreachable ({why}): limits now {}", mode.as_str());
        }
        let mut backoff = lock(&self.health.backoff);
        *lock(&self.health.down_until) = Some(Instant::now() + *backoff);
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
    }

    /// Starts a background claim when local budget runs below the low-water mark, unless the
    /// replica is too quiet to prefetch (demand below one request per horizon).
    fn maybe_prefetch(self: &Arc<Self>, st: &Arc<LimitState>) {
        let want = load_f64(&st.rate) * self.settings.horizon.as_secs_f64();
        let avg = load_f64(&st.avg_cost).max(1.0);
        if want < avg || st.local.total() as f64 >= want / 2.0 {
            return;
        }
        if st.prefetching.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, st) = (self.clone(), st.clone());
        // Short-lived (bounded by the ledger timeout); a lost prefetch costs only latency.
        tokio::spawn(async move {
            let need = load_f64(&st.avg_cost).ceil().max(1.0) as u64;
            let _ = this
                .claim_for(&st, st.local.total().max(0) as u64 + need, false)
                .await;
            st.prefetching.store(false, Ordering::Release);
        });
    }

    /// Maintenance: sample demand, expire leases (refunding what is unused), heartbeat.
    /// Runs until `stop` turns true, then refunds every lease.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_heartbeat = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let now = Instant::now();
            // While the ledger is down, probe as soon as the backoff allows, so claims return
            // to it within a backoff of its recovery rather than a heartbeat later.
            let probing = self.mode() != Mode::Global && self.ledger_usable();
            if now >= next_heartbeat || probing {
                next_heartbeat = now + self.settings.heartbeat;
                self.heartbeat().await;
            }
            let states: Vec<Arc<LimitState>> =
                self.limits.iter().map(|e| e.value().clone()).collect();
            for st in states {
                self.sample(&st, now);
                self.expire(&st, now, false).await;
                self.maybe_prefetch(&st);
            }
        }
        self.release_all().await;
    }

    async fn heartbeat(&self) {
        if !self.ledger.shared() || !self.ledger_usable() {
            return;
        }
        let ttl = self.settings.heartbeat * 3;
        match self.ledger.heartbeat(&self.settings.replica_id, ttl).await {
            Ok(n) => {
                self.replicas.store(n.max(1), Ordering::Relaxed);
                self.ledger_up();
            }
            Err(e) => {
                self.observe_error(LedgerOp::Heartbeat);
                self.ledger_down(&e.to_string());
            }
        }
    }

    fn sample(&self, st: &LimitState, now: Instant) {
        let counts = st.local.counts();
        let (admitted, requests) = (counts.admitted, counts.requests);
        let mut s = lock(&st.sample);
        let dt = now.duration_since(s.at).as_secs_f64();
        if dt <= 0.0 {
            return;
        }
        let alpha = 1.0 - (-dt / DEMAND_TAU.as_secs_f64()).exp();
        let inst = (admitted - s.admitted) as f64 / dt;
        store_f64(&st.rate, alpha * inst + (1.0 - alpha) * load_f64(&st.rate));
        let n = requests - s.requests;
        if n > 0 {
            let cost = (admitted - s.admitted) as f64 / n as f64;
            let old = load_f64(&st.avg_cost);
            store_f64(
                &st.avg_cost,
                if old == 0.0 {
                    cost
                } else {
                    0.8 * old + 0.2 * cost
                },
            );
        }
        *s = Sample {
            at: now,
            admitted,
            requests,
        };
    }

    /// Refunds the unused part of expired leases (all leases when `all`). Budget is spent
    /// oldest lease first, so what is unused belongs to the newest leases.
    async fn expire(&self, st: &LimitState, now: Instant, all: bool) {
        loop {
            let (lease, newer) = {
                let mut leases = lock(&st.leases);
                match leases.front() {
                    Some(l) if all || l.expires <= now => {}
                    _ => return,
                }
                let newer: u64 = leases.iter().skip(1).map(|l| l.grant.granted).sum();
                match leases.pop_front() {
                    Some(l) => (l, newer),
                    None => return,
                }
            };
            let unused = (st.local.total() - newer as i64).clamp(0, lease.grant.granted as i64);
            let back = st.local.drain_upto(unused).max(0);
            // A shared ledger keeps a record of every lease until its holder ends it, even a
            // used-up one; otherwise it would presume this replica dead and give it all back.
            let recorded = lease.source == Source::Ledger && self.ledger.shared();
            if back == 0 && !recorded {
                continue;
            }
            let refunded = match lease.source {
                Source::Ledger => self
                    .ledger
                    .refund(&st.spec.id, lease.grant, back as u64)
                    .await
                    .map_err(|e| {
                        self.observe_error(LedgerOp::Refund);
                        self.ledger_down(&e.to_string());
                    }),
                Source::Fallback => self
                    .fallback
                    .refund(&st.spec.id, lease.grant, back as u64)
                    .await
                    .map_err(drop),
                Source::Open => Ok(0),
            };
            if let Ok(n) = refunded {
                st.remaining.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Refunds every lease held (on shutdown), so no budget stays stranded.
    pub async fn release_all(&self) {
        let states: Vec<Arc<LimitState>> = self.limits.iter().map(|e| e.value().clone()).collect();
        let now = Instant::now();
        for st in states {
            self.expire(&st, now, true).await;
        }
    }
}

/// Budget reserved for one request. Settle it with the real usage; dropping it unsettled
/// releases everything when the request was never sent, and keeps the estimate charged when
/// it was (the upstream may have done the work).
#[derive(Debug)]
pub struct Admitted<'a> {
    parts: SmallVec<[(&'a LimitState, u64); 4]>,
    sent: bool,
    settled: bool,
}

impl Admitted<'_> {
    /// Marks the request as sent upstream: from now on, dropping it charges the estimate.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }

    /// Settles with the actual token usage: refunds or charges the difference on token
    /// limits (a charge past the local budget becomes debt that later grants repay).
    pub fn settle(mut self, tokens: u64) {
        for (st, reserved) in &self.parts {
            let actual = match st.spec.kind {
                Kind::Tokens => tokens,
                Kind::Requests => *reserved,
            };
            st.local.settle(*reserved, actual);
        }
        self.settled = true;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        for (st, reserved) in &self.parts {
            if self.sent {
                st.local.settle(*reserved, *reserved);
            } else {
                st.local.put(*reserved as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests;
