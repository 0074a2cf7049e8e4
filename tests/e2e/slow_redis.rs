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
