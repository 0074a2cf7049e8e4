//! G3: Redis commands per admitted request at ample budget, with a real `redis-server`.
//! `cargo bench -p sluice-ratelimit --bench redis_commands`
//!
//! Two tasks admit (and settle) requests at a steady rate against one limit whose budget is
//! ample; the limiter's maintenance loop runs as in production. Redis's own command counter
//! (`INFO stats`) is read before and after.

// Bench code: a failed unwrap is a failed run; wall-clock timing is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use sluice_ratelimit::{Kind, LimitSpec, Limiter, RedisLedger, Settings, Window};
use sluice_testkit::RedisServer;

/// Commands Redis received from clients: every script call (`EVALSHA`/`EVAL`, one round trip
/// each) plus `SCRIPT` loads. Commands a script runs inside Redis are not round trips and are
/// not counted (`total_commands_processed` would count them).
fn client_commands(port: u16) -> u64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"INFO commandstats\r\n").unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.lines()
        .filter(|l| {
            [
                "cmdstat_evalsha:",
                "cmdstat_eval:",
                "cmdstat_script|load:",
                "cmdstat_script:",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn main() {
    let redis = RedisServer::start().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let window = Window {
            period: Duration::from_secs(60),
            slots: 60,
        };
        let settings = Settings {
            window,
            ..Settings::default()
        };
        let ledger = Arc::new(RedisLedger::new(
            &redis.url(),
            window,
            Duration::from_millis(500),
        ));
        let limiter = Limiter::new(settings, ledger);
        let limit = limiter.register(LimitSpec {
            id: "bench:tpm".into(),
            limit: 1_000_000_000,
            kind: Kind::Tokens,
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let maintenance = tokio::spawn(limiter.clone().run(stop_rx));
        for (rate, secs) in [(2_000u64, 10u64), (20_000, 10)] {
            let before = client_commands(redis.port());
            let claims_before = limiter.claims();
            let per_task = rate / 2;
            let mut tasks = Vec::new();
            for _ in 0..2 {
                let (l, h) = (limiter.clone(), limit.clone());
                tasks.push(tokio::spawn(async move {
                    // Batches every millisecond: `per_task / 1000` admissions each.
                    let mut tick = tokio::time::interval(Duration::from_millis(1));
                    let per_tick = (per_task / 1000).max(1);
                    let mut n = 0u64;
                    for _ in 0..secs * 1000 {
                        tick.tick().await;
                        for _ in 0..per_tick {
                            l.admit(&[(&h, 500)]).await.unwrap().settle(450);
                            n += 1;
                        }
                    }
                    n
                }));
            }
            let mut admitted = 0;
            for t in tasks {
                admitted += t.await.unwrap();
            }
            let commands = client_commands(redis.port()) - before;
            println!(
                "{rate} admissions/s for {secs} s: {admitted} admitted, {commands} Redis calls \
                 ({} claims, the rest refunds and heartbeats) = {:.4} per admitted request",
                limiter.claims() - claims_before,
                commands as f64 / admitted as f64
            );
        }
        stop_tx.send(true).unwrap();
        maintenance.await.unwrap();
    });
}
