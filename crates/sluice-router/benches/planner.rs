//! The planner: building a request's chain of candidates and walking it.
//! `cargo bench -p sluice-router --bench planner`

// Bench code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use sluice_router::{Budget, NoBudget, Router};

/// Every deployment has budget left (as the limiter answers for a healthy deployment).
struct Plenty;

impl Budget for Plenty {
    fn remaining(&self, _: &str) -> Option<u64> {
        Some(1_000_000)
    }
}

fn router(strategy: &str) -> Router {
    let mut yaml = String::from("model_list:\n");
    for (group, n) in [("gpt-4o", 4), ("backup", 2)] {
        for i in 0..n {
            yaml.push_str(&format!(
                "  - model_name: {group}\n    litellm_params: {{model: openai/m{i}, api_base: 'http://127.0.0.1:1/v1', weight: {}, tpm: 1000000}}\n",
                i + 1
            ));
        }
    }
    yaml.push_str(&format!(
        "router_settings: {{routing_strategy: {strategy}, num_retries: 2, fallbacks: [{{gpt-4o: [backup]}}]}}\n"
    ));
    Router::new(
        &sluice_config::load_with_env(&yaml, &|_| None)
            .unwrap()
            .config,
    )
}

fn planner(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut g = c.benchmark_group("planner");
    for strategy in ["simple-shuffle", "usage-based-routing-v2", "least-busy"] {
        let r = router(strategy);
        let budget: &dyn Budget = if strategy == "usage-based-routing-v2" {
            &Plenty
        } else {
            &NoBudget
        };
        g.bench_function(format!("{strategy}: chain + first candidate"), |b| {
            b.iter(|| {
                let mut chain = r.chain("gpt-4o", 350, budget, &mut rng).unwrap();
                black_box(chain.next().map(|c| c.deployment.id.len()))
            })
        });
        g.bench_function(format!("{strategy}: whole chain with fallback"), |b| {
            b.iter(|| {
                let chain = r.chain("gpt-4o", 350, budget, &mut rng).unwrap();
                black_box(chain.count())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
