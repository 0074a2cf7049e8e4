//! Fallback-aware selection: look before you leap (issue 4's acceptance tests).

use std::time::Duration;

use sluice_testkit::{MockConfig, MockUpstream};
use tokio::time::Instant;

use crate::common::{chat, client, deployment, error_body, Sluice};

async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start(config).await.unwrap()
}

fn failing(status: u16) -> MockConfig {
    MockConfig {
        status: Some(status),
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_group_is_never_pushed_into_its_own_rate_limit() {
    let latency = Duration::from_millis(400);
    let a = mock(MockConfig {
        latency,
        ..MockConfig::default()
    })
    .await;
    let b = mock(MockConfig {
        latency,
        rpm_limit: Some(20),
        ..MockConfig::default()
    })
    .await;
    let yaml = format!(
        "model_list:\n{}{}router_settings: {{fallbacks: [{{A: [B]}}]}}\n",
        deployment("A", "a", &a.base_url(), ", rpm: 10"),
        deployment("B", "b", &b.base_url(), ", rpm: 20"),
    );
    let s = Sluice::start(&yaml).await;
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let req = c.post(s.url("/v1/chat/completions")).body(chat("A"));
        tasks.spawn(async move {
            let start = Instant::now();
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let _ = resp.bytes().await;
            (status, retry, start.elapsed())
        });
    }
    let results = tasks.join_all().await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    eprintln!(
        "A served {}, B served {}, Sluice 429s {}",
        a.calls(),
        b.calls(),
        limited.len()
    );
    assert_eq!((a.calls(), b.calls()), (10, 20));
    assert_eq!(ok, 30);
    assert_eq!(limited.len(), 30, "the rest get Sluice's 429: {results:?}");
    for (_, retry, took) in &limited {
        assert!(retry.as_deref().unwrap().parse::<u64>().unwrap() >= 1);
        assert!(
            *took < latency,
            "a 429 must not wait for an upstream: {took:?}"
        );
    }
    // B's provider enforces 20 RPM itself and never had to refuse anything.
    assert_eq!(
        results.iter().filter(|r| r.0 != 200 && r.0 != 429).count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deployment_cools_down_and_its_traffic_moves_whole() {
    let bad = mock(failing(500)).await;
    let good = mock(MockConfig::default()).await;
    let yaml = format!(
        "model_list:\n{}{}router_settings: {{allowed_fails: 2, cooldown_time: 60, fallbacks: [{{a: [b]}}]}}\n",
        deployment("a", "x", &bad.base_url(), ""),
        deployment("b", "y", &good.base_url(), ""),
    );
    let s = Sluice::start(&yaml).await;
    let content = "q".repeat(300 * 1024);
    let body = format!(r#"{{"model":"a","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    for _ in 0..6 {
        let resp = s.chat(body.clone()).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-sluice-deployment"], "b.0");
    }
    assert_eq!(
        bad.calls(),
        3,
        "allowed_fails + 1 attempts, then cooled down"
    );
    assert_eq!(good.calls(), 6);
    for r in good.requests() {
        assert_eq!(
            r.json()["messages"][0]["content"].as_str().unwrap().len(),
            content.len()
        );
    }
    assert!(s.gateway.cooldown("a.0").is_some());
    let metrics = client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "sluice_deployment_state{deployment=\"a.0\"} 1",
        "sluice_deployment_cooldowns_total{deployment=\"a.0\"} 1",
        "sluice_fallbacks_total{from=\"a\",reason=\"fallback\",to=\"b\"} 6",
        "sluice_skips_total{deployment=\"a.0\",reason=\"cooldown\"} 3",
    ] {
        assert!(metrics.contains(line), "missing `{line}`:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_sets_the_cooldown() {
    let limited = mock(MockConfig {
        status: Some(429),
        retry_after: Some(30),
        ..MockConfig::default()
    })
    .await;
    let other = mock(MockConfig::default()).await;
    let yaml = format!(
        "model_list:\n{}{}",
        deployment("g", "x", &limited.base_url(), ", order: 1"),
        deployment("g", "y", &other.base_url(), ", order: 2"),
    );
    let s = Sluice::start(&yaml).await;
    for _ in 0..5 {
        let resp = s.chat(chat("g")).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        (limited.calls(), other.calls()),
        (1, 5),
        "not tried again while cooling down"
    );
    let left = s.gateway.cooldown("g.0").unwrap();
    assert!(
        left > Duration::from_secs(28) && left <= Duration::from_secs(30),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_share_traffic_three_to_one() {
    let heavy = mock(MockConfig::default()).await;
    let light = mock(MockConfig::default()).await;
    let yaml = format!(
        "model_list:\n{}{}",
        deployment("g", "x", &heavy.base_url(), ", weight: 3"),
        deployment("g", "y", &light.base_url(), ", weight: 1"),
    );
    let s = Sluice::start(&yaml).await;
    for _ in 0..1000 {
        let resp = s.chat(chat("g")).await;
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await;
    }
    let share = heavy.calls() as f64 / 1000.0;
    eprintln!(
        "3:1 weights: {} / {} ({share:.3})",
        heavy.calls(),
        light.calls()
    );
    assert!(
        (0.675..=0.825).contains(&share),
        "heavy share {share} not within ±10% of 0.75"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_failing_groups_spends_one_retry_budget() {
    let mocks = [
        mock(failing(503)).await,
        mock(failing(503)).await,
        mock(failing(503)).await,
        mock(failing(503)).await,
    ];
    let mut yaml = String::from("model_list:\n");
    for (name, m) in ["a", "b", "c", "d"].iter().zip(&mocks) {
        yaml.push_str(&deployment(name, "x", &m.base_url(), ""));
    }
    yaml.push_str("router_settings: {num_retries: 2, fallbacks: [{a: [b, c, d]}]}\n");
    let s = Sluice::start(&yaml).await;
    let resp = s.chat(chat("a")).await;
    let calls: Vec<usize> = mocks.iter().map(MockUpstream::calls).collect();
    assert_eq!(
        calls,
        [1, 1, 1, 0],
        "exactly num_retries + 1 attempts for the whole chain"
    );
    assert_eq!(
        resp.headers()["x-sluice-deployment"],
        "c.0",
        "the last upstream answer is passed on"
    );
    error_body(resp, 503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_window_and_content_policy_fallbacks_route_correctly() {
    let small = mock(MockConfig::default()).await;
    let short = mock(MockConfig {
        status: Some(400),
        error_code: Some("context_length_exceeded".into()),
        ..MockConfig::default()
    })
    .await;
    let filtered = mock(MockConfig {
        status: Some(400),
        error_code: Some("content_filter".into()),
        ..MockConfig::default()
    })
    .await;
    let big = mock(MockConfig {
        name: "big".into(),
        ..MockConfig::default()
    })
    .await;
    let safe = mock(MockConfig {
        name: "safe".into(),
        ..MockConfig::default()
    })
    .await;
    let mut yaml = format!(
        "model_list:\n  - model_name: small\n    litellm_params: {{model: openai/s, api_base: '{}'}}\n    model_info: {{max_input_tokens: 50}}\n",
        small.base_url()
    );
    yaml.push_str(&deployment("short", "x", &short.base_url(), ""));
    yaml.push_str(&deployment("filtered", "x", &filtered.base_url(), ""));
    yaml.push_str(&deployment("big", "x", &big.base_url(), ""));
    yaml.push_str(&deployment("safe", "x", &safe.base_url(), ""));
    yaml.push_str(
        "router_settings:\n  context_window_fallbacks: [{small: [big]}, {short: [big]}]\n  content_policy_fallbacks: [{filtered: [safe]}]\n",
    );
    let s = Sluice::start(&yaml).await;
    let long = format!(
        r#"{{"model":"small","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "w ".repeat(400)
    );
    let served_by = |resp: &reqwest::Response| {
        resp.headers()["x-sluice-deployment"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    // Known too long for `small` (max_input_tokens): skipped without a call.
    let resp = s.chat(long).await;
    assert_eq!(
        (resp.status().as_u16(), served_by(&resp)),
        (200, "big.0".to_owned())
    );
    assert_eq!(small.calls(), 0);
    // Too long as the upstream says: context_length_exceeded → the context-window group.
    let resp = s.chat(chat("short")).await;
    assert_eq!(
        (resp.status().as_u16(), served_by(&resp)),
        (200, "big.0".to_owned())
    );
    // A content filter refusal → the content-policy group.
    let resp = s.chat(chat("filtered")).await;
    assert_eq!(
        (resp.status().as_u16(), served_by(&resp)),
        (200, "safe.0".to_owned())
    );
    assert_eq!(
        (short.calls(), filtered.calls(), big.calls(), safe.calls()),
        (1, 1, 2, 1)
    );
    // Neither kind of 400 counts against a deployment's health.
    assert!(s.gateway.cooldown("short.0").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_first_byte_a_broken_stream_ends_with_an_error_event() {
    let broken = mock(MockConfig {
        stream_break: true,
        ..MockConfig::default()
    })
    .await;
    let spare = mock(MockConfig::default()).await;
    let yaml = format!(
        "model_list:\n{}{}",
        deployment("g", "x", &broken.base_url(), ", order: 1"),
        deployment("g", "y", &spare.base_url(), ", order: 2"),
    );
    let s = Sluice::start(&yaml).await;
    let resp = s.chat(r#"{"model":"g","stream":true,"messages":[]}"#).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.contains("upstream_stream_broken"), "{text}");
    assert_eq!(spare.calls(), 0, "no retry once bytes reached the client");
}
