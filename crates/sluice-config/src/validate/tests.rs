use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_API_KEY" => Some("sk-from-env".to_owned()),
        _ => None,
    }
}

fn ok(yaml: &str) -> Loaded {
    match load_with_env(yaml, &env) {
        Ok(l) => l,
        Err(e) => panic!("expected the config to load, got:\n{e}"),
    }
}

fn problems(yaml: &str) -> Vec<Problem> {
    match load_with_env(yaml, &env) {
        Ok(_) => panic!("expected the config to be refused"),
        Err(e) => e.problems,
    }
}

fn paths(yaml: &str) -> Vec<String> {
    problems(yaml).into_iter().map(|p| p.path).collect()
}

const LITELLM: &str = r#"
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: os.environ/OPENAI_API_KEY
      tpm: 100000
      rpm: 1000
      max_retries: 3
  - model_name: gpt-4o
    litellm_params:
      model: azure/my-gpt4o-deployment
      api_base: https://example-resource.openai.azure.com/
      api_key: azure-key
      api_version: "2024-06-01"
      weight: 2
      order: 1
      timeout: 30
  - model_name: llama
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct
      api_base: http://127.0.0.1:8000/v1
    model_info:
      id: vllm-a
      max_input_tokens: 8192
litellm_settings:
  drop_params: true
general_settings:
  master_key: sk-master
router_settings:
  routing_strategy: usage-based-routing-v2
  fallbacks: [{"gpt-4o": ["llama"]}]
  num_retries: 1
  redis_host: 127.0.0.1
  redis_port: 6380
  redis_password: pw
keys:
  - key: sk-team-a
    key_alias: team-a
    models: [gpt-4o]
    tpm_limit: 5000
    model_rpm_limit: {gpt-4o: 10}
"#;

#[test]
fn a_litellm_config_loads_with_warnings_for_what_sluice_ignores() {
    let loaded = ok(LITELLM);
    let c = &loaded.config;
    assert_eq!(c.groups.len(), 2);
    let gpt = c.group("gpt-4o").unwrap();
    assert_eq!(gpt.deployments.len(), 2);
    let openai = &gpt.deployments[0];
    assert_eq!(openai.id, "gpt-4o.0");
    assert_eq!(openai.provider, Provider::OpenAi);
    assert_eq!(openai.upstream_model, "gpt-4o");
    assert_eq!(openai.api_key.as_ref().unwrap().expose(), "sk-from-env");
    assert_eq!(openai.api_base.to_string(), "https://api.openai.com:443/v1");
    assert_eq!((openai.tpm, openai.rpm), (Some(100_000), Some(1000)));
    let azure = &gpt.deployments[1];
    assert_eq!(azure.provider, Provider::Azure);
    assert_eq!(azure.api_base.path, "");
    assert_eq!(azure.api_version.as_deref(), Some("2024-06-01"));
    assert_eq!(azure.timeout, Duration::from_secs(30));
    assert_eq!((azure.weight, azure.order), (2.0, 1));
    let vllm = &c.group("llama").unwrap().deployments[0];
    assert_eq!(vllm.id, "vllm-a");
    assert_eq!(vllm.upstream_model, "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(vllm.max_input_tokens, Some(8192));
    assert_eq!(c.router.routing_strategy, RoutingStrategy::UsageBased);
    assert_eq!(c.router.fallbacks["gpt-4o"], vec!["llama".to_owned()]);
    assert_eq!(
        c.redis.as_ref().unwrap().url.expose(),
        "redis://:pw@127.0.0.1:6380"
    );
    assert_eq!(c.master_key, Some(KeyDigest::of(b"sk-master")));
    let key = &c.keys[0];
    assert_eq!(key.alias, "team-a");
    assert!(key.allows("gpt-4o") && !key.allows("llama"));
    assert_eq!(key.model_rpm_limit["gpt-4o"], 10);
    let warned: Vec<&str> = loaded.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(
        warned,
        [
            "model_list[0].litellm_params.max_retries",
            "litellm_settings"
        ]
    );
}

#[test]
fn every_bad_key_is_named_by_its_path() {
    let yaml = r#"
model_lsit: []
model_list:
  - model_name: a
    litellm_params: {model: openai/x, api_base: "http://127.0.0.1:1/v1"}
  - model_name: b
    litellm_params: {model: openai/y, api_base: "http://127.0.0.1:1/v1", bogus: 1}
  - model_name: c
    litellm_params: {model: openai/z, api_base: "http://127.0.0.1:1/v1", tpm: lots}
router_settings:
  fallbacks: [{a: [nope]}]
"#;
    let found = problems(yaml);
    let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "model_lsit",
            "model_list[1].litellm_params.bogus",
            "model_list[2].litellm_params.tpm",
            "router_settings.fallbacks[0].a[0]",
        ]
    );
    assert!(
        found[0].message.contains("did you mean `model_list`"),
        "{found:?}"
    );
    assert!(found[2].message.contains("invalid type"), "{found:?}");
}

