//! Every refusal in OpenAI's error shape, with the right status.

use std::time::Duration;

use sluice_testkit::{free_port, MockConfig, MockUpstream};

use crate::common::{chat, client, deployment, error_body, Sluice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "model_list:\n{}{}server: {{max_body_bytes: 4096}}\ngeneral_settings: {{master_key: sk-m}}\nkeys:\n  - {{key: sk-only-a, models: [a]}}\n",
        deployment("a", "x", &up.base_url(), ""),
        deployment("b", "y", &up.base_url(), ""),
    );
    let s = Sluice::start(&yaml).await;
    let c = client();
    let post = |body: String, key: Option<&'static str>| {
        let mut r = c.post(s.url("/v1/chat/completions")).body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let v = error_body(post(chat("a"), None).await.unwrap(), 401).await;
    assert_eq!(v["error"]["type"], "authentication_error");
    let v = error_body(post(chat("a"), Some("sk-wrong")).await.unwrap(), 401).await;
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(
        !v.to_string().contains("sk-wrong"),
        "the key must not be echoed"
    );
    let v = error_body(
        post("{\"model\": ".into(), Some("sk-m")).await.unwrap(),
        400,
    )
    .await;
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let v = error_body(
        post(r#"{"messages":[]}"#.into(), Some("sk-m"))
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(v["error"]["param"], "model");
    let v = error_body(post(chat("nope"), Some("sk-m")).await.unwrap(), 404).await;
    assert_eq!(v["error"]["code"], "model_not_found");
    let v = error_body(post(chat("b"), Some("sk-only-a")).await.unwrap(), 403).await;
    assert_eq!(v["error"]["type"], "permission_error");
    let big = format!(
        r#"{{"model":"a","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    let v = error_body(post(big, Some("sk-m")).await.unwrap(), 413).await;
    assert_eq!(v["error"]["code"], "request_too_large");
    let v = error_body(c.get(s.url("/v1/nothing")).send().await.unwrap(), 404).await;
    assert_eq!(v["error"]["code"], "unknown_url");
    error_body(
        c.get(s.url("/v1/chat/completions")).send().await.unwrap(),
        405,
    )
    .await;
    assert_eq!(up.calls(), 0, "no refused request reached the upstream");
    // A request that fits still works on the same server.
    assert_eq!(
        post(chat("a"), Some("sk-only-a")).await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_unreachable_is_502_and_timeout_is_504() {
    let closed = format!("http://127.0.0.1:{}/v1", free_port().unwrap());
    let slow = MockUpstream::start(MockConfig {
        latency: Duration::from_secs(5),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        "model_list:\n{}{}",
        deployment("down", "x", &closed, ""),
        deployment("slow", "x", &slow.base_url(), ", timeout: 0.3"),
    );
    let s = Sluice::start(&yaml).await;
    let v = error_body(s.chat(chat("down")).await, 502).await;
    assert_eq!(v["error"]["type"], "api_error");
    let v = error_body(s.chat(chat("slow")).await, 504).await;
    assert_eq!(v["error"]["code"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_on_the_last_candidate_passes_through() {
    let up = MockUpstream::start(MockConfig {
        status: Some(429),
        retry_after: Some(11),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let fine = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::start(&format!(
        "model_list:\n{}{}",
        deployment("m", "x", &up.base_url(), ""),
        deployment("ok", "x", &fine.base_url(), "")
    ))
    .await;
    let resp = s.chat(chat("m")).await;
    assert_eq!(resp.headers()["retry-after"], "11");
    // The upstream's own id is passed on under another name, Sluice's is the answer's; the
    // same for a relayed success.
    for resp in [&resp, &s.chat(chat("ok")).await] {
        let h = resp.headers();
        assert_eq!(h["x-upstream-request-id"], "req_mock", "{h:?}");
        assert_ne!(h["x-request-id"], "req_mock", "{h:?}");
        assert_eq!(h.get_all("x-request-id").iter().count(), 1, "{h:?}");
        assert_eq!(h["content-type"], "application/json");
    }
    let v = error_body(resp, 429).await;
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
}
