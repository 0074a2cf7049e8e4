//! The `sluice` binary's command line: `check` exit codes and messages.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use sluice_testkit::ScratchDir;

fn sluice(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to `name` in a directory of its own, returned with the path: the file lives
/// as long as the directory.
fn write(name: &str, text: &str) -> (ScratchDir, std::path::PathBuf) {
    let dir = ScratchDir::new("cli").unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn check_accepts_a_good_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/example.yaml");
    let (code, out, _) = sluice(&["check", "--config", example]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok (2 model group(s), 2 deployment(s)"),
        "{out}"
    );
}

#[test]
fn check_names_every_bad_key_and_exits_64() {
    let (_dir, bad) = write(
        "bad.yaml",
        "model_lsit: []\nmodel_list:\n  - model_name: a\n    litellm_params: {model: openai/x, api_base: 'http://h/v1'}\n  - model_name: b\n    litellm_params: {model: openai/x, api_base: 'http://h/v1'}\n  - model_name: c\n    litellm_params: {model: openai/x, api_base: 'http://h/v1', tpm: many}\n",
    );
    let (code, _, err) = sluice(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("model_lsit: unknown key (did you mean `model_list`?)"),
        "{err}"
    );
    assert!(
        err.contains("model_list[2].litellm_params.tpm: invalid type"),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");
}

#[test]
fn a_missing_file_or_bad_config_refuses_to_serve() {
    let (code, _, err) = sluice(&["--config", "/nonexistent/sluice.yaml"]);
    assert_eq!(code, 64);
    assert!(
        err.contains("cannot read /nonexistent/sluice.yaml"),
        "{err}"
    );
    let (_dir, bad) = write("serve-bad.yaml", "model_list: []\n");
    let (code, _, err) = sluice(&["--config", bad.to_str().unwrap(), "--port", "1"]);
    assert_eq!(code, 64, "serving must not start on a bad config: {err}");
}

#[test]
fn secrets_do_not_appear_in_check_output() {
    let (_dir, cfg) = write(
        "secret.yaml",
        "model_list:\n  - model_name: a\n    litellm_params: {model: openai/x, api_key: sk-very-secret-upstream}\ngeneral_settings: {master_key: sk-very-secret-master}\nkeys: [{key: sk-very-secret-client}]\nbogus: 1\n",
    );
    let (code, out, err) = sluice(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(!format!("{out}{err}").contains("very-secret"), "{out}{err}");
}
