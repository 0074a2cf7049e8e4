use super::*;
use crate::ledger::LedgerError;
use async_trait::async_trait;

fn settings() -> Settings {
    Settings {
        window: Window {
            period: Duration::from_secs(10),
            slots: 10,
        },
        lease_ttl: Duration::from_secs(2),
        ..Settings::default()
    }
}

fn tokens(id: &str, limit: u64) -> LimitSpec {
    LimitSpec {
        id: id.to_owned(),
        limit,
        kind: Kind::Tokens,
    }
}

fn memory() -> Arc<Limiter> {
    Limiter::new(settings(), Arc::new(MemoryLedger::new(settings().window)))
}

#[tokio::test(start_paused = true)]
async fn a_single_replica_admits_exactly_the_limit() {
    let l = memory();
    let t = l.register(tokens("d:tpm", 100));
    let mut admitted = 0;
    for _ in 0..20 {
        match l.admit(&[(&t, 15)]).await {
            Ok(a) => {
                a.settle(15);
                admitted += 15;
            }
            Err(r) => {
                assert_eq!(r.limit, "d:tpm");
                assert!(r.retry_after > Duration::ZERO && r.retry_after <= Duration::from_secs(10));
            }
        }
    }
    assert_eq!(admitted, 90, "six 15-token requests fit in 100");
    assert_eq!(l.consumed(&t), 90);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        l.admit(&[(&t, 15)]).await.is_ok(),
        "budget returns with the window"
    );
}

#[tokio::test(start_paused = true)]
async fn admission_is_all_or_nothing_across_limits() {
    let l = memory();
    let key = l.register(tokens("k:tpm", 1000));
    let dep = l.register(LimitSpec {
        id: "d:rpm".into(),
        limit: 1,
        kind: Kind::Requests,
    });
    let first = l.admit(&[(&key, 100), (&dep, 1)]).await.unwrap();
    first.settle(100);
    let before = l.remaining(&key);
    let err = l.admit(&[(&key, 100), (&dep, 1)]).await.unwrap_err();
    assert_eq!(err.limit, "d:rpm");
    assert_eq!(l.remaining(&key), before, "the key's share was put back");
}

#[tokio::test(start_paused = true)]
async fn settlement_refunds_and_charges_the_difference() {
    let l = memory();
    let t = l.register(tokens("t", 100));
    // Reserve 61 (estimate + max_tokens), use 18: three such requests fit, not one.
    let mut served = 0;
    while let Ok(a) = l.admit(&[(&t, 61)]).await {
        a.settle(18);
        served += 1;
    }
    assert_eq!(served, 3);
    assert_eq!(l.consumed(&t), 54);
    // A request using more than it reserved leaves debt that blocks the next one.
    let l = memory();
    let t = l.register(tokens("t", 100));
    l.admit(&[(&t, 10)]).await.unwrap().settle(95);
    assert!(l.admit(&[(&t, 10)]).await.is_err(), "95 used + 10 > 100");
}

#[tokio::test(start_paused = true)]
async fn unsent_requests_release_and_sent_ones_keep_the_estimate() {
    let l = memory();
    let t = l.register(tokens("t", 50));
    drop(l.admit(&[(&t, 50)]).await.unwrap());
    let mut a = l
        .admit(&[(&t, 50)])
        .await
        .expect("released budget is usable again");
    a.mark_sent();
    drop(a);
    assert_eq!(l.consumed(&t), 50);
    assert!(l.admit(&[(&t, 1)]).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn expired_leases_go_back_to_the_ledger() {
    let ledger = Arc::new(MemoryLedger::new(settings().window));
    let a = Limiter::new(settings(), ledger.clone());
    let b = Limiter::new(settings(), ledger.clone());
    let ta = a.register(tokens("shared", 100));
    let tb = b.register(tokens("shared", 100));
    drop(a.admit(&[(&ta, 100)]).await.unwrap()); // A now holds 100 unused
    assert!(b.admit(&[(&tb, 1)]).await.is_err(), "A holds everything");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(a.clone().run(stop_rx));
    tokio::time::advance(settings().lease_ttl + Duration::from_millis(100)).await;
    tokio::task::yield_now().await;
    // Let the maintenance tick run to completion.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_millis(50)).await;
        tokio::task::yield_now().await;
    }
    assert!(
        b.admit(&[(&tb, 100)]).await.is_ok(),
        "A's unused lease was refunded"
    );
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

/// A ledger that can be switched off, to drive outages, or answer every claim `delay` late
/// (its latency, on the tests' paused clock); it counts the claims reaching it and sums what
/// it granted.
struct Flaky {
    inner: MemoryLedger,
    down: AtomicBool,
    delay: Duration,
    claims: AtomicU64,
    granted: AtomicU64,
}

impl Flaky {
    fn new() -> Arc<Self> {
        Self::slow(Duration::ZERO)
    }

    fn slow(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryLedger::new(settings().window),
            down: AtomicBool::new(false),
            delay,
            claims: AtomicU64::new(0),
            granted: AtomicU64::new(0),
        })
    }
}

