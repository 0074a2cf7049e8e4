//! Upstreams that misbehave: every fault ends in a clear answer (or a fallback), in bounded
//! time, with the reservation released (nothing was sent) or settled (something was).

use std::time::Duration;

use sluice_testkit::{free_port, Fault, MockConfig, MockUpstream};
use tokio::time::Instant;

use crate::common::{client, deployment, error_body, JsonValue, Sluice};

/// `[{"role":"user","content":"hi"}]` is 32 bytes: 8 prompt tokens by Sluice's estimate.
const PROMPT_TOKENS: u64 = 8;
const MAX_TOKENS: u64 = 200;
/// What a request reserves: the prompt estimate + `max_tokens`.
const ESTIMATE: u64 = PROMPT_TOKENS + MAX_TOKENS;
const TPM: u64 = 1_000_000;

fn body(group: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{group}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{MAX_TOKENS},"stream":{stream}}}"#
    )
}

async fn faulty(fault: Fault) -> MockUpstream {
    MockUpstream::start(MockConfig {
        fault: Some(fault),
        ..MockConfig::default()
    })
    .await
    .unwrap()
}

/// Sluice with one key (`sk-a`, a large TPM limit, so every settlement shows in `consumed`).
struct Rig {
    sluice: Sluice,
}

impl Rig {
    async fn start(model_list: &str) -> Self {
        let yaml = format!(
            "model_list:\n{model_list}general_settings: {{master_key: sk-m}}\nkeys:\n  - {{key: sk-a, key_alias: team, tpm_limit: {TPM}}}\n"
        );
        Self {
            sluice: Sluice::start(&yaml).await,
        }
    }

    async fn send(&self, group: &str, stream: bool) -> reqwest::Response {
        client()
            .post(self.sluice.url("/v1/chat/completions"))
            .bearer_auth("sk-a")
            .body(body(group, stream))
            .send()
            .await
            .unwrap()
    }

