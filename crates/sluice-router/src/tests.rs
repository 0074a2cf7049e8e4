use super::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const BASE: &str = "api_base: 'http://127.0.0.1:1/v1'";

fn router(extra: &str, deployments: &[(&str, &str)]) -> Router {
    let mut yaml = String::from("model_list:\n");
    for (group, params) in deployments {
        yaml.push_str(&format!(
            "  - model_name: {group}\n    litellm_params: {{model: openai/x, {BASE}{params}}}\n"
        ));
    }
    yaml.push_str(extra);
    let config = sluice_config::load_with_env(&yaml, &|_| None)
        .unwrap()
        .config;
    Router::new(&config)
}

fn ids(chain: &mut Chain<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for c in chain.by_ref() {
        out.push(format!("{}:{}", c.deployment.id, c.reason.as_str()));
    }
    out
}

struct Fixed(&'static [(&'static str, u64)]);

impl Budget for Fixed {
    fn remaining(&self, id: &str) -> Option<u64> {
        self.0.iter().find(|(d, _)| *d == id).map(|(_, r)| *r)
    }
}

#[tokio::test(start_paused = true)]
async fn strategies_order_by_their_signal() {
    let three = [("g", ""), ("g", ""), ("g", "")];
    let mut rng = StdRng::seed_from_u64(3);
    // (strategy, how to set the signal up, expected first deployment)
    type Setup = fn(&Router) -> Box<dyn Budget>;
    let cases: [(&str, Setup, &str); 3] = [
        (
            "least-busy",
            |r| {
                // Requests in flight that never finish (guards leaked on purpose).
                std::mem::forget(r.start("g.0"));
                std::mem::forget(r.start("g.0"));
                std::mem::forget(r.start("g.2"));
                Box::new(NoBudget)
            },
            "g.1",
        ),
        (
            "usage-based-routing-v2",
            |_| Box::new(Fixed(&[("g.0", 10), ("g.1", 5), ("g.2", 900)])),
            "g.2",
        ),
        (
            "latency-based-routing",
            |r| {
                r.record_success("g.0", Duration::from_millis(300));
                r.record_success("g.1", Duration::from_millis(40));
                r.record_success("g.2", Duration::from_millis(90));
                Box::new(NoBudget)
            },
            "g.1",
        ),
    ];
    for (strategy, setup, first) in cases {
        let r = router(
            &format!("router_settings: {{routing_strategy: {strategy}}}\n"),
            &three,
        );
        let budget = setup(&r);
        for _ in 0..10 {
            let mut chain = r.chain("g", 1, budget.as_ref(), &mut rng).unwrap();
            assert_eq!(chain.next().unwrap().deployment.id, first, "{strategy}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn order_beats_strategy_and_weights_bias_the_shuffle() {
    let r = router(
        "",
        &[
            ("g", ", weight: 3, order: 2"),
            ("g", ", weight: 1, order: 2"),
            ("g", ", order: 1"),
        ],
    );
    let mut rng = StdRng::seed_from_u64(9);
    let mut first_heavy = 0;
    for _ in 0..4000 {
        let mut chain = r.chain("g", 1, &NoBudget, &mut rng).unwrap();
        assert_eq!(chain.next().unwrap().deployment.id, "g.2", "order 1 first");
        if chain.next().unwrap().deployment.id == "g.0" {
            first_heavy += 1;
        }
    }
    let share = f64::from(first_heavy) / 4000.0;
    assert!((0.72..0.78).contains(&share), "3:1 weights gave {share}");
}

#[tokio::test(start_paused = true)]
async fn the_chain_walks_groups_in_configured_order_once_each() {
    let r = router(
        "router_settings: {fallbacks: [{a: [b, c]}, {b: [a]}], default_fallbacks: [c, d], num_retries: 9}\n",
        &[("a", ""), ("b", ""), ("c", ""), ("d", "")],
    );
    let mut rng = StdRng::seed_from_u64(1);
    let mut chain = r.chain("a", 1, &NoBudget, &mut rng).unwrap();
    assert_eq!(
        ids(&mut chain),
        [
            "a.0:primary",
            "b.0:fallback",
            "c.0:fallback",
            "d.0:fallback"
        ]
    );
    assert!(r.chain("nope", 1, &NoBudget, &mut rng).is_none());
}

#[tokio::test(start_paused = true)]
async fn health_table() {
    // (allowed_fails, failures recorded, retry_after, cooling down?)
    let cases: &[(u32, usize, Option<u64>, bool)] = &[
        (2, 1, None, false),
        (2, 2, None, false),
        (2, 3, None, true),
        (0, 1, None, true),
        (5, 1, Some(30), true),
    ];
    for &(allowed, fails, retry, cooled) in cases {
        let r = router(
            &format!("router_settings: {{allowed_fails: {allowed}, cooldown_time: 10, fallbacks: [{{a: [b]}}]}}\n"),
            &[("a", ""), ("b", "")],
        );
        for _ in 0..fails {
            r.record_failure("a.0", retry.map(Duration::from_secs));
        }
        assert_eq!(
            r.cooldown("a.0").is_some(),
            cooled,
            "{allowed}/{fails}/{retry:?}"
        );
        let mut rng = StdRng::seed_from_u64(1);
        let mut chain = r.chain("a", 1, &NoBudget, &mut rng).unwrap();
        let first = chain.next().unwrap().deployment.id.clone();
        assert_eq!(
            first == "b.0",
            cooled,
            "a cooling deployment is skipped, not tried"
        );
        if cooled {
            assert_eq!(chain.skipped, [("a.0", Skip::Cooldown)]);
            let left = r.cooldown("a.0").unwrap();
            let want = Duration::from_secs(retry.unwrap_or(10));
            assert!(
                left <= want && left > want - Duration::from_millis(10),
                "{left:?}"
            );
            tokio::time::advance(want).await;
            assert!(r.cooldown("a.0").is_none(), "the cooldown ends");
            assert_eq!(r.cooldowns("a.0"), 1);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failures_older_than_a_minute_do_not_count() {
    let r = router("router_settings: {allowed_fails: 1}\n", &[("a", "")]);
    r.record_failure("a.0", None);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(!r.record_failure("a.0", None));
    assert!(r.record_failure("a.0", None));
}

#[tokio::test(start_paused = true)]
async fn context_window_and_content_policy_fallbacks() {
    let r = router(
        "router_settings: {fallbacks: [{small: [other]}], context_window_fallbacks: [{small: [big]}], content_policy_fallbacks: [{small: [safe]}]}\n",
        &[
            ("small", ""),
            ("small", "}\n    model_info: {max_input_tokens: 100"),
            ("big", ""),
            ("other", ""),
            ("safe", ""),
        ],
    );
    let mut rng = StdRng::seed_from_u64(2);
    // A 500-token prompt skips the 100-token deployment; the context-window group comes
    // before the ordinary fallbacks.
    let mut chain = r.chain("small", 500, &NoBudget, &mut rng).unwrap();
    assert_eq!(
        ids(&mut chain),
        [
            "small.0:primary",
            "big.0:context_window",
            "other.0:fallback"
        ]
    );
    assert_eq!(chain.skipped, [("small.1", Skip::ContextWindow)]);
    // A short prompt: no context-window group unless the upstream says so.
    let mut chain = r.chain("small", 10, &NoBudget, &mut rng).unwrap();
    let first = chain.next().unwrap();
    assert_eq!(first.group, "small");
    chain.next();
    assert!(chain.escalate(Reason::ContentPolicy, &NoBudget, &mut rng));
    assert_eq!(
        ids(&mut chain),
        ["safe.0:content_policy", "other.0:fallback"]
    );
    let mut chain = r.chain("small", 10, &NoBudget, &mut rng).unwrap();
    chain.next();
    assert!(chain.escalate(Reason::ContextWindow, &NoBudget, &mut rng));
    assert_eq!(
        chain.next().unwrap().group,
        "big",
        "escalated groups come next"
    );
}

#[tokio::test(start_paused = true)]
async fn one_attempt_budget_for_the_whole_chain() {
    let r = router(
        "router_settings: {num_retries: 2, fallbacks: [{a: [b, c, d]}]}\n",
        &[("a", ""), ("b", ""), ("c", ""), ("d", "")],
    );
    let mut rng = StdRng::seed_from_u64(1);
    let mut chain = r.chain("a", 1, &NoBudget, &mut rng).unwrap();
    let mut tried = Vec::new();
    while let Some(c) = chain.next() {
        tried.push(c.group);
        chain.attempted();
    }
    assert_eq!(tried, ["a", "b", "c"], "num_retries 2 = 3 attempts");
    // Skipped candidates (no budget) cost no attempt.
    let mut chain = r.chain("a", 1, &NoBudget, &mut rng).unwrap();
    let mut seen = 0;
    while chain.next().is_some() {
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_the_whole_chain() {
    let r = router(
        "router_settings: {timeout: 5, fallbacks: [{a: [b]}]}\n",
        &[("a", ""), ("b", "")],
    );
    let mut rng = StdRng::seed_from_u64(1);
    let mut chain = r.chain("a", 1, &NoBudget, &mut rng).unwrap();
    assert!(chain.next().is_some());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(
        chain.next().is_none(),
        "no fresh deadline for the fallback group"
    );
}

#[test]
fn retry_after_sources() {
    let h = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    assert_eq!(
        retry_after(h(&[("retry-after", "30")])),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        retry_after(h(&[("retry-after-ms", "1500")])),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        retry_after(h(&[
            ("x-ratelimit-reset-requests", "1m2.5s"),
            ("x-ratelimit-reset-tokens", "20ms")
        ])),
        Some(Duration::from_millis(62_500))
    );
    assert_eq!(
        retry_after(h(&[("x-ratelimit-reset-tokens", "6m0s")])),
        Some(Duration::from_secs(360))
    );
    assert_eq!(
        retry_after(h(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])),
        None
    );
    assert_eq!(retry_after(h(&[])), None);
}
