//! The SSE usage scan: a 100-event chat stream (with its usage chunk) through [`SseRelay`], as
//! the relay sees it, in network-sized reads. `cargo bench -p sluice-openai --bench sse`

// Bench code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_openai::SseRelay;

fn stream() -> Vec<Bytes> {
    let mut events = String::new();
    for i in 0..100 {
        events.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
    }
    events.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":350,\"completion_tokens\":100,\"total_tokens\":450}}\n\ndata: [DONE]\n\n");
    // As the upstream's reads deliver it: a few events per read.
    events
        .as_bytes()
        .chunks(700)
        .map(Bytes::copy_from_slice)
        .collect()
}

fn sse(c: &mut Criterion) {
    let chunks = stream();
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut g = c.benchmark_group("sse_100_events");
    g.throughput(Throughput::Bytes(total as u64));
    for (name, strip) in [("pass through", false), ("strip usage chunk", true)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut relay = SseRelay::new(strip);
                let mut out = 0;
                for c in &chunks {
                    out += relay.feed(c.clone()).len();
                }
                out += relay.finish().len();
                assert_eq!(relay.usage().unwrap().total_tokens, 450);
                out
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sse);
criterion_main!(benches);
