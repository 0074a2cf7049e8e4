//! The outbound allow-list: nothing internal or unknown reaches a provider.

use sluice_testkit::{MockConfig, MockUpstream};

use crate::common::{client, deployment, error_body, Sluice};

const LEAKY: &str = r#"{"model":"g","messages":[{"role":"user","content":"hi"}],
    "temperature":0.3,"user":"u-1",
    "_litellm_rate_limit_descriptors":[{"key":"k","value":"v"}],
    "litellm_params":{"api_key":"sk-leak"},"api_base":"http://169.254.169.254",
    "metadata_internal":{"team":"a"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leak_scenario_falls_back_to_a_strict_provider_cleanly() {
    let primary = MockUpstream::start(MockConfig {
        status: Some(401),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let strict = MockUpstream::start(MockConfig {
        strict: true,
        api_key: Some("sk-strict".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        "model_list:\n{}{}general_settings: {{master_key: sk-m}}\nkeys:\n  - {{key: sk-team, key_alias: team, tpm_limit: 100000, rpm_limit: 100}}\n",
        deployment("g", "primary", &primary.base_url(), ", api_key: sk-p, order: 1"),
        deployment("g", "fallback", &strict.base_url(), ", api_key: sk-strict, order: 2"),
    );
    let s = Sluice::start(&yaml).await;
    for _ in 0..5 {
        let resp = client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth("sk-team")
            .header("X-Sluice-Debug", "1")
            .header("Cookie", "session=abc")
            .header("OpenAI-Beta", "assistants=v2")
            .body(LEAKY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    // allowed_fails (3) + 1 failures cool the primary down: the fifth request skips it.
    assert_eq!(
        (primary.calls(), strict.calls()),
        (4, 5),
        "every request fell back after the 401"
    );
    for r in primary.requests().iter().chain(strict.requests().iter()) {
        let v = r.json();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["messages", "model", "temperature", "user"], "{v}");
        assert_eq!(
            (v["temperature"].as_f64(), v["user"].as_str()),
            (Some(0.3), Some("u-1"))
        );
        for h in ["x-sluice-debug", "cookie"] {
            assert!(r.headers.get(h).is_none(), "{h} went upstream");
        }
        assert_eq!(r.headers["openai-beta"], "assistants=v2");
        assert!(!format!("{:?}", r.headers).contains("sk-team"));
    }
    assert_eq!(
        strict.requests()[0].headers["authorization"],
        "Bearer sk-strict"
    );
    let metrics = client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (field, n) in [("api_base", 9), ("metadata_internal", 9), ("other", 18)] {
        // 9 bodies sent; `_litellm_…` and `litellm_params` are not in the tables, so they
        // count as `other` (client-chosen names never become labels).
        let line = format!("sluice_filter_dropped_fields_total{{endpoint=\"chat_completions\",field=\"{field}\"}} {n}");
        assert!(metrics.contains(&line), "missing `{line}` in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_refuses_unknown_fields_by_name() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "model_list:\n{}filter: {{unknown_fields: reject}}\n",
        deployment("g", "x", &up.base_url(), "")
    );
    let s = Sluice::start(&yaml).await;
    let send = |body: &'static str| {
        client()
            .post(s.url("/v1/chat/completions"))
            .body(body)
            .send()
    };
    let v = error_body(
        send(r#"{"model":"g","messages":[],"frobnicate":1}"#)
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(v["error"]["param"], "frobnicate");
    assert_eq!(
        v["error"]["message"],
        "Unrecognized request argument supplied: frobnicate"
    );
    assert_eq!(up.calls(), 0);
    // Internal fields are dropped, never a reason to refuse.
    let ok = send(r#"{"model":"g","messages":[],"_trace":1,"api_key":"x"}"#)
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(up.requests()[0].json().as_object().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extras_drops_and_provider_defaults_per_deployment() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let b = up.base_url();
    let yaml = format!(
        "model_list:\n  - model_name: vllm\n    litellm_params: {{model: hosted_vllm/llama, api_base: '{b}', additional_drop_params: [logit_bias]}}\n    sluice: {{extra_allowed_fields: [top_k, guided_json, api_key]}}\n{}",
        deployment("oai", "gpt", &b, ", organization: org-42"),
    );
    let s = Sluice::start(&yaml).await;
    let body = |g: &str| {
        format!(
            r#"{{"model":"{g}","messages":[],"top_k":5,"guided_json":{{"type":"object"}},"logit_bias":{{"1":2}},"metadata":{{"a":"b"}},"store":true,"temperature":1,"api_key":"sk-x"}}"#
        )
    };
    for g in ["vllm", "oai"] {
        let resp = s.chat(body(g)).await;
        assert_eq!(resp.status(), 200);
    }
    let keys = |i: usize| {
        let v = up.requests()[i].json();
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort_unstable();
        k
    };
    // vLLM: its extras pass, the configured drop and OpenAI-only fields do not, and the
    // credential stays behind even though the config lists it.
    assert_eq!(
        keys(0),
        ["guided_json", "messages", "model", "temperature", "top_k"]
    );
    // OpenAI: metadata and store pass, vLLM's extensions do not.
    assert_eq!(
        keys(1),
        [
            "logit_bias",
            "messages",
            "metadata",
            "model",
            "store",
            "temperature"
        ]
    );
    assert_eq!(up.requests()[1].headers["openai-organization"], "org-42");
    assert!(up.requests()[0]
        .headers
        .get("openai-organization")
        .is_none());
}
