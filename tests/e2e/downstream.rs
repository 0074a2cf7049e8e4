//! Sluice's own HTTP/1.1 side and the hand-over to Pingora's session on one connection: what it
//! declines (chunked bodies, conflicting lengths) is served, or refused, exactly as before.

use std::time::Duration;

use sluice_testkit::{MockConfig, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{chat, deployment, Sluice};

async fn rig() -> (MockUpstream, Sluice) {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::start(&format!(
        "model_list:\n{}general_settings: {{master_key: sk-m}}\n",
        deployment("m", "x", &up.base_url(), "")
    ))
    .await;
    (up, s)
}

/// Writes `bytes` on a fresh connection and reads until the server closes it (at most 5 s).
async fn exchange(s: &Sluice, bytes: &[u8]) -> (String, bool) {
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn post(headers: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-m\r\n{headers}\r\n{body}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_it_declines_mid_connection_is_served_by_pingora_and_so_are_the_next() {
    let (up, s) = rig().await;
    let body = chat("m");
    let fast = post(&format!("Content-Length: {}\r\n", body.len()), &body);
    let (a, b) = body.split_at(10);
    let chunked = post(
        "Transfer-Encoding: chunked\r\n",
        &format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len()),
    );
    let last = "GET /health/liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (out, closed) = exchange(&s, format!("{fast}{chunked}{fast}{last}").as_bytes()).await;
    assert!(closed, "the last request asked to close: {out}");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 4, "{out}");
    assert_eq!(out.matches("chat.completion").count(), 3, "{out}");
    assert!(out.ends_with(r#"{"status":"ok"}"#), "{out}");
    assert_eq!(up.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_lengths_never_reach_the_upstream() {
    let (up, s) = rig().await;
    let body = chat("m");
    for headers in [
        format!(
            "Content-Length: {}\r\nContent-Length: {}\r\n",
            body.len(),
            body.len() + 5
        ),
        format!("Content-Length: {}\r\nContent-Length: 3\r\n", body.len()),
        format!("Content-Length: +{}\r\n", body.len()),
    ] {
        let (out, _) = exchange(&s, post(&headers, &body).as_bytes()).await;
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 400"),
            "{headers}: {out}"
        );
    }
    assert_eq!(up.calls(), 0);
    assert_eq!(s.chat(chat("m")).await.status(), 401, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_arrives_closes_the_connection() {
    let (up, s) = rig().await;
    // A bad key is refused before the body is read; the body never comes. The connection
    // cannot carry another request (its rest would be read as one), so it is closed.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-bad\r\nContent-Length: 1000\r\n\r\n";
    let (out, closed) = exchange(&s, head.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(out.contains(r#"{"error":"#), "{out}");
    assert!(closed, "left open: {out}");
    assert_eq!(up.calls(), 0);
}

/// Reads one answer off a keep-alive connection: its status and body (by `Content-Length`).
async fn one_answer(conn: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).await.unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("a length");
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_remembers_a_key_only_while_it_is_the_same_key_under_the_same_config() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let models = format!(
        "model_list:\n{}{}",
        deployment("m", "x", &up.base_url(), ""),
        deployment("n", "y", &up.base_url(), "")
    );
    let keys = "general_settings: {master_key: sk-m}\nkeys:\n  - {key: sk-a, key_alias: a}\n  - {key: sk-b, key_alias: b, models: [n]}\n";
    let s = Sluice::start(&format!("{models}{keys}")).await;
    let request = |key_field: &str, model: &str| {
        let body = chat(model);
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{key_field}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    // Each answer is read before the next request is sent, all on this one connection (a
    // refusal before the body is read would close it: the last step of each connection).
    let mut send = async |key_field: &str, model: &str| {
        conn.write_all(request(key_field, model).as_bytes())
            .await
            .unwrap();
        one_answer(&mut conn).await.0
    };
    assert_eq!(send("Authorization: Bearer sk-a", "m").await, 200);
    assert_eq!(send("Authorization: Bearer sk-a", "m").await, 200);
    assert_eq!(
        send("Authorization: Bearer sk-b", "m").await,
        403,
        "another key is its own owner's, not the remembered one's"
    );
    assert_eq!(send("Authorization: Bearer sk-b", "n").await, 200);
    assert_eq!(send("api-key: sk-b", "m").await, 403, "another field");
    assert_eq!(send("Authorization: Bearer sk-a", "m").await, 200);
    assert_eq!(send("Authorization: Bearer sk-m", "m").await, 200, "master");
    assert_eq!(send("Authorization: Bearer sk-a", "m").await, 200);
    // A reload that revokes sk-a: the connection's memory of it no longer counts.
    let revoked = format!(
        "{models}general_settings: {{master_key: sk-m}}\nkeys:\n  - {{key: sk-b, key_alias: b}}\n"
    );
    let config = sluice_config::load_with_env(&revoked, &|_| None)
        .unwrap()
        .config;
    s.gateway.reload(config);
    assert_eq!(
        send("Authorization: Bearer sk-a", "m").await,
        401,
        "revoked"
    );
    assert_eq!(up.calls(), 6);
}