#[async_trait]
impl Ledger for Flaky {
    async fn claim(
        &self,
        key: &str,
        limit: u64,
        ask: u64,
        min: u64,
        hold: Duration,
    ) -> Result<Grant, LedgerError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(LedgerError("down".into()));
        }
        self.claims.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let g = self.inner.claim(key, limit, ask, min, hold).await?;
        self.granted.fetch_add(g.granted, Ordering::Relaxed);
        Ok(g)
    }
    async fn refund(&self, key: &str, lease: LeaseRef, amount: u64) -> Result<u64, LedgerError> {
        self.inner.refund(key, lease, amount).await
    }
    async fn heartbeat(&self, _: &str, _: Duration) -> Result<u64, LedgerError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(LedgerError("down".into()));
        }
        Ok(4)
    }
    fn shared(&self) -> bool {
        true
    }
}

async fn outage(mode: OnRedisError) -> (Arc<Limiter>, LimitHandle, Arc<Flaky>) {
    let flaky = Flaky::new();
    let l = Limiter::new(
        Settings {
            on_redis_error: mode,
            ..settings()
        },
        flaky.clone(),
    );
    l.heartbeat().await; // learns N = 4
    assert_eq!((l.replicas(), l.mode(), l.ready()), (4, Mode::Global, true));
    let t = l.register(tokens("t", 100));
    flaky.down.store(true, Ordering::Relaxed);
    (l, t, flaky)
}

#[tokio::test(start_paused = true)]
async fn local_mode_enforces_a_per_replica_share_and_recovers() {
    let (l, t, flaky) = outage(OnRedisError::Local).await;
    let mut got = 0u64;
    while let Ok(a) = l.admit(&[(&t, 5)]).await {
        a.settle(5);
        got += 5;
        assert!(got <= 100, "local mode must enforce a share");
    }
    assert_eq!(got, 25, "100 ÷ 4 replicas");
    assert_eq!(l.mode(), Mode::Local);
    flaky.down.store(false, Ordering::Relaxed);
    tokio::time::advance(BACKOFF_MAX).await;
    assert!(l.admit(&[(&t, 5)]).await.is_ok());
    assert_eq!(l.mode(), Mode::Global, "claims went back to the ledger");
}

