//! HTTP/2 clients (h2c with prior knowledge, and what happens with h2c off) and TLS on the
//! listener (HTTP/2 by ALPN), driven with curl.

use std::process::Command;

use sluice_testkit::{MockConfig, MockUpstream, ScratchDir};

use crate::common::{deployment, Sluice};

/// Runs curl (see [`sluice_testkit::curl`]), failing the test when it fails.
fn curl(args: &[&str]) -> (String, String) {
    let dir = ScratchDir::new("curl").unwrap();
    sluice_testkit::curl(&dir, args).unwrap()
}

/// A self-signed certificate for localhost and 127.0.0.1: (cert, key), in the directory
/// returned with them, which must outlive their use.
fn self_signed() -> (ScratchDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = ScratchDir::new("tls").unwrap();
    let (cert, key) = sluice_testkit::self_signed_cert(&dir).unwrap();
    (dir, cert, key)
}

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_with_prior_knowledge_are_served() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::one_deployment("m", &up.base_url(), "").await;
    let url = s.url("/v1/chat/completions");
    let args = |body: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            curl(&[
                "--http2-prior-knowledge",
                "-H",
                "content-type: application/json",
                "-d",
                body,
                &url,
            ])
        })
    };
    let (status, body) = args(BODY).await.unwrap();
    assert_eq!(status, "2 200", "{body}");
    assert!(body.contains("chat.completion"), "{body}");
    let (status, body) = args(STREAM).await.unwrap();
    assert_eq!(status, "2 200");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

/// With `server.h2c: false` there is no sniffing: connections go straight to the HTTP/1 loop,
/// which serves JSON and streams, and an HTTP/2 prior-knowledge client is not answered as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_h2c_http1_is_served_and_http2_prior_knowledge_is_not() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::one_deployment("m", &up.base_url(), "server: {h2c: false}\n").await;
    let url = s.url("/v1/chat/completions");
    let post = |body: &'static str, h2: bool| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let dir = ScratchDir::new("curl").unwrap();
            let mut args = vec!["-H", "content-type: application/json", "-d", body, &url];
            if h2 {
                args.insert(0, "--http2-prior-knowledge");
            }
            sluice_testkit::curl(&dir, &args)
        })
    };
    let (status, body) = post(BODY, false).await.unwrap().unwrap();
    assert_eq!(status, "1.1 200", "{body}");
    assert!(body.contains("chat.completion"), "{body}");
    let (status, body) = post(STREAM, false).await.unwrap().unwrap();
    assert_eq!(status, "1.1 200");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let h2 = post(BODY, true).await.unwrap();
    assert!(
        h2.as_ref().map_or(true, |(status, _)| status != "2 200"),
        "HTTP/2 was served with h2c off: {h2:?}"
    );
    assert_eq!(
        up.calls(),
        2,
        "the HTTP/2 attempt never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_listener_with_http2_by_alpn() {
    let (_certs, cert, key) = self_signed();
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "model_list:\n{}server: {{tls: {{cert: '{}', key: '{}'}}}}\n",
        deployment("m", "x", &up.base_url(), ""),
        cert.display(),
        key.display()
    );
    let s = Sluice::start(&yaml).await;
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", s.addr.port());
    let cacert = cert.display().to_string();
    let (status, body) = tokio::task::spawn_blocking({
        let (url, cacert) = (url.clone(), cacert.clone());
        move || {
            curl(&[
                "--cacert",
                &cacert,
                "-H",
                "content-type: application/json",
                "-d",
                BODY,
                &url,
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(status, "2 200", "HTTP/2 negotiated by ALPN: {body}");
    assert!(body.contains("chat.completion"), "{body}");
    // An untrusted certificate is refused by the client, as it should be.
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "5", &url])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    // Plain HTTP to the TLS port gets no answer from the API.
    let plain = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!(
            "http://127.0.0.1:{}/health/liveness",
            s.addr.port()
        ))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificates_are_verified() {
    // A TLS "provider" with a self-signed certificate: another Sluice's HTTPS listener.
    let (_certs, cert, key) = self_signed();
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let provider = Sluice::start(&format!(
        "model_list:\n{}server: {{tls: {{cert: '{}', key: '{}'}}}}\n",
        deployment("m", "x", &up.base_url(), ""),
        cert.display(),
        key.display()
    ))
    .await;
    // 127.0.0.1 is in the certificate, and the listener is there: the only reason left to
    // fail is that nobody trusts the certificate.
    let https = format!("https://127.0.0.1:{}/v1", provider.addr.port());
    let gateway = Sluice::one_deployment("m", &https, "").await;
    let resp = crate::common::client()
        .post(gateway.url("/v1/chat/completions"))
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        502,
        "an untrusted upstream certificate must not be accepted"
    );
    assert_eq!(
        up.calls(),
        0,
        "nothing reached the provider behind the untrusted certificate"
    );
}
