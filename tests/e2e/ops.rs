//! The files under ops/: alert rules pass promtool, and every metric the rules and the
//! dashboard use is one Sluice exports.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;

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
    let _ = s.chat(chat("g")).await;
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

fn yaml_docs(path: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// Sluice configs shipped under ops/ load (keys come from the environment there).
fn loads(config: &str, what: &str) {
    let env = |_: &str| Some("from-the-environment".to_owned());
    if let Err(e) = sluice_config::load_with_env(config, &env) {
        panic!("{what}: {e}");
    }
}

#[test]
fn every_manifest_parses_and_has_what_it_needs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    assert!(files.len() >= 10, "{files:?}");
    let mut kinds = BTreeSet::new();
    for path in &files {
        for doc in yaml_docs(path) {
            let Some(kind) = doc.get("kind").and_then(|k| k.as_str()) else {
                continue; // not a Kubernetes object (compose, alert rules, Sluice config)
            };
            let name = path.display();
            assert!(
                doc.get("apiVersion").and_then(|v| v.as_str()).is_some(),
                "{name}: apiVersion"
            );
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{name}: metadata.name"
            );
            kinds.insert(kind.to_owned());
            if kind == "Deployment" {
                let pod = &doc["spec"]["template"]["spec"];
                assert_eq!(
                    pod["securityContext"]["runAsNonRoot"], true,
                    "{name}: non-root"
                );
                for c in pod["containers"].as_sequence().unwrap() {
                    assert!(
                        c.get("readinessProbe").is_some() && c.get("livenessProbe").is_some(),
                        "{name}: probes"
                    );
                    assert_eq!(
                        c["securityContext"]["readOnlyRootFilesystem"], true,
                        "{name}: read-only"
                    );
                    assert_eq!(
                        c["securityContext"]["allowPrivilegeEscalation"], false,
                        "{name}"
                    );
                    assert!(
                        c["resources"]["requests"].get("cpu").is_some(),
                        "{name}: resources"
                    );
                }
            }
            if kind == "ConfigMap" {
                loads(
                    doc["data"]["config.yaml"].as_str().unwrap(),
                    "k8s ConfigMap config.yaml",
                );
            }
        }
    }
    let want = [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceMonitor",
    ];
    for k in want {
        assert!(kinds.contains(k), "no {k} under ops/k8s: {kinds:?}");
    }
    let sluice = yaml_docs(&root.join("k8s/deployment.yaml")).remove(0);
    let pod = &sluice["spec"]["template"]["spec"];
    assert!(
        pod["containers"][0]["lifecycle"]["preStop"]
            .get("exec")
            .is_some(),
        "preStop drain"
    );
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 30,
        "longer than the grace period"
    );
    // Compose: two Sluice replicas, Redis and the mock; its config loads.
    let compose = yaml_docs(&root.join("docker/compose.yaml")).remove(0);
    let services: Vec<&str> = compose["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(services, ["redis", "mock", "sluice-1", "sluice-2"]);
    loads(
        &std::fs::read_to_string(root.join("docker/config.yaml")).unwrap(),
        "compose config",
    );
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let text = ops("docker/Dockerfile");
    let from = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(from, 2, "a build stage and a runtime stage");
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    assert!(text.contains("HEALTHCHECK") && text.contains("/health/liveness"));
}