#[tokio::test(start_paused = true)]
async fn open_and_closed_modes() {
    let (l, t, _f) = outage(OnRedisError::Open).await;
    for _ in 0..50 {
        l.admit(&[(&t, 10)]).await.unwrap().settle(10);
    }
    assert_eq!(l.mode(), Mode::Open);
    let (l, t, _f) = outage(OnRedisError::Closed).await;
    assert!(l.admit(&[(&t, 1)]).await.is_err());
    assert_eq!(l.mode(), Mode::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_bound_is_replicas_times_the_largest_lease() {
    let (l, t, _f) = outage(OnRedisError::Local).await;
    assert_eq!(l.overshoot_bound(&t), 4 * 5, "5% of 100, four replicas");
    l.admit(&[(&t, 20)]).await.unwrap().settle(20);
    assert_eq!(
        l.overshoot_bound(&t),
        4 * 20,
        "a request larger than the cap is its own lease"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_touching_many_cold_limits_is_admitted_in_one_call() {
    let l = memory();
    let handles: Vec<LimitHandle> = (0..6)
        .map(|i| l.register(tokens(&format!("cold-{i}"), 1_000_000)))
        .collect();
    let costs: Vec<(&LimitHandle, u64)> = handles.iter().map(|h| (h, 100)).collect();
    let a = l.admit(&costs).await.expect("every limit has budget");
    a.settle(100);
    for h in &handles {
        assert_eq!(l.consumed(h), 100);
    }
}

#[tokio::test(start_paused = true)]
async fn a_cold_burst_gets_no_spurious_rejection() {
    // 64 requests hit a cold limit at once: whoever claims on demand keeps what it claimed,
    // so nobody loses its budget to a request that arrived later.
    let l = memory();
    let key = l.register(tokens("k", 1_000_000_000));
    let dep = l.register(LimitSpec {
        id: "d:rpm".into(),
        limit: 1_000_000_000,
        kind: Kind::Requests,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (l, key, dep) = (l.clone(), key.clone(), dep.clone());
        tasks.spawn(async move {
            l.admit(&[(&key, 400), (&dep, 1)])
                .await
                .map(|a| a.settle(380))
                .is_ok()
        });
    }
    let admitted = tasks.join_all().await.into_iter().filter(|ok| *ok).count();
    assert_eq!(admitted, 64);
}

#[tokio::test(start_paused = true)]
async fn a_burst_after_a_quiet_spell_claims_a_few_times_not_per_request() {
    // No maintenance task runs here, so the sampled demand stays at zero, as it decays to on
    // a replica that idled: only the demand seen since the last sample sizes the leases.
    let ledger = Flaky::new();
    let l = Limiter::new(settings(), ledger.clone());
    let t = l.register(tokens("d:tpm", 10_000_000));
    for _ in 0..1000 {
        let a = l.admit(&[(&t, 10)]).await;
        a.expect("budget is plentiful").settle(10);
        tokio::time::advance(Duration::from_micros(500)).await; // 2,000 requests/s
    }
    let claims = ledger.claims.load(Ordering::Relaxed);
    // Leases grow with the burst (10, 100, 1,100, 10,000 tokens); sized by the sampled
    // demand alone, every request would claim its own 10.
    assert!(claims <= 10, "{claims} claims for 1,000 requests");
}

/// A limiter of four replicas over a ledger five times slower than `admit_wait`.
async fn slow(limit: u64) -> (Arc<Limiter>, LimitHandle, Arc<Flaky>) {
    let ledger = Flaky::slow(settings().admit_wait * 5);
    let l = Limiter::new(settings(), ledger.clone());
    l.heartbeat().await;
    assert_eq!(l.replicas(), 4);
    let t = l.register(tokens("t", limit));
    (l, t, ledger)
}

#[tokio::test(start_paused = true)]
async fn a_slow_ledger_serves_on_credit_and_charges_every_credit_to_the_ledger() {
    let (l, t, ledger) = slow(1_000_000).await;
    let mut admitted = 0;
    for _ in 0..200 {
        let started = Instant::now();
        l.admit(&[(&t, 5)])
            .await
            .expect("budget is plentiful")
            .settle(5);
        admitted += 5;
        assert!(
            started.elapsed() <= settings().admit_wait,
            "a request waited {:?} on a slow ledger",
            started.elapsed()
        );
        tokio::time::advance(Duration::from_millis(2)).await;
    }
    // Every claim under way completes.
    tokio::time::advance(Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    let granted = ledger.granted.load(Ordering::Relaxed) as i64;
    // Conservation: what was admitted plus what is held is what the ledger granted, so every
    // credit was repaid from a grant and no budget came from anywhere else. (Served from the
    // local share, as before, the requests that timed out were never charged to the ledger.)
    assert_eq!(admitted + t.0.local.total(), granted);
    assert!(t.0.local.total() >= 0, "no debt left");
}

#[tokio::test(start_paused = true)]
async fn a_slow_ledger_at_the_limit_gives_no_credit_past_it() {
    let (l, t, _ledger) = slow(100).await;
    let window_ends = Instant::now() + settings().window.period;
    let mut admitted = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (l, t) = (l.clone(), t.clone());
        tasks.spawn(async move {
            let ok = l.admit(&[(&t, 5)]).await.map(|a| a.settle(5)).is_ok();
            (ok, Instant::now())
        });
        tokio::time::advance(Duration::from_millis(30)).await;
    }
    for (ok, at) in tasks.join_all().await {
        // Refused requests queue their claims one after another, 100 ms each: the last ones
        // are answered in the next window, with its budget.
        if ok && at < window_ends {
            admitted += 5;
        }
    }
    // One replica alone, within one window: the ledger's 100, and at most the lease this
    // replica may owe on credit (5 % of 100) on top. The local share served after a timeout,
    // as before, added up to 100 ÷ 4 replicas.
    assert!(admitted >= 95, "{admitted}");
    assert!(
        admitted <= 100 + 5,
        "{admitted} admitted against a limit of 100"
    );
}

#[tokio::test(start_paused = true)]
async fn callers_queued_behind_a_refused_claim_take_its_answer() {
    // The limit is spent; then 20 requests at once on a ledger five times slower than
    // `admit_wait`, with no room for credit: one claim is refused, and everyone queued behind
    // it is answered with that refusal, not with a round trip each, one after another.
    let (l, t, _ledger) = slow(100).await;
    while let Ok(a) = l.admit(&[(&t, 20)]).await {
        a.settle(20);
    }
    tokio::time::advance(Duration::from_secs(1)).await; // claims under way finish
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (l, t) = (l.clone(), t.clone());
        tasks.spawn(async move {
            let refused = l.admit(&[(&t, 20)]).await.is_err();
            (refused, started.elapsed())
        });
    }
    let delay = settings().admit_wait * 5;
    for (refused, took) in tasks.join_all().await {
        assert!(refused, "the window is spent");
        // One claim to learn the limit is spent (a second at most, if one caller queued after
        // the first claim was answered): not 20 in a row.
        assert!(took <= delay * 2, "a refusal took {took:?}");
    }
}
