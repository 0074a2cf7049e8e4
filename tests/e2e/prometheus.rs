//! A real Prometheus (Debian's package) scrapes Sluice on loopback and answers a query for
//! `sluice_requests_total` through its HTTP API.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_testkit::{free_port, MockConfig, MockUpstream};
use tokio::time::Instant;

use crate::common::{chat, client, JsonValue, Sluice};

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_sluice() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let s = Sluice::one_deployment("g", &up.base_url(), "").await;
    for _ in 0..3 {
        let resp = s.chat(chat("g")).await;
        assert_eq!(resp.status(), 200);
    }
    // Declared before the Prometheus guard, so removed after Prometheus is stopped.
    let dir = sluice_testkit::ScratchDir::new("prometheus").unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: sluice\n    static_configs: [{{targets: ['{}']}}]\n",
            s.addr
        ),
    )
    .unwrap();
    let port = free_port().unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (apt-get install prometheus; scripts/test.sh does)"),
    );
    let api = format!("http://127.0.0.1:{port}/api/v1/query?query=sluice_requests_total");
    let start = Instant::now();
    let result = loop {
        if let Ok(resp) = client().get(&api).send().await {
            if resp.status() == 200 {
                let v = resp.json_value().await;
                if let Some(first) = v["data"]["result"]
                    .as_array()
                    .and_then(|r| r.first())
                    .cloned()
                {
                    break first;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "Prometheus never had sluice_requests_total"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(result["metric"]["__name__"], "sluice_requests_total");
    assert_eq!(result["metric"]["route"], "chat_completions");
    assert_eq!(result["metric"]["model_group"], "g");
    assert_eq!(result["value"][1], "3");
}
