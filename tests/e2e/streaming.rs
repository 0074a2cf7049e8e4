//! SSE is relayed chunk by chunk as it arrives.

use std::time::Duration;

use sluice_testkit::{MockConfig, MockUpstream};
use tokio::time::Instant;

use crate::common::Sluice;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_chunk_arrives_while_the_upstream_is_still_paused() {
    let pause = Duration::from_secs(2);
    let up = MockUpstream::start(MockConfig {
        stream_pause: pause,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let s = Sluice::one_deployment("m", &up.base_url(), "").await;
    let started = Instant::now();
    let mut resp = s
        .chat(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = resp.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("data: {"), "{first}");
    assert!(
        !first.contains("[DONE]"),
        "the first read already held the end: buffered"
    );
    // The upstream sends nothing more for `pause`; we must have the first chunk well before.
    assert!(first_at < pause / 2, "first chunk after {first_at:?}");
    let mut rest = String::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&c).unwrap());
    }
    assert!(
        started.elapsed() >= pause,
        "the stream ended before the upstream's pause did"
    );
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(
        !rest.contains("\"usage\""),
        "no usage chunk the client did not ask for"
    );
}
