//! Hostile and broken requests: each gets a 4xx in OpenAI's error shape (or a clean close where
//! HTTP itself is broken), never a 5xx, a hang or a crash, and none reaches the upstream.

use std::time::Duration;

use sluice_testkit::{MockConfig, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::{chat, client, deployment, error_body, Sluice};

async fn rig() -> (MockUpstream, Sluice) {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::start(&format!(
        "model_list:\n{}server: {{max_body_bytes: 1048576}}\n",
        deployment("m", "x", &up.base_url(), "")
    ))
    .await;
    (up, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_bodies_get_400s_in_openais_shape() {
    let (up, s) = rig().await;
    let deep = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"x":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("empty", b"".to_vec(), 400),
        ("truncated", br#"{"model":"m","messages":[{"role":"#.to_vec(), 400),
        ("not json", b"model=m&messages=hi".to_vec(), 400),
        ("not an object", b"[1,2,3]".to_vec(), 400),
        (
            "invalid utf-8",
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(),
            400,
        ),
        ("100k-deep nesting", deep.into_bytes(), 400),
        (
            "duplicate keys",
            br#"{"model":"m","model":"m","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
            400,
        ),
        (
            "model not a string",
            br#"{"model":7,"messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
            400,
        ),
        ("messages not a list", br#"{"model":"m","messages":"hi"}"#.to_vec(), 400),
        (
            "stream not a bool",
            br#"{"model":"m","stream":"yes","messages":[{"role":"user","content":"hi"}]}"#
                .to_vec(),
            400,
        ),
        (
            "max_tokens not a number",
            br#"{"model":"m","max_tokens":"9","messages":[{"role":"user","content":"hi"}]}"#
                .to_vec(),
            400,
        ),
        (
            "negative max_tokens",
            br#"{"model":"m","max_tokens":-1,"messages":[{"role":"user","content":"hi"}]}"#
                .to_vec(),
            400,
        ),
        (
            "absurd max_tokens",
            br#"{"model":"m","max_tokens":99999999999999999999999,"messages":[{"role":"user","content":"hi"}]}"#
                .to_vec(),
            400,
        ),
        (
            "a number beyond f64",
            br#"{"model":"m","temperature":1e999,"messages":[{"role":"user","content":"hi"}]}"#
                .to_vec(),
            400,
        ),
        (
            "oversized",
            chat("m")
                .replace("hi", &"x".repeat(1_100_000))
                .into_bytes(),
            413,
        ),
    ];
    for (what, body, status) in cases {
        let resp = client()
            .post(s.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let v = error_body(resp, status).await;
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
    }
    // A wrong content type is refused by name; none is taken for JSON (curl -d's default is
    // form encoding, which a JSON API must not guess at).
    let resp = client()
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body(chat("m"))
        .send()
        .await
        .unwrap();
    let v = error_body(resp, 415).await;
    assert_eq!(v["error"]["code"], "unsupported_media_type");
    assert_eq!(
        up.calls(),
        0,
        "nothing broken reached the upstream: {:?}",
        up.requests()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect::<Vec<_>>()
    );
    // With `application/json; charset=utf-8`, or none at all, the same body is served.
    for ct in [Some("application/json; charset=utf-8"), None] {
        let mut r = client().post(s.url("/v1/chat/completions")).body(chat("m"));
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        assert_eq!(r.send().await.unwrap().status(), 200, "{ct:?}");
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes it or `within`
/// passes; returns what came back and how long it took.
async fn raw(s: &Sluice, bytes: &[u8], within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, conn.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_http_is_refused_and_pipelined_requests_are_answered_in_order() {
    let (up, s) = rig().await;
    // Two requests in one write: both answered, in order, on the one connection.
    let body = chat("m");
    let one = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let last = "GET /health/liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (out, _) = raw(
        &s,
        format!("{one}{one}{last}").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    assert_eq!(out.matches("chat.completion").count(), 2, "{out}");
    assert_eq!(up.calls(), 2);

    // A header flood (thousands of headers, a huge header line) is refused, never served.
    let mut flood = String::from("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n");
    for i in 0..5000 {
        flood.push_str(&format!("x-flood-{i}: {}\r\n", "a".repeat(20)));
    }
    flood.push_str("Content-Length: 2\r\n\r\n{}");
    let (out, took) = raw(&s, flood.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 4"),
        "a header flood got: {}",
        &out[..out.len().min(200)]
    );
    assert!(took < Duration::from_secs(5), "flood connection left open");
    let huge = format!(
        "GET /health/liveness HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let (out, _) = raw(&s, huge.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 4"),
        "a 1 MiB header got: {}",
        &out[..out.len().min(200)]
    );

    // A request shorter than HTTP/2's 24-byte preface is answered at once (Pingora's own h2c
    // sniff would wait for 24 bytes forever).
    let (out, took) = raw(&s, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await;
    assert!(
        out.starts_with("HTTP/1.1 404") || out.starts_with("HTTP/1.0 404"),
        "{out}"
    );
    assert!(
        took < Duration::from_secs(2),
        "a tiny request waited {took:?}"
    );

    // Garbage instead of HTTP: closed (or 400), nothing else.
    let (out, _) = raw(&s, b"\x16\x03\x01 hello\r\n\r\n", Duration::from_secs(5)).await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");

    // Unknown paths and methods.
    error_body(
        client().get(s.url("/v2/whatever")).send().await.unwrap(),
        404,
    )
    .await;
    error_body(
        client()
            .delete(s.url("/v1/chat/completions"))
            .send()
            .await
            .unwrap(),
        405,
    )
    .await;
    assert_eq!(up.calls(), 2, "no broken request reached the upstream");
    // Sluice still serves.
    assert_eq!(s.chat(chat("m")).await.status(), 200);
}

/// A slow client: sends `at_once`, then `slowly` a byte every 100 ms, until the server answers
/// or closes (at most 10 s); returns the answer and how long after `at_once` it came.
async fn trickle(s: &Sluice, at_once: &[u8], slowly: &[u8]) -> (String, Duration) {
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(at_once).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = conn.split();
    let mut out = Vec::new();
    let writer = async {
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        for b in slowly {
            pace.tick().await;
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            _ = writer => {}
            _ = rd.read_to_end(&mut out) => {}
        }
    })
    .await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_headers_and_bodies_are_cut_off_at_the_client_timeout() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::one_deployment("m", &up.base_url(), "server: {client_timeout: 0.5}\n").await;
    // Headers a byte per 100 ms (each read is quick, the whole never comes): closed.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let (out, took) = trickle(&s, b"", head.as_bytes()).await;
    assert!(out.is_empty(), "{out}");
    assert!(
        took < Duration::from_secs(2),
        "slow headers held the connection {took:?}"
    );
    // Headers at once, then the body a byte per 100 ms: 408 in OpenAI's shape, closed.
    let body = chat("m");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (out, took) = trickle(&s, head.as_bytes(), body.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("request_timeout"), "{out}");
    assert!(took < Duration::from_secs(2), "slow body held on {took:?}");
    assert_eq!(up.calls(), 0);
    assert_eq!(s.chat(chat("m")).await.status(), 200, "still serving");
}
