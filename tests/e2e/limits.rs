//! Limits on one replica (in-process ledger): reservation, settlement, 429s, headers.

use sluice_testkit::{MockConfig, MockUpstream};

use crate::common::{chat, client, deployment, error_body, JsonValue, Sluice};

/// `[{"role":"user","content":"hi"}]` is 32 bytes: 8 prompt tokens, as the mock counts too.
const PROMPT_TOKENS: u64 = 8;

fn body(group: &str, max_tokens: u64, stream: bool) -> String {
    format!(
        r#"{{"model":"{group}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{max_tokens},"stream":{stream}}}"#
    )
}

async fn settles_to_usage(stream: bool) {
    let up = MockUpstream::start(MockConfig {
        completion_tokens: 7,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        "model_list:\n{}general_settings: {{master_key: sk-m}}\nkeys:\n  - {{key: sk-a, key_alias: team, tpm_limit: 100}}\n",
        deployment("m", "x", &up.base_url(), "")
    );
    let s = Sluice::start(&yaml).await;
    // Each request reserves 8 + 50 = 58 and uses 8 + 7 = 15. Settling to usage lets three
    // through (15·k + 58 ≤ 100 for k ≤ 2); keeping the reservation would let only one.
    let mut ok = 0;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let resp = client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth("sk-a")
            .body(body("m", 50, stream))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 200 {
            ok += 1;
            let text = resp.text().await.unwrap();
            if stream {
                assert!(
                    !text.contains("\"usage\""),
                    "usage chunk the client did not ask for"
                );
                assert!(text.trim_end().ends_with("data: [DONE]"));
            }
        } else {
            assert!(
                resp.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
            assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "100");
            let v = error_body(resp, 429).await;
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429], "stream={stream}");
    assert_eq!(ok, 3);
    assert_eq!(up.calls(), 3, "refused requests never reach the upstream");
    if stream {
        for r in up.requests() {
            assert_eq!(r.json()["stream_options"]["include_usage"], true);
        }
    }
    let scope = s.gateway.limiter_handle("key:team:tpm").unwrap();
    assert_eq!(
        s.gateway.limiter().consumed(&scope),
        3 * (PROMPT_TOKENS + 7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_responses_settle_to_their_usage() {
    settles_to_usage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_settle_to_their_final_usage_chunk() {
    settles_to_usage(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_out_of_budget_is_skipped_before_anything_is_sent() {
    let a = MockUpstream::start(MockConfig::default()).await.unwrap();
    let b = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "model_list:\n{}{}",
        deployment("g", "a", &a.base_url(), ", rpm: 2, order: 1"),
        deployment("g", "b", &b.base_url(), ", rpm: 3, order: 2"),
    );
    let s = Sluice::start(&yaml).await;
    let mut served_by = Vec::new();
    for _ in 0..6 {
        let resp = s.chat(chat("g")).await;
        if resp.status() == 200 {
            served_by.push(
                resp.headers()["x-sluice-deployment"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
            assert!(resp
                .headers()
                .contains_key("x-ratelimit-remaining-requests"));
        } else {
            let limit = resp.headers()["x-ratelimit-limit-requests"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(limit == "2" || limit == "3", "{limit}");
            error_body(resp, 429).await;
        }
    }
    assert_eq!(served_by, ["g.0", "g.0", "g.1", "g.1", "g.1"]);
    assert_eq!(
        (a.calls(), b.calls()),
        (2, 3),
        "no request sent to a deployment without budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_key_limits_apply_to_their_model_only() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "model_list:\n{}{}general_settings: {{master_key: sk-m}}\nkeys:\n  - {{key: sk-a, key_alias: t, model_rpm_limit: {{small: 1}}}}\n",
        deployment("small", "x", &up.base_url(), ""),
        deployment("big", "y", &up.base_url(), ""),
    );
    let s = Sluice::start(&yaml).await;
    let send = |g: &'static str, key: &'static str| {
        client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(key)
            .body(chat(g))
            .send()
    };
    assert_eq!(send("small", "sk-a").await.unwrap().status(), 200);
    assert_eq!(send("small", "sk-a").await.unwrap().status(), 429);
    assert_eq!(send("big", "sk-a").await.unwrap().status(), 200);
    assert_eq!(
        send("small", "sk-m").await.unwrap().status(),
        200,
        "the master key is not the key"
    );
    let v = send("big", "sk-a").await.unwrap().json_value().await;
    assert_eq!(v["object"], "chat.completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_and_upstream_connections_survive_a_reload() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let one = format!(
        "model_list:\n{}",
        deployment("m", "x", &up.base_url(), ", rpm: 2")
    );
    let s = Sluice::start(&one).await;
    for _ in 0..2 {
        assert_eq!(s.chat(chat("m")).await.status(), 200);
    }
    assert_eq!(s.chat(chat("m")).await.status(), 429);
    let connections = up.connections();
    // The same limits plus a new group.
    let two = format!("{one}{}", deployment("n", "y", &up.base_url(), ""));
    let config = sluice_config::load_with_env(&two, &|_| None)
        .unwrap()
        .config;
    s.gateway.reload(config);
    assert_eq!(
        s.chat(chat("m")).await.status(),
        429,
        "the window's budget was not reset by the reload"
    );
    assert_eq!(s.chat(chat("n")).await.status(), 200);
    assert_eq!(
        up.connections(),
        connections,
        "the pooled upstream connection was reused"
    );
}
