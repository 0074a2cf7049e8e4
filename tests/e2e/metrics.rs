//! Every metric family moves as traffic says it should (issue 6), on the main port or the
//! admin listener; promtool accepts the exposition.

use std::io::Write;
use std::process::{Command, Stdio};

use sluice_testkit::{free_port, MockConfig, MockUpstream};

use crate::common::{client, deployment, Sluice};

/// The value of one series in an exposition (`name{labels}` exactly as printed).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_moves_with_traffic() {
    let broken = MockUpstream::start(MockConfig {
        status: Some(500),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let good = MockUpstream::start(MockConfig::default()).await.unwrap();
    let spare = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "model_list:\n{}{}{}router_settings: {{allowed_fails: 10, fallbacks: [{{g: [h]}}]}}\n",
        deployment("g", "x", &broken.base_url(), ", order: 1"),
        deployment("g", "y", &good.base_url(), ", order: 2, rpm: 3"),
        deployment("h", "z", &spare.base_url(), ""),
    );
    let s = Sluice::start(&yaml).await;
    let c = client();
    let body = r#"{"model":"g","messages":[{"role":"user","content":"hi"}],"frobnicate":1}"#;
    for i in 0..5 {
        let resp = c
            .post(s.url("/v1/chat/completions"))
            .header("x-request-id", format!("req-{i}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-request-id"], format!("req-{i}").as_str());
        let _ = resp.bytes().await;
    }
    let unknown = s.chat(r#"{"model":"nope","messages":[]}"#).await;
    assert_eq!(unknown.status(), 404);
    assert!(
        unknown.headers().contains_key("x-request-id"),
        "assigned when the client sent none"
    );
    assert_eq!(
        good.requests()[0].headers["x-request-id"],
        "req-0",
        "propagated upstream"
    );

    // A request is counted just after its answer went out: wait (bounded) for all six.
    let chat = r#"route="chat_completions""#;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let text = c
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counted: f64 = text
            .lines()
            .filter(|l| l.starts_with("sluice_requests_total{") && l.contains(chat))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if counted >= 6.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never all counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    for (series, want) in [
        (
            format!(r#"sluice_requests_total{{model_group="g",{chat},status_class="2xx"}}"#),
            5.0,
        ),
        (
            format!(r#"sluice_requests_total{{model_group="unknown",{chat},status_class="4xx"}}"#),
            1.0,
        ),
        (
            format!(r#"sluice_request_duration_seconds_count{{model_group="g",{chat}}}"#),
            5.0,
        ),
        ("sluice_overhead_duration_seconds_count".to_owned(), 6.0),
        (
            r#"sluice_upstream_requests_total{deployment="g.0",status_class="5xx"}"#.to_owned(),
            5.0,
        ),
        (
            r#"sluice_upstream_requests_total{deployment="g.1",status_class="2xx"}"#.to_owned(),
            3.0,
        ),
        (
            r#"sluice_upstream_requests_total{deployment="h.0",status_class="2xx"}"#.to_owned(),
            2.0,
        ),
        (
            r#"sluice_upstream_duration_seconds_count{deployment="g.0"}"#.to_owned(),
            5.0,
        ),
        (
            r#"sluice_upstream_ttft_seconds_count{deployment="g.1"}"#.to_owned(),
            3.0,
        ),
        (
            r#"sluice_tokens_total{deployment="g.1",kind="completion"}"#.to_owned(),
            21.0,
        ),
        (
            r#"sluice_tokens_total{deployment="h.0",kind="prompt"}"#.to_owned(),
            16.0,
        ),
        (
            r#"sluice_ratelimit_rejections_total{scope_kind="deployment"}"#.to_owned(),
            2.0,
        ),
        (
            r#"sluice_skips_total{deployment="g.1",reason="budget"}"#.to_owned(),
            2.0,
        ),
        (
            r#"sluice_fallbacks_total{from="g",reason="fallback",to="h"}"#.to_owned(),
            2.0,
        ),
        (
            r#"sluice_filter_dropped_fields_total{endpoint="chat_completions",field="other"}"#
                .to_owned(),
            10.0,
        ),
        (
            r#"sluice_ratelimit_remaining{scope="deployment:g.1:rpm"}"#.to_owned(),
            0.0,
        ),
        (
            r#"sluice_ratelimit_consumed{scope="deployment:g.1:rpm"}"#.to_owned(),
            3.0,
        ),
        (
            r#"sluice_ratelimit_overshoot_bound{scope="deployment:g.1:rpm"}"#.to_owned(),
            1.0,
        ),
        (r#"sluice_ratelimit_mode{mode="global"}"#.to_owned(), 1.0),
        (
            r#"sluice_deployment_state{deployment="g.0"}"#.to_owned(),
            0.0,
        ),
        (r#"sluice_build_info{version="0.1.0"}"#.to_owned(), 1.0),
        ("sluice_redis_up".to_owned(), 1.0),
    ] {
        assert_eq!(value(&text, &series), want, "{series}");
    }
    assert!(value(&text, r#"sluice_ratelimit_claims_total{result="granted"}"#) >= 1.0);
    assert!(value(&text, "sluice_ratelimit_claim_duration_seconds_count") >= 1.0);
    assert!(value(&text, r#"sluice_ratelimit_claims_total{result="denied"}"#) >= 1.0);
    // promtool (Debian's prometheus package) accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; scripts/test.sh does)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_takes_metrics_off_the_main_port() {
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    let admin = format!("127.0.0.1:{}", free_port().unwrap());
    let yaml = format!(
        "model_list:\n{}server: {{admin_listen: '{admin}'}}\n",
        deployment("g", "x", &up.base_url(), "")
    );
    let s = Sluice::start(&yaml).await;
    let c = client();
    assert_eq!(c.get(s.url("/metrics")).send().await.unwrap().status(), 404);
    // The admin listener starts with the server; wait (bounded) for it to accept.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        match c.get(format!("http://{admin}/metrics")).send().await {
            Ok(r) if r.status() == 200 => break r.text().await.unwrap(),
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "admin listener never answered"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(text.contains("sluice_build_info"));
    assert_eq!(
        c.get(format!("http://{admin}/health/readiness"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let api = c
        .post(format!("http://{admin}/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 404, "the admin listener serves no API");
}
