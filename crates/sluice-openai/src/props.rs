//! Property tests of parse + shape (the filter), and a fuzz-style no-panic run.
//!
//! `PROPTEST_CASES=1000000 cargo test -p sluice-openai --release props` runs them long.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::filter::{field_label, FieldPolicy, Policy, Verdict};
use crate::{Endpoint, Request};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[ -~\\u{e9}\\u{1F600}\"\\\\\n\t]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z\"]{0,5}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Keys a request may carry: allowed, OpenAI-only, internal, and invented ones (with
/// characters that need escaping).
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "temperature",
            "user",
            "tools",
            "top_p",
            "n",
            "stop",
            "metadata",
            "store",
            "stream_options",
            "top_k",
            "api_key",
            "api_base",
            "litellm_params",
            "_hidden",
            "sluice_x",
            "organization",
        ])
        .prop_map(str::to_owned),
        "[a-z_\"\\\\\u{e9}]{1,8}",
    ]
}

fn request_object() -> impl Strategy<Value = (String, bool)> {
    (
        proptest::collection::btree_map(key(), json_value(), 0..10),
        any::<bool>(),
    )
        .prop_map(|(mut fields, pretty)| {
            fields.remove("model");
            fields.remove("messages");
            fields.remove("stream");
            fields.remove("max_tokens");
            fields.remove("stream_options");
            let mut obj = serde_json::Map::new();
            obj.insert("model".into(), Value::from("group"));
            obj.insert(
                "messages".into(),
                serde_json::json!([{"role": "user", "content": "hi"}]),
            );
            obj.extend(fields);
            let v = Value::Object(obj);
            let text = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                v.to_string()
            };
            (text, pretty)
        })
}

fn raw_fields(bytes: &[u8]) -> BTreeMap<String, String> {
    let m: BTreeMap<String, &RawValue> = serde_json::from_slice(bytes).unwrap();
    m.into_iter()
        .map(|(k, v)| (k, v.get().to_owned()))
        .collect()
}

