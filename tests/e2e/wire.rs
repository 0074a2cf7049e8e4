//! Sluice's HTTP/1.1 client against upstreams written byte by byte: the framings a provider
//! may use (chunked, length, until close) and pooled connections the upstream closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{chat, Sluice};

const JSON: &str = r#"{"id":"c","object":"chat.completion","created":1,"model":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;

/// How the scripted upstream answers and what it does with the connection afterwards.
#[derive(Clone, Copy)]
enum Script {
    /// `Transfer-Encoding: chunked`, the body in three chunks; the connection stays open.
    Chunked,
    /// No length, no coding: the body ends when the upstream closes the connection.
    UntilClose,
    /// `Content-Length`, keep-alive implied, and then the upstream closes the connection
    /// anyway (as a provider's idle timeout does, racing the next request).
    LengthThenClose,
    /// `Content-Length` and keep-alive; a second request on the same connection is read and
    /// then the connection closed without an answer (the race a pooled connection can lose).
    HangUpOnSecond,
}

struct RawUpstream {
    base: String,
    connections: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(conn, script));
            }
        });
        Self { base, connections }
    }
}

/// Reads one request (head and `Content-Length` body); false when the peer closed.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + length {
                let mut more = [0u8; 4096];
                match conn.read(&mut more).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&more[..n]),
                }
            }
            buf.drain(..end + 4 + length);
            return true;
        }
        let mut more = [0u8; 4096];
        match conn.read(&mut more).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&more[..n]),
        }
    }
}

async fn serve(mut conn: TcpStream, script: Script) {
    let mut buf = Vec::new();
    let mut served = 0;
    while read_request(&mut conn, &mut buf).await {
        served += 1;
        if matches!(script, Script::HangUpOnSecond) && served == 2 {
            return;
        }
        let answer = match script {
            Script::Chunked => {
                let (a, rest) = JSON.split_at(10);
                let (b, c) = rest.split_at(40);
                let mut out = String::from(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
                );
                for part in [a, b, c] {
                    out.push_str(&format!("{:x};ext=1\r\n{part}\r\n", part.len()));
                }
                out.push_str("0\r\nx-trailer: done\r\n\r\n");
                out
            }
            Script::UntilClose => {
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{JSON}")
            }
            Script::LengthThenClose | Script::HangUpOnSecond => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{JSON}",
                JSON.len()
            ),
        };
        if conn.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if matches!(script, Script::UntilClose | Script::LengthThenClose) {
            return; // closes the connection
        }
    }
}

/// Three requests in a row through Sluice to an upstream following `script`: each must come
/// back 200 with the whole answer (usage included), over `connections` upstream connections.
async fn three_requests(script: Script, connections: usize, why: &str) {
    let up = RawUpstream::start(script).await;
    let s = Sluice::one_deployment("m", &up.base, "").await;
    for _ in 0..3 {
        let resp = s.chat(chat("m")).await;
        assert_eq!(resp.status(), 200);
        assert!(resp
            .headers()
            .get("transfer-encoding")
            .is_none_or(|v| v == "chunked"));
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "hello");
        assert_eq!(body["usage"]["total_tokens"], 5);
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), connections, "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_is_decoded_and_its_connection_reused() {
    three_requests(Script::Chunked, 1, "one pooled connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_delimited_by_the_close_is_read_whole_and_not_pooled() {
    three_requests(Script::UntilClose, 3, "a connection per answer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced_unseen() {
    three_requests(Script::LengthThenClose, 3, "a fresh connection each time").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_upstream_hung_up_on_is_sent_again_on_a_fresh_connection() {
    three_requests(
        Script::HangUpOnSecond,
        3,
        "A; A hangs up, B answers; B hangs up, C answers",
    )
    .await;
}
