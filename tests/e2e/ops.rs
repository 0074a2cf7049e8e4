//! The files under ops/: alert rules pass promtool, and every metric the rules and the
//! dashboard use is one Sluice exports.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use sluice_testkit::{MockConfig, MockUpstream};

use crate::common::{chat, client, deployment, Sluice};

fn ops(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../ops")
            .join(path),
    )
    .unwrap()
}

/// `sluice_*` names in a text, with histogram suffixes folded onto their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("sluice_") {
        let start = i + at;
        let end = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(text.len(), |p| start + p);
        let name = &text[start..end];
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(family.to_owned());
        i = end;
    }
    out
}

#[test]
fn alert_rules_pass_promtool() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/prometheus/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (apt-get install prometheus; scripts/test.sh does)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_rules_use_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&ops("grafana/sluice-dashboard.json")).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 10);
    let up = MockUpstream::start(MockConfig::default()).await.unwrap();
    // A config with a limit and a fallback group, so every family has series.
    let yaml = format!(
        "model_list:\n{}{}router_settings: {{fallbacks: [{{g: [h]}}]}}\n",
        deployment("g", "x", &up.base_url(), ", rpm: 100"),
        deployment("h", "y", &up.base_url(), ""),
    );
    let s = Sluice::start(&yaml).await;
    let _ = client()
        .post(s.url("/v1/chat/completions"))
        .body(chat("g"))
        .send()
        .await
        .unwrap();
    let exported = metric_names(
        &client()
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    for (file, used) in [
        ("dashboard", metric_names(&dashboard.to_string())),
        ("alert rules", metric_names(&ops("prometheus/alerts.yml"))),
    ] {
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics Sluice does not export: {missing:?}"
        );
    }
}