proptest! {
    /// The output parses, holds `model` plus exactly the input keys the policy keeps, and
    /// every kept value is byte-identical to the input's.
    #[test]
    fn shape_keeps_exactly_the_allowed_keys_byte_for_byte(
        (text, _pretty) in request_object(),
        openai in any::<bool>(),
        extra in proptest::collection::vec(key(), 0..3),
    ) {
        let policy = FieldPolicy { openai, extra_allowed: extra, ..FieldPolicy::default() };
        let req = Request::parse(Endpoint::ChatCompletions, Bytes::from(text.clone())).unwrap();
        let shaped = req.shape("upstream-model", &policy).unwrap();
        let input = raw_fields(text.as_bytes());
        let output = raw_fields(&shaped.body.to_bytes());
        prop_assert_eq!(output.get("model").map(String::as_str), Some("\"upstream-model\""));
        let expected: Vec<&String> = input
            .keys()
            .filter(|k| *k != "model" && policy.verdict(Endpoint::ChatCompletions, k) == Verdict::Keep)
            .collect();
        let got: Vec<&String> = output.keys().filter(|k| *k != "model").collect();
        prop_assert_eq!(got, expected);
        for (k, v) in output.iter().filter(|(k, _)| *k != "model") {
            prop_assert_eq!(v, &input[k], "value of {} changed", k);
        }
        prop_assert_eq!(shaped.dropped.len(), input.len() - 1 - (output.len() - 1));
    }

    /// A shaped body written through its `Buf` (a vectored write taking some of the slices
    /// it is offered, then the rest, as a short write would) is exactly its bytes.
    #[test]
    fn a_shaped_body_writes_as_its_bytes_however_the_writes_fall(
        (text, _) in request_object(),
        openai in any::<bool>(),
        stream in any::<bool>(),
        takes in proptest::collection::vec((1usize..4, 0usize..3000), 1..40),
    ) {
        use bytes::Buf;
        let text = if stream { text.replacen('{', "{\"stream\":true,", 1) } else { text };
        let policy = FieldPolicy { openai, ..FieldPolicy::default() };
        let req = Request::parse(Endpoint::ChatCompletions, Bytes::from(text)).unwrap();
        let body = req.shape("m", &policy).unwrap().body;
        let whole = body.to_bytes();
        prop_assert_eq!(whole.len(), body.len());
        prop_assert_eq!(body.pieces().map(<[u8]>::len).sum::<usize>(), body.len());
        let mut buf = body.buf();
        let mut written = Vec::new();
        for (slots, limit) in takes.iter().cycle().take(10_000) {
            if !buf.has_remaining() {
                break;
            }
            let mut io = [std::io::IoSlice::new(&[]); 3];
            let n = buf.chunks_vectored(&mut io[..*slots]);
            let offered: Vec<u8> = io[..n].iter().flat_map(|s| s.iter().copied()).collect();
            prop_assert!(offered.starts_with(buf.chunk()));
            let take = offered.len().min(*limit).max(1);
            written.extend_from_slice(&offered[..take]);
            buf.advance(take);
        }
        prop_assert_eq!(&written[..], &whole[..]);
        prop_assert_eq!(buf.remaining(), 0);
    }

    /// The compiled allow-list answers as the policy it came from, for every endpoint, for
    /// names in the tables, in the policy's own lists, and in none; and so does shaping
    /// through it (body and drops).
    #[test]
    fn the_compiled_allowlist_agrees_with_its_policy(
        (text, _pretty) in request_object(),
        openai in any::<bool>(),
        reject_unknown in any::<bool>(),
        extra in proptest::collection::vec(key(), 0..3),
        drop in proptest::collection::vec(key(), 0..3),
        names in proptest::collection::vec(prop_oneof![
            key(),
            prop::sample::select(crate::filter::CHAT_COMPLETIONS_FIELDS).prop_map(str::to_owned),
            prop::sample::select(crate::filter::EMBEDDINGS_FIELDS).prop_map(str::to_owned),
        ], 1..8),
    ) {
        let policy = FieldPolicy { openai, extra_allowed: extra, drop, reject_unknown };
        let compiled = policy.compile();
        for name in names.iter().chain(&policy.extra_allowed).chain(&policy.drop) {
            for endpoint in Endpoint::ALL {
                prop_assert_eq!(
                    compiled.verdict(endpoint, name),
                    policy.verdict(endpoint, name),
                    "{} on {:?}", name, endpoint
                );
            }
            prop_assert_eq!(compiled.label(name), field_label(name));
        }
        let req = Request::parse(Endpoint::ChatCompletions, Bytes::from(text)).unwrap();
        match (req.shape("m", &policy), req.shape("m", &compiled)) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a.body.to_bytes(), b.body.to_bytes());
                prop_assert_eq!(a.dropped, b.dropped);
            }
            (a, b) => prop_assert_eq!(a.err(), b.err()),
        }
    }

    /// The body's walk (`walk.rs`) judges JSON as serde_json does: a body with bytes flipped is
    /// refused as JSON (or as not UTF-8) exactly when serde_json finds it is no JSON object.
    #[test]
    fn json_is_judged_as_serde_json_judges_it(
        (text, _) in request_object(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = text.into_bytes();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        let serde_ok = serde_json::from_slice::<BTreeMap<&str, &RawValue>>(&bytes).is_ok()
            || serde_json::from_slice::<BTreeMap<String, &RawValue>>(&bytes).is_ok();
        let ours = Request::parse(Endpoint::ChatCompletions, Bytes::from(bytes.clone()));
        use crate::ParseError::{Json, NotUtf8, NumberOutOfRange, TooDeep};
        // The depth and number checks come first: after them, the JSON was not judged.
        if !matches!(ours, Err(NumberOutOfRange(_) | TooDeep)) {
            let ours_ok = !matches!(ours, Err(Json(_) | NotUtf8));
            prop_assert_eq!(ours_ok, serde_ok, "{:?}: {:?}", String::from_utf8_lossy(&bytes), ours.err());
        }
    }

    /// Fuzz-style: arbitrary bytes, and valid requests with bytes flipped, never panic; what
    /// parses shapes into a JSON object.
    #[test]
    fn arbitrary_bytes_never_panic(
        (text, _) in request_object(),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        pick in 0u8..3,
    ) {
        let mut bytes = text.into_bytes();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        let input = match pick {
            0 => noise,
            _ => bytes,
        };
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
            if let Ok(req) = Request::parse(endpoint, Bytes::from(input.clone())) {
                for policy in [FieldPolicy::default(), FieldPolicy { openai: true, reject_unknown: true, ..FieldPolicy::default() }] {
                    if let Ok(shaped) = req.shape("m", &policy) {
                        // Valid JSON by the grammar (numbers beyond f64's range included,
                        // which `Value` would refuse but RFC 8259 allows), and an object.
                        let raw: Box<RawValue> = serde_json::from_slice(&shaped.body.to_bytes()).unwrap();
                        let is_object = raw.get().starts_with('{');
                        prop_assert!(is_object, "not an object");
                    }
                }
            }
        }
    }
}
