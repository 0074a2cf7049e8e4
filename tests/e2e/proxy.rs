//! The request path end to end: routing, credentials, body replay, providers, endpoints.

use sha2::Digest;
use sluice_testkit::{MockConfig, MockUpstream};

use crate::common::{chat, client, deployment, JsonValue, Sluice};

fn keyed(name: &str, key: &str) -> MockConfig {
    MockConfig {
        name: name.to_owned(),
        api_key: Some(key.to_owned()),
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_model_and_swaps_model_and_credentials() {
    let a = MockUpstream::start(keyed("a", "sk-upstream-a"))
        .await
        .unwrap();
    let b = MockUpstream::start(keyed("b", "sk-upstream-b"))
        .await
        .unwrap();
    let yaml = format!(
        "model_list:\n{}{}general_settings: {{master_key: sk-master}}\nkeys:\n  - {{key: sk-client, key_alias: team}}\n",
        deployment("alpha", "real-alpha", &a.base_url(), ", api_key: sk-upstream-a"),
        deployment("beta", "real-beta", &b.base_url(), ", api_key: sk-upstream-b"),
    );
    let s = Sluice::start(&yaml).await;
    for (group, hits) in [("alpha", &a), ("beta", &b), ("beta", &b)] {
        let resp = client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth("sk-client")
            .header("content-type", "application/json")
            .body(chat(group))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let served_by = resp.headers()["x-sluice-deployment"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(served_by, format!("{group}.0"));
        let v = resp.json_value().await;
        assert_eq!(v["object"], "chat.completion");
        assert!(hits.calls() > 0);
    }
    assert_eq!((a.calls(), b.calls()), (1, 2));
    let seen = &b.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.json()["model"],
        "real-beta",
        "model rewritten to the deployment's"
    );
    assert_eq!(seen.json()["messages"][0]["content"], "hi");
    assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-b");
    for r in a.requests().iter().chain(b.requests().iter()) {
        let all = format!("{:?}", r.headers);
        assert!(
            !all.contains("sk-client"),
            "client key leaked upstream: {all}"
        );
    }
    // The master key may call everything.
    let resp = client()
        .post(s.url("/chat/completions"))
        .bearer_auth("sk-master")
        .body(chat("alpha"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "bare path without /v1 is served too");
    assert_eq!(a.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1mib_body_is_routed_by_model_and_replayed_whole_after_a_429() {
    let first = MockUpstream::start(MockConfig {
        status: Some(429),
        retry_after: Some(7),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let second = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "model_list:\n{}{}",
        deployment("big", "m1", &first.base_url(), ", order: 1"),
        deployment("big", "m2", &second.base_url(), ", order: 2"),
    );
    let s = Sluice::start(&yaml).await;
    let content: String = (0..1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = serde_json::json!({
        "model": "big",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.5,
    })
    .to_string();
    assert!(body.len() > 1024 * 1024);
    let resp = s.chat(body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-sluice-deployment"], "big.1");
    assert_eq!((first.calls(), second.calls()), (1, 1));
    let sent = serde_json::from_str::<serde_json::Value>(&body).unwrap();
    for (mock, model) in [(&first, "m1"), (&second, "m2")] {
        let got = mock.requests()[0].json();
        assert_eq!(got["model"], model);
        assert_eq!(got["messages"], sent["messages"], "body arrived whole");
        assert_eq!(got["temperature"], 0.5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_is_read_whole() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::one_deployment("m", &up.base_url(), "").await;
    let content = "z".repeat(300 * 1024);
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .as_bytes()
        .chunks(7000)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let resp = s
        .chat(reqwest::Body::wrap_stream(futures_iter(chunks)))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.requests()[0].json()["messages"][0]["content"]
            .as_str()
            .unwrap()
            .len(),
        content.len()
    );
}

fn futures_iter(
    items: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + Sync + 'static {
    struct Iter(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Iter {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_gets_its_url_and_api_key_header() {
    let up = MockUpstream::start(keyed("az", "azure-secret"))
        .await
        .unwrap();
    let yaml = format!(
        "model_list:\n  - model_name: gpt\n    litellm_params: {{model: azure/my-deploy, api_base: 'http://{}', api_key: azure-secret, api_version: '2024-06-01'}}\n",
        up.addr()
    );
    let s = Sluice::start(&yaml).await;
    let resp = s.chat(chat("gpt")).await;
    assert_eq!(resp.status(), 200);
    let r = &up.requests()[0];
    assert_eq!(r.path, "/openai/deployments/my-deploy/chat/completions");
    assert_eq!(r.query.as_deref(), Some("api-version=2024-06-01"));
    assert_eq!(r.headers["api-key"], "azure-secret");
    assert!(r.headers.get("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_openai_compatible_provider_gets_bearer_auth_and_its_model_name() {
    let up = MockUpstream::start(keyed("any", "k")).await.unwrap();
    let mut yaml = String::from("model_list:\n");
    for provider in ["openai", "hosted_vllm", "anthropic", "gemini"] {
        yaml.push_str(&format!(
            "  - model_name: {provider}\n    litellm_params: {{model: {provider}/org/{provider}-model, api_base: '{}', api_key: k}}\n",
            up.base_url()
        ));
    }
    let s = Sluice::start(&yaml).await;
    for (i, provider) in ["openai", "hosted_vllm", "anthropic", "gemini"]
        .iter()
        .enumerate()
    {
        let resp = s.chat(chat(provider)).await;
        assert_eq!(resp.status(), 200, "{provider}");
        let r = &up.requests()[i];
        assert_eq!(r.json()["model"], format!("org/{provider}-model"));
        assert_eq!(r.headers["authorization"], "Bearer k");
        assert_eq!(r.path, "/v1/chat/completions");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_embeddings_models_and_health() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    // Only the key's SHA-256 is in the file.
    let digest = hex::encode(sha2::Sha256::digest(b"sk-hashed"));
    let yaml = format!(
        "model_list:\n{}{}general_settings: {{master_key: sk-m}}\nkeys:\n  - {{key_sha256: '{digest}', models: [emb]}}\n",
        deployment("emb", "text-embedding-3-small", &up.base_url(), ""),
        deployment("inst", "gpt-3.5-turbo-instruct", &up.base_url(), ""),
    );
    let s = Sluice::start(&yaml).await;
    let c = client();
    let resp = c
        .post(s.url("/v1/embeddings"))
        .bearer_auth("sk-hashed")
        .body(r#"{"model":"emb","input":"hello"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json_value().await["data"][0]["object"], "embedding");
    let resp = c
        .post(s.url("/v1/completions"))
        .bearer_auth("sk-m")
        .body(r#"{"model":"inst","prompt":"say hi","max_tokens":5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json_value().await["object"], "text_completion");
    assert_eq!(up.requests()[1].path, "/v1/completions");
    // /v1/models lists what the key may call.
    let v = c
        .get(s.url("/v1/models"))
        .bearer_auth("sk-hashed")
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["emb"]);
    let v = c
        .get(s.url("/v1/models"))
        .bearer_auth("sk-m")
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        c.get(s.url("/v1/models")).send().await.unwrap().status(),
        401
    );
    // Health needs no key.
    for path in ["/health/liveness", "/health/readiness"] {
        assert_eq!(
            c.get(s.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    s.gateway.start_draining();
    assert_eq!(
        c.get(s.url("/health/readiness"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        c.get(s.url("/health/liveness"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) and returns the whole answer.
async fn raw_request(s: &Sluice, head: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut out),
    )
    .await
    .expect("no answer within 10 s")
    .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_read_in_pieces_reaches_the_upstream_whole() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::one_deployment("m", &up.base_url(), "").await;
    // Distinct bytes all along, so a piece lost, doubled or out of order shows.
    let content: String = (0..40_000).map(|i| format!("{i:05} ")).collect();
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    let sent_content = |n: usize| {
        let requests = up.requests();
        assert_eq!(requests.len(), n);
        requests[n - 1].json()["messages"][0]["content"]
            .as_str()
            .map(str::to_owned)
    };

    // 240 KB with a Content-Length: more than the server reads at once (64 KiB), so it
    // arrives in several pieces whatever the timing.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let out = raw_request(&s, &head, body.as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "{}",
        &out[..out.len().min(300)]
    );
    assert_eq!(sent_content(1).as_deref(), Some(content.as_str()));

    // Chunked: three chunks, each a piece of the body.
    let (a, rest) = body.as_bytes().split_at(1000);
    let (b, c) = rest.split_at(100_000);
    let mut chunked = Vec::new();
    for piece in [a, b, c] {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head =
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let out = raw_request(&s, head, &chunked).await;
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "{}",
        &out[..out.len().min(300)]
    );
    assert_eq!(sent_content(2).as_deref(), Some(content.as_str()));
}