    /// Tokens settled on the key so far, and what the key has left.
    fn budget(&self) -> (u64, u64) {
        let g = &self.sluice.gateway;
        let h = g.limiter_handle("key:team:tpm").unwrap();
        (g.limiter().consumed(&h), g.limiter().remaining(&h))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_json_answers_fall_back_or_end_in_502_and_keep_the_estimate() {
    let cut = faulty(Fault::CutJson).await;
    let bad = faulty(Fault::MalformedJson).await;
    let stall = faulty(Fault::Stall).await;
    let no_usage = faulty(Fault::NoUsage).await;
    let good = MockUpstream::start(MockConfig {
        name: "good".into(),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let refused = format!("http://127.0.0.1:{}/v1", free_port().unwrap());
    let rig = Rig::start(&format!(
        "{}{}{}{}{}{}{}",
        deployment("cut", "x", &cut.base_url(), ""),
        deployment("bad", "x", &bad.base_url(), ""),
        deployment("stall", "x", &stall.base_url(), ", timeout: 0.5"),
        deployment("nousage", "x", &no_usage.base_url(), ""),
        deployment("refused", "x", &refused, ""),
        // A group whose first deployment answers garbage and whose second is fine.
        deployment("mixed", "x", &bad.base_url(), ", order: 1"),
        deployment("mixed", "y", &good.base_url(), ", order: 2"),
    ))
    .await;

    // Nothing sent: the reservation goes back whole.
    let v = error_body(rig.send("refused", false).await, 502).await;
    assert_eq!(v["error"]["code"], "upstream_unreachable");
    assert_eq!(rig.budget(), (0, TPM), "a refused connection costs nothing");

    // Sent, then broken or malformed: 502 with a clear code, the estimate stays charged.
    let mut consumed = 0;
    for group in ["cut", "bad"] {
        let v = error_body(rig.send(group, false).await, 502).await;
        assert_eq!(v["error"]["code"], "upstream_bad_response", "{group}");
        consumed += ESTIMATE;
        assert_eq!(rig.budget().0, consumed, "{group} keeps its estimate");
    }

    // Headers, then nothing: 504 at the deployment's timeout, not a hang.
    let started = Instant::now();
    let v = error_body(rig.send("stall", false).await, 504).await;
    assert_eq!(v["error"]["code"], "upstream_timeout");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a stalled body held on for {took:?}"
    );
    consumed += ESTIMATE;
    assert_eq!(rig.budget().0, consumed);

    // A 200 without usage is served, and settled by its estimate.
    let resp = rig.send("nousage", false).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.json_value().await["usage"].is_null());
    consumed += ESTIMATE;
    assert_eq!(rig.budget().0, consumed);

    // Garbage from the first candidate: the second answers, the client never sees the garbage.
    let resp = rig.send("mixed", false).await;
    assert_eq!(resp.status(), 200);
    let v = resp.json_value().await;
    assert_eq!(v["choices"][0]["message"]["content"], "hello from good");
    consumed += ESTIMATE + PROMPT_TOKENS + 7; // the garbage's estimate + the real usage
    assert_eq!(rig.budget().0, consumed);
}

/// Reads a stream to its end (bounded), returning its text.
async fn read_stream(resp: reqwest::Response, within: Duration) -> String {
    let mut resp = resp;
    let mut text = String::new();
    tokio::time::timeout(within, async {
        while let Ok(Some(c)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&c));
        }
    })
    .await
    .expect("the stream never ended");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_end_and_keep_the_estimate() {
    let stall = faulty(Fault::Stall).await;
    let bad = faulty(Fault::MalformedSse).await;
    let no_usage = faulty(Fault::NoUsage).await;
    let rig = Rig::start(&format!(
        "{}{}{}",
        deployment("stall", "x", &stall.base_url(), ", stream_timeout: 0.3"),
        deployment("bad", "x", &bad.base_url(), ""),
        deployment("nousage", "x", &no_usage.base_url(), ""),
    ))
    .await;

    // One event, then silence: the stream ends at `stream_timeout` with an error event.
    let started = Instant::now();
    let resp = rig.send("stall", true).await;
    assert_eq!(resp.status(), 200);
    let text = read_stream(resp, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.contains("upstream_stream_broken"), "{text}");
    assert!(
        took < Duration::from_secs(2),
        "stalled stream held on for {took:?}"
    );
    assert_eq!(rig.budget().0, ESTIMATE);

    // Events that are not JSON are passed on as they came; the stream ends, estimate kept.
    let text = read_stream(rig.send("bad", true).await, Duration::from_secs(5)).await;
    assert!(text.contains("{not json"), "{text}");
    assert_eq!(rig.budget().0, 2 * ESTIMATE);

    // A stream that never sends usage (although Sluice asked): served, estimate kept.
    let text = read_stream(rig.send("nousage", true).await, Duration::from_secs(5)).await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(rig.budget().0, 3 * ESTIMATE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_cancels_the_upstream_and_pays_for_what_it_got() {
    let up = MockUpstream::start(MockConfig {
        stream_chunks: 100,
        stream_interval: Duration::from_millis(20),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let rig = Rig::start(&deployment("m", "x", &up.base_url(), "")).await;
    let mut resp = rig.send("m", true).await;
    assert_eq!(resp.status(), 200);
    let mut events = 0;
    while events < 3 {
        let c = resp.chunk().await.unwrap().unwrap();
        events += String::from_utf8_lossy(&c).matches("data: ").count();
    }
    drop(resp); // hang up, 3+ events into a 100-event stream
    assert!(
        up.wait_cancelled(1, Duration::from_secs(2)).await,
        "the upstream stream was never cancelled"
    );
    // Sluice settles before it lets the upstream connection go, so by now the reservation is
    // settled: the prompt + one token per event relayed, well below the 208 reserved.
    let (consumed, _) = rig.budget();
    assert!(
        (PROMPT_TOKENS + 3..PROMPT_TOKENS + 30).contains(&consumed),
        "consumed {consumed}"
    );
    let (_, remaining) = rig.budget();
    assert_eq!(
        remaining,
        TPM - consumed,
        "the rest of the reservation is back"
    );
}
