//! Redis that answers slowly (paused with `CLIENT PAUSE`) must not slow the request path:
//! requests are admitted from budget already leased, on credit while a claim is under way, or
//! from the local share once the Redis timeout has marked Redis down; never by waiting Redis
//! out.

use std::process::Command;
use std::time::Duration;

use sluice_testkit::{MockConfig, MockUpstream, RedisServer};
use tokio::time::Instant;

use crate::common::{chat, deployment, Sluice};

/// Sends `n` requests at `rate` per second, returning each one's latency (all must be 200).
async fn timed(s: &Sluice, n: usize, rate: f64) -> Vec<Duration> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        let started = Instant::now();
        let resp = s.chat(chat("m")).await;
        out.push(started.elapsed());
        assert_eq!(resp.status(), 200);
    }
    out
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_does_not_slow_requests_down() {
    let redis = RedisServer::start().unwrap();
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::start(&format!(
        "model_list:\n{}router_settings: {{redis_url: '{}'}}\nlimits: {{redis_timeout: 0.5}}\n",
        deployment("m", "x", &up.base_url(), ", rpm: 1000000, tpm: 100000000"),
        redis.url()
    ))
    .await;
    let before = timed(&s, 200, 200.0).await;
    // Redis stops answering every client for 1.5 s, three times the Redis timeout.
    let paused = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "CLIENT",
            "PAUSE",
            "1500",
            "ALL",
        ])
        .status()
        .unwrap();
    assert!(paused.success());
    let during = timed(&s, 300, 200.0).await;
    let (p50, p99) = (quantile(&before, 0.5), quantile(&before, 0.99));
    let (dp50, dp99, dmax) = (
        quantile(&during, 0.5),
        quantile(&during, 0.99),
        quantile(&during, 1.0),
    );
    eprintln!(
        "slow redis: before p50 {p50:?} p99 {p99:?}; paused p50 {dp50:?} p99 {dp99:?} max {dmax:?}"
    );
    assert!(
        dp99 < p99 + Duration::from_millis(50),
        "p99 went from {p99:?} to {dp99:?} while Redis was paused"
    );
    // Waiting out Redis would take `redis_timeout` (500 ms); `admit_wait` is 25 ms. The margin
    // is for a loaded CI machine, not for Redis.
    assert!(
        dmax < Duration::from_millis(250),
        "a request waited {dmax:?} on a paused Redis"
    );
}

/// Near its limit, a Redis that answers later than `admit_wait` (paused for 300 ms at a time,
/// within the 0.5 s Redis timeout, so it is never marked down) must not let the replica admit
/// past the limit: requests whose claims are slow are served on credit that Redis is charged
/// for, at most one lease ahead. (Served from the local share instead, as before, each slow
/// claim added most of a lease Redis never saw.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_near_the_limit_admits_no_more_than_the_limit() {
    let redis = RedisServer::start().unwrap();
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let limit = 120;
    let s = std::sync::Arc::new(
        Sluice::start(&format!(
            "model_list:\n{}router_settings: {{redis_url: '{}'}}\n\
             limits: {{period: 4, slots: 40, redis_timeout: 0.5}}\n",
            deployment("m", "x", &up.base_url(), &format!(", rpm: {limit}")),
            redis.url()
        ))
        .await,
    );
    let pause = || {
        Command::new("redis-cli")
            .args([
                "-p",
                &redis.port().to_string(),
                "CLIENT",
                "PAUSE",
                "300",
                "ALL",
            ])
            .status()
            .unwrap()
    };
    // Twice the limit, sent over 2.4 s (each request on its own task, so a slow answer does not
    // hold back the next), with Redis paused every 600 ms. Every admission falls within 2.4 s
    // + a Redis timeout of the first: inside one 4 s window.
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = tokio::task::JoinSet::new();
    for i in 0..2 * limit {
        tick.tick().await;
        if i % 60 == 0 {
            assert!(pause().success());
        }
        let s = s.clone();
        sent.spawn(async move { s.chat(chat("m")).await.status().as_u16() });
    }
    let statuses = sent.join_all().await;
    let took = start.elapsed();
    let served = statuses.iter().filter(|s| **s == 200).count() as u64;
    let refused = statuses.iter().filter(|s| **s == 429).count() as u64;
    eprintln!("slow redis at the limit: {served} served, {refused} refused in {took:?}");
    assert_eq!(served + refused, 2 * limit, "{statuses:?}");
    assert!(
        took < Duration::from_secs(4),
        "the run must fit one window: {took:?}"
    );
    // One replica: the limit, plus one lease (5 % of it) held from before and one owed on
    // credit, plus a request for each of two workers checking credit at the same moment.
    let lease = (limit as f64 * 0.05).ceil() as u64;
    assert!(
        served <= limit + 2 * lease + 2,
        "{served} served against a limit of {limit} per window"
    );
    assert!(
        served >= limit * 9 / 10,
        "the limit's budget is used: {served}"
    );
}
