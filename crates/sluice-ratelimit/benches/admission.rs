//! The admission hot path: reserve and settle with budget held locally.
//! `cargo bench -p sluice-ratelimit --bench admission`

// Bench code: a failed unwrap is a failed run; wall-clock timing is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_ratelimit::{Kind, LimitSpec, Limiter, MemoryLedger, Settings, Window};

fn limiter() -> (Arc<Limiter>, sluice_ratelimit::LimitHandle) {
    let settings = Settings {
        window: Window {
            period: Duration::from_secs(60),
            slots: 60,
        },
        max_lease_fraction: 1.0,
        ..Settings::default()
    };
    let l = Limiter::new(
        settings.clone(),
        Arc::new(MemoryLedger::new(settings.window)),
    );
    let h = l.register(LimitSpec {
        id: "bench:tpm".into(),
        limit: u64::MAX / 4,
        kind: Kind::Tokens,
    });
    (l, h)
}

fn admission(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (l, h) = limiter();
    // One large lease up front: the loop then measures only the local path.
    rt.block_on(async { drop(l.admit(&[(&h, 1u64 << 40)]).await.unwrap()) });
    let mut g = c.benchmark_group("admission");
    g.throughput(Throughput::Elements(1));
    g.bench_function("admit+settle, 1 thread", |b| {
        b.iter(|| {
            l.try_admit(&[(&h, 100)]).unwrap().settle(90);
        })
    });
    g.bench_function("admit+settle, 2 threads (per op)", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let (l, h) = (l.clone(), h.clone());
                    s.spawn(move || {
                        for _ in 0..iters / 2 {
                            l.try_admit(&[(&h, 100)]).unwrap().settle(90);
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.bench_function("async admit+settle (local budget), 1 thread", |b| {
        b.iter(|| futures_now(l.admit(&[(&h, 100)])).unwrap().settle(90))
    });
    g.finish();
}

/// Polls a future that completes without waiting (budget is local), with no runtime.
fn futures_now<F: std::future::Future>(f: F) -> F::Output
where
    F::Output: std::fmt::Debug,
{
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("admission waited on the ledger in the hot path"),
    }
}

criterion_group!(benches, admission);
criterion_main!(benches);
