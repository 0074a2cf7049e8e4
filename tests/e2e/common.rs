//! The harness: start Sluice for a YAML config, talk to it, stop it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pingora_core::server::{ExecutionPhase, RunArgs, ShutdownSignal, ShutdownSignalWatch};
use sluice_proxy::{build_server, Gateway, Listen};
use tokio::sync::oneshot;

/// Sluice running in this process; stopped (fast shutdown) on drop.
pub struct Sluice {
    pub addr: SocketAddr,
    #[allow(dead_code)]
    pub gateway: Arc<Gateway>,
    /// One client for [`Self::chat`], so its connections are reused like a real client's.
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct StopSignal(Mutex<Option<oneshot::Receiver<()>>>);

#[async_trait::async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        let rx = self.0.lock().unwrap().take();
        if let Some(rx) = rx {
            let _ = rx.await;
        }
        ShutdownSignal::FastShutdown
    }
}

impl Sluice {
    /// Loads `yaml` (panicking with every problem if it does not load) and serves it.
    pub async fn start(yaml: &str) -> Self {
        let loaded = match sluice_config::load_with_env(yaml, &|_| None) {
            Ok(l) => l,
            Err(e) => panic!("test config does not load:\n{e}\n---\n{yaml}"),
        };
        let port = sluice_testkit::free_port().unwrap();
        let listen = Listen {
            addr: format!("127.0.0.1:{port}"),
            threads: 2,
        };
        let (server, gateway) = build_server(loaded.config, &listen).unwrap();
        let mut phase = server.watch_execution_phase();
        let (tx, rx) = oneshot::channel();
        let signal = StopSignal(Mutex::new(Some(rx)));
        let thread = std::thread::spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(signal),
            })
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match phase.recv().await {
                    Ok(ExecutionPhase::Running) => break,
                    Ok(_) => {}
                    Err(e) => panic!("server stopped before running: {e}"),
                }
            }
        })
        .await
        .expect("server never reached Running");
        let addr: SocketAddr = listen.addr.parse().unwrap();
        wait_accepting(addr).await;
        Self {
            addr,
            gateway,
            http: client(),
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Serves one deployment of group `group` at `base`, with `more` YAML after the model list.
    pub async fn one_deployment(group: &str, base: &str, more: &str) -> Self {
        Self::start(&format!(
            "model_list:\n{}{more}",
            deployment(group, "x", base, "")
        ))
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /v1/chat/completions` with `body`, no key, no extra headers.
    pub async fn chat(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

/// Services start listening just after the Running phase is announced; wait for the socket.
async fn wait_accepting(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never accepted"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An HTTP client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A `model_list` entry for an OpenAI-compatible deployment at `base`.
pub fn deployment(group: &str, model: &str, base: &str, extra: &str) -> String {
    format!(
        "  - model_name: {group}\n    litellm_params: {{model: openai/{model}, api_base: '{base}'{extra}}}\n"
    )
}

/// A chat body for `model`.
pub fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// Asserts an OpenAI-shaped error body and returns it.
pub async fn error_body(resp: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    let v: serde_json::Value = resp.json_value().await;
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    v
}

/// `reqwest` without its `json` feature: parse the body ourselves.
pub trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        let bytes = self.bytes().await.unwrap();
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
    }
}