#[test]
fn semantic_problems_are_reported_together() {
    let yaml = r#"
model_list:
  - model_name: a
    litellm_params: {model: bedrock/claude}
  - model_name: b
    litellm_params: {model: hosted_vllm/llama}
  - model_name: c
    litellm_params: {model: openai/x, api_key: os.environ/MISSING_VAR, tpm: 0, timeout: -1}
  - model_name: d
    litellm_params: {model: openai/x, api_base: "ftp://host/v1"}
keys:
  - key_alias: nokey
  - key: sk-1
    models: [zzz]
  - key: sk-1
server: {max_body_bytes: 0}
"#;
    assert_eq!(
        paths(yaml),
        [
            "model_list[0].litellm_params.model",
            "model_list[1].litellm_params.api_base",
            "model_list[2].litellm_params.api_key",
            "model_list[2].litellm_params.tpm",
            "model_list[2].litellm_params.timeout",
            "model_list[3].litellm_params.api_base",
            "keys[0]",
            "keys[1].models[0]",
            "keys[2]",
            "server.max_body_bytes",
        ]
    );
}

#[test]
fn defaults_are_sane() {
    let l = ok("model_list:\n  - model_name: m\n    litellm_params: {model: gpt-4o-mini}\n");
    let c = l.config;
    assert_eq!(c.server.port, DEFAULT_PORT);
    assert_eq!(c.server.max_body_bytes, 16 * 1024 * 1024);
    assert!(c.redis.is_none() && c.master_key.is_none() && c.keys.is_empty());
    let d = &c.groups[0].deployments[0];
    assert_eq!(d.provider, Provider::OpenAi);
    assert_eq!(d.timeout, DEFAULT_TIMEOUT);
    assert_eq!(d.stream_timeout, DEFAULT_TIMEOUT);
    assert!(l.warnings.is_empty());
}

#[test]
fn empty_and_malformed_files_are_refused() {
    assert_eq!(paths(""), ["model_list"]);
    let p = problems("model_list: [");
    assert!(p[0].message.starts_with("not valid YAML"), "{p:?}");
    assert_eq!(paths("model_list: 3"), ["model_list"]);
    assert_eq!(
        paths("keys: [{key: a, key_sha256: b}]\nmodel_list: []"),
        ["model_list", "keys[0]"]
    );
}

#[test]
fn redis_url_and_host_are_exclusive() {
    let base = "model_list:\n  - model_name: m\n    litellm_params: {model: gpt-4o}\n";
    let both = format!("{base}router_settings: {{redis_url: 'redis://a', redis_host: b}}\n");
    assert_eq!(paths(&both), ["router_settings.redis_url"]);
    let cluster = format!("{base}router_settings: {{redis_url: 'redis+cluster://a:1'}}\n");
    assert!(ok(&cluster).config.redis.is_some());
}

#[test]
fn api_base_forms() {
    let b = parse_api_base("http://[::1]:8080/v1/").unwrap();
    assert_eq!(
        (b.host.as_str(), b.port, b.path.as_str(), b.tls),
        ("::1", 8080, "/v1", false)
    );
    let b = parse_api_base("https://x.example").unwrap();
    assert_eq!((b.port, b.path.as_str()), (443, ""));
    assert!(parse_api_base("http://u:p@x/v1").is_err());
    assert!(parse_api_base("http://x/v1?a=b").is_err());
}

#[test]
fn limits_section() {
    let base = "model_list:\n  - model_name: m\n    litellm_params: {model: gpt-4o}\n";
    let c = ok(&format!(
        "{base}limits: {{period: 6, slots: 30, lease_ttl: 1, on_redis_error: closed, default_max_tokens: 256}}\n"
    ))
    .config;
    assert_eq!(c.limits.period, Duration::from_secs(6));
    assert_eq!((c.limits.slots, c.limits.default_max_tokens), (30, 256));
    assert_eq!(c.limits.on_redis_error, OnRedisError::Closed);
    let d = ok(base).config.limits;
    assert_eq!(
        (d.period, d.slots, d.lease_ttl),
        (Duration::from_secs(60), 60, Duration::from_secs(5))
    );
    assert_eq!(d.on_redis_error, OnRedisError::Local);
    assert_eq!(
        paths(&format!(
            "{base}limits: {{on_redis_error: maybe, slots: 0, max_lease_fraction: 2}}\n"
        )),
        [
            "limits.slots",
            "limits.max_lease_fraction",
            "limits.on_redis_error"
        ]
    );
}

#[test]
fn tls_files_must_exist() {
    let base = "model_list:\n  - model_name: m\n    litellm_params: {model: gpt-4o}\n";
    assert_eq!(
        paths(&format!(
            "{base}server: {{tls: {{cert: /nonexistent/c.pem, key: /nonexistent/k.pem}}}}\n"
        )),
        ["server.tls.cert", "server.tls.key"]
    );
    let c = ok(base).config;
    assert!(
        c.server.tls.is_none() && c.server.h2c,
        "plain HTTP with h2c by default"
    );
}
