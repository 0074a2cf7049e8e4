//! Parse + filter a 1 MiB chat body (of lines, and of one long run of letters), next to a
//! `serde_json::Value` round trip of the latter; parsing the load bench's small request, and
//! shaping it through the policy as configured and through the allow-list compiled from it
//! (what the request path uses).
//! `cargo bench -p sluice-openai --bench filter`

// Bench code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_openai::{Endpoint, FieldPolicy, Request, Shaped};

/// A long conversation: 64 messages of 16 KiB, plus the usual parameters and some junk; with
/// `lines`, each message is lines of ~90 bytes (a `\n` escape each, as text and code have).
fn body(lines: bool) -> Bytes {
    let content: String = (0..16 * 1024)
        .map(|i| match i % 90 {
            89 if lines => '\n',
            _ => char::from(b'a' + (i % 26) as u8),
        })
        .collect();
    let messages: Vec<serde_json::Value> = (0..64)
        .map(|i| serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": content}))
        .collect();
    let v = serde_json::json!({
        "model": "gpt-4o", "messages": messages, "temperature": 0.2, "max_tokens": 512,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "user": "u-1", "_litellm_rate_limit_descriptors": [1, 2], "litellm_params": {"a": 1},
    });
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

/// What the request path does with a body: parse it, shape it for a deployment.
fn parse_and_shape(body: &Bytes, policy: &FieldPolicy) -> Shaped {
    let r = Request::parse(Endpoint::ChatCompletions, body.clone()).unwrap();
    r.shape("gpt-4o-2024-08-06", policy).unwrap()
}

fn filter(c: &mut Criterion) {
    let policy = FieldPolicy::default();
    let lines = body(true);
    let mut g = c.benchmark_group("filter_1MiB_lines");
    g.throughput(Throughput::Bytes(lines.len() as u64));
    g.bench_function("sluice parse + shape", |b| {
        b.iter(|| parse_and_shape(&lines, &policy))
    });
    g.finish();

    let body = body(false);
    let mut g = c.benchmark_group("filter_1MiB");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("sluice parse + shape", |b| {
        b.iter(|| parse_and_shape(&body, &policy))
    });
    g.bench_function("serde_json::Value round trip", |b| {
        b.iter(|| {
            let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["model"] = "gpt-4o-2024-08-06".into();
            serde_json::to_vec(&v).unwrap()
        })
    });
    g.finish();

    // The load bench's request: a 1.3 KB prompt, five top-level fields, one of them dropped.
    let small = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}],"temperature":0.2,"max_tokens":64,"_client_trace":"x"}}"#,
        "The quick brown fox jumps over the lazy dog. ".repeat(30)
    );
    let small = Bytes::from(small);
    let mut g = c.benchmark_group("parse_small");
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("Request::parse", |b| {
        b.iter(|| Request::parse(Endpoint::ChatCompletions, small.clone()).unwrap())
    });
    g.finish();
    let r = Request::parse(Endpoint::ChatCompletions, small).unwrap();
    let compiled = policy.compile();
    let mut g = c.benchmark_group("shape_small");
    g.bench_function("FieldPolicy", |b| {
        b.iter(|| r.shape("gpt-4o-mini", &policy).unwrap())
    });
    g.bench_function("Allowlist", |b| {
        b.iter(|| r.shape("gpt-4o-mini", &compiled).unwrap())
    });
    g.finish();
}

criterion_group!(benches, filter);
criterion_main!(benches);
