//! Every example under config/ loads.

#[test]
fn every_example_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Examples read keys and URLs from the environment; plausible values validate them.
        let env = |name: &str| {
            Some(
                if name.ends_with("_BASE") {
                    "https://example.invalid"
                } else {
                    "set-by-test"
                }
                .into(),
            )
        };
        if let Err(e) = sluice_config::load_with_env(&text, &env) {
            panic!("{}: {e}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 2, "expected the example configs, found {seen}");
}
