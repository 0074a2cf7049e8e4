//! The mock upstream itself speaks the wire format the proxy tests rely on.

use sluice_testkit::{MockConfig, MockUpstream};

use crate::common::{client, JsonValue};

async fn post(m: &MockUpstream, body: &str) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", m.base_url()))
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_rejects_fields_outside_openais_schema() {
    let m = MockUpstream::start(MockConfig {
        strict: true,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let ok = post(
        &m,
        r#"{"model":"x","messages":[],"temperature":0.2,"user":"u"}"#,
    )
    .await;
    assert_eq!(ok.status(), 200);
    let bad = post(&m, r#"{"model":"x","messages":[],"litellm_params":{}}"#).await;
    assert_eq!(bad.status(), 400);
    let v = bad.json_value().await;
    assert_eq!(
        v["error"]["message"],
        "Unrecognized request argument supplied: litellm_params"
    );
    assert_eq!(m.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_own_rpm_limit_answers_429_with_retry_after() {
    let m = MockUpstream::start(MockConfig {
        rpm_limit: Some(2),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let body = r#"{"model":"x","messages":[]}"#;
    assert_eq!(post(&m, body).await.status(), 200);
    assert_eq!(post(&m, body).await.status(), 200);
    let third = post(&m, body).await;
    assert_eq!(third.status(), 429);
    let retry: u64 = third.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_with_usage_only_when_asked() {
    let m = MockUpstream::start(MockConfig {
        completion_tokens: 9,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let text = |r: reqwest::Response| async move { r.text().await.unwrap() };
    let plain = text(post(&m, r#"{"model":"x","stream":true,"messages":[]}"#).await).await;
    assert!(!plain.contains("usage"));
    let asked = text(
        post(
            &m,
            r#"{"model":"x","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        )
        .await,
    )
    .await;
    let events: Vec<&str> = asked.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let usage: serde_json::Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 9);
    assert_eq!(usage["choices"], serde_json::json!([]));
}
