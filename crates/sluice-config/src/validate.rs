//! Stage two: raw structs → [`Config`], collecting every problem with the path of its key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::raw::{
    RawDeployment, RawFilter, RawGeneralSettings, RawKey, RawLimits, RawRouterSettings, RawServer,
    LITELLM_KNOWN_KEYS, LITELLM_SECTIONS,
};
use crate::{
    AccessLog, ApiBase, Config, ConfigError, Deployment, KeyDigest, LimitSettings, Loaded,
    ModelGroup, OnRedisError, Problem, Provider, RedisSettings, RouterSettings, RoutingStrategy,
    Secret, ServerSettings, TlsFiles, VirtualKey, DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT,
    DEFAULT_TIMEOUT,
};

/// Top-level sections Sluice reads, for "did you mean" hints.
const SECTIONS: &[&str] = &[
    "model_list",
    "general_settings",
    "router_settings",
    "server",
    "keys",
    "limits",
    "filter",
];

/// Prefix of a value taken from the environment (LiteLLM's convention).
const ENV_PREFIX: &str = "os.environ/";

/// Parses and validates a YAML config, reading `os.environ/NAME` values from the process
/// environment.
///
/// # Errors
/// A [`ConfigError`] listing every problem found, each with the path of its key.
pub fn load(yaml: &str) -> Result<Loaded, ConfigError> {
    load_with_env(yaml, &|name| std::env::var(name).ok())
}

/// [`load`] with an explicit environment, for tests and for `sluice check` dry runs.
///
/// # Errors
/// A [`ConfigError`] listing every problem found, each with the path of its key.
pub fn load_with_env(
    yaml: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    let mut cx = Cx {
        problems: Vec::new(),
        warnings: Vec::new(),
        env,
    };
    let config = cx.load(yaml);
    match config {
        Some(config) if cx.problems.is_empty() => Ok(Loaded {
            config,
            warnings: cx.warnings,
        }),
        _ => Err(ConfigError {
            problems: cx.problems,
        }),
    }
}

struct Cx<'a> {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

#[derive(Default)]
struct RawRoot {
    model_list: Vec<(String, RawDeployment)>,
    keys: Vec<(String, RawKey)>,
    general: RawGeneralSettings,
    router: RawRouterSettings,
    server: RawServer,
    limits: RawLimits,
    filter: RawFilter,
}

impl Cx<'_> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn load(&mut self, yaml: &str) -> Option<Config> {
        let (root, router_redis) = self.parse(yaml)?;
        let groups = self.groups(root.model_list, &root.router);
        let names: BTreeSet<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        let router = self.router(root.router, &names);
        let keys = self.keys(root.keys, &names);
        let master_key = root
            .general
            .master_key
            .and_then(|k| self.resolve(k, "general_settings.master_key"))
            .map(|k| KeyDigest::of(k.as_bytes()));
        let redis = self.redis(&router_redis);
        let server = self.server(root.server);
        let limits = self.limits(root.limits);
        let reject_unknown_fields = match root.filter.unknown_fields.as_deref() {
            None | Some("drop") => false,
            Some("reject") => true,
            Some(other) => {
                self.problem(
                    "filter.unknown_fields",
                    format!("expected drop or reject, got `{other}`"),
                );
                false
            }
        };
        Some(Config {
            server,
            master_key,
            keys,
            groups,
            router,
            redis,
            limits,
            reject_unknown_fields,
        })
    }

    /// YAML → the raw sections, each deserialized on its own so one bad section (or one bad
    /// list entry) does not hide the problems of the others.
    fn parse(&mut self, yaml: &str) -> Option<(RawRoot, RouterRedis)> {
        let doc: Value = match serde_yaml::from_str(yaml) {
            Ok(v) => v,
            Err(e) => {
                self.problem("", format!("not valid YAML: {e}"));
                return None;
            }
        };
        let map = match doc {
            Value::Mapping(m) => m,
            Value::Null => serde_yaml::Mapping::new(),
            _ => {
                self.problem("", "the file must be a mapping of sections");
                return None;
            }
        };
        let mut root = RawRoot::default();
        let mut saw_models = false;
        for (key, value) in map {
            let Some(key) = key.as_str().map(str::to_owned) else {
                self.problem("", format!("section names must be strings, found {key:?}"));
                continue;
            };
            match key.as_str() {
                "model_list" => {
                    saw_models = true;
                    root.model_list = self.list(value, "model_list");
                }
                "keys" => root.keys = self.list(value, "keys"),
                "general_settings" => {
                    if let Some(v) = self.section(value, &key) {
                        root.general = v;
                    }
                }
                "router_settings" => {
                    if let Some(v) = self.section(value, &key) {
                        root.router = v;
                    }
                }
                "server" => {
                    if let Some(v) = self.section(value, &key) {
                        root.server = v;
                    }
                }
                "limits" => {
                    if let Some(v) = self.section(value, &key) {
                        root.limits = v;
                    }
                }
                "filter" => {
                    if let Some(v) = self.section(value, &key) {
                        root.filter = v;
                    }
                }
                k if LITELLM_SECTIONS.contains(&k) => {
                    self.warn(k, "LiteLLM section not read by Sluice; ignored");
                }
                k => {
                    let hint = did_you_mean(k, SECTIONS);
                    self.problem(k, format!("unknown key{hint}"));
                }
            }
        }
        if !saw_models || root.model_list.is_empty() && self.problems.is_empty() {
            self.problem("model_list", "at least one deployment is required");
        }
        // Taken out here so `router()` sees only routing; Redis settings become `Config::redis`.
        let router_redis = RouterRedis {
            host: root.router.redis_host.take(),
            port: root.router.redis_port.take(),
            password: root.router.redis_password.take(),
            url: root.router.redis_url.take(),
        };
        Some((root, router_redis))
    }

    /// Deserializes each element of a sequence on its own, keeping its path.
    fn list<T: DeserializeOwned>(&mut self, value: Value, path: &str) -> Vec<(String, T)> {
        let items = match value {
            Value::Sequence(items) => items,
            Value::Null => return Vec::new(),
            other => {
                self.problem(path, format!("expected a list, found {}", kind(&other)));
                return Vec::new();
            }
        };
        items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let p = format!("{path}[{i}]");
                self.section(item, &p).map(|v| (p, v))
            })
            .collect()
    }

    /// Deserializes one section, reporting its type error (with path) and every unknown key.
    fn section<T: DeserializeOwned>(&mut self, value: Value, path: &str) -> Option<T> {
        let mut ignored = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(value, &mut track);
        let result: Result<T, _> =
            serde_ignored::deserialize(de, |p| ignored.push(ignored_path(path, &p)));
        for (full, last) in ignored {
            if LITELLM_KNOWN_KEYS.contains(&last.as_str()) {
                self.warn(full, "LiteLLM key not implemented by Sluice; ignored");
            } else {
                self.problem(full, "unknown key");
            }
        }
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = track.path().to_string();
                let full = join(path, &inner);
                self.problem(full, e.to_string());
                None
            }
        }
    }

    /// Resolves `os.environ/NAME` values.
    fn resolve(&mut self, value: String, path: &str) -> Option<String> {
        match value.strip_prefix(ENV_PREFIX) {
            None => Some(value),
            Some(name) => match (self.env)(name) {
                Some(v) => Some(v),
                None => {
                    self.problem(path, format!("environment variable {name} is not set"));
                    None
                }
            },
        }
    }

    fn seconds(&mut self, value: Option<f64>, path: &str) -> Option<Duration> {
        let v = value?;
        match Duration::try_from_secs_f64(v) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => {
                self.problem(
                    path,
                    format!("expected a positive number of seconds, got {v}"),
                );
                None
            }
        }
    }

    fn positive(&mut self, value: Option<u64>, path: &str) -> Option<u64> {
        match value {
            Some(0) => {
                self.problem(path, "must be at least 1 (omit it for no limit)");
                None
            }
            v => v,
        }
    }

    fn groups(
        &mut self,
        entries: Vec<(String, RawDeployment)>,
        router: &RawRouterSettings,
    ) -> Vec<ModelGroup> {
        let default_timeout = self
            .seconds(router.timeout, "router_settings.timeout")
            .unwrap_or(DEFAULT_TIMEOUT);
        let default_stream_timeout =
            self.seconds(router.stream_timeout, "router_settings.stream_timeout");
        let mut groups: Vec<ModelGroup> = Vec::new();
        let mut ids = BTreeSet::new();
        for (path, raw) in entries {
            let Some(d) = self.deployment(
                &path,
                &raw,
                &groups,
                default_timeout,
                default_stream_timeout,
            ) else {
                continue;
            };
            if !ids.insert(d.id.clone()) {
                self.problem(
                    format!("{path}.model_info.id"),
                    format!("deployment id `{}` is used twice", d.id),
                );
                continue;
            }
            match groups.iter_mut().find(|g| g.name == raw.model_name) {
                Some(g) => g.deployments.push(d),
                None => groups.push(ModelGroup {
                    name: raw.model_name,
                    deployments: vec![d],
                }),
            }
        }
        groups
    }

    fn deployment(
        &mut self,
        path: &str,
        raw: &RawDeployment,
        groups: &[ModelGroup],
        default_timeout: Duration,
        default_stream_timeout: Option<Duration>,
    ) -> Option<Deployment> {
        let before = self.problems.len();
        if raw.model_name.trim().is_empty() {
            self.problem(format!("{path}.model_name"), "must not be empty");
        }
        let p = &raw.litellm_params;
        let model_path = format!("{path}.litellm_params.model");
        let (provider, upstream_model) = match p.model.split_once('/') {
            Some((prefix, rest)) => match Provider::from_prefix(prefix) {
                Some(provider) => (provider, rest.to_owned()),
                None => {
                    self.problem(
                        &model_path,
                        format!(
                            "provider `{prefix}` is not supported (use openai/, hosted_vllm/, \
                             azure/, anthropic/ or gemini/; any OpenAI-compatible server works \
                             as openai/ with an api_base)"
                        ),
                    );
                    return None;
                }
            },
            None => (Provider::OpenAi, p.model.clone()),
        };
        if upstream_model.is_empty() {
            self.problem(&model_path, "the model name after the provider is empty");
        }
        let base_path = format!("{path}.litellm_params.api_base");
        let api_base = match p.api_base.clone() {
            Some(b) => self.resolve(b, &base_path),
            None => match provider.default_api_base() {
                Some(b) => Some(b.to_owned()),
                None => {
                    self.problem(
                        &base_path,
                        format!("required for provider {}", provider.as_str()),
                    );
                    None
                }
            },
        };
        let api_base = api_base.and_then(|b| match parse_api_base(&b) {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                self.problem(&base_path, e);
                None
            }
        });
        let api_key = p
            .api_key
            .clone()
            .and_then(|k| self.resolve(k, &format!("{path}.litellm_params.api_key")))
            .map(Secret::new);
        let mut api_version = p
            .api_version
            .clone()
            .and_then(|v| self.resolve(v, &format!("{path}.litellm_params.api_version")));
        if provider == Provider::Azure && api_version.is_none() {
            // Azure OpenAI's current GA data-plane version; LiteLLM also supplies a default.
            api_version = Some("2024-10-21".to_owned());
        }
        let tpm = self.positive(p.tpm, &format!("{path}.litellm_params.tpm"));
        let rpm = self.positive(p.rpm, &format!("{path}.litellm_params.rpm"));
        let weight = match p.weight {
            None => 1.0,
            Some(w) if w.is_finite() && w > 0.0 => w,
            Some(w) => {
                self.problem(
                    format!("{path}.litellm_params.weight"),
                    format!("must be a positive number, got {w}"),
                );
                1.0
            }
        };
        let timeout = self
            .seconds(p.timeout, &format!("{path}.litellm_params.timeout"))
            .unwrap_or(default_timeout);
        let stream_timeout = self
            .seconds(
                p.stream_timeout,
                &format!("{path}.litellm_params.stream_timeout"),
            )
            .or(default_stream_timeout)
            .unwrap_or(timeout);
        let n = groups
            .iter()
            .find(|g| g.name == raw.model_name)
            .map_or(0, |g| g.deployments.len());
        let id = raw
            .model_info
            .id
            .clone()
            .unwrap_or_else(|| format!("{}.{n}", raw.model_name));
        if self.problems.len() != before {
            return None;
        }
        Some(Deployment {
            id,
            provider,
            upstream_model,
            api_base: api_base?,
            api_key,
            api_version,
            tpm,
            rpm,
            weight,
            order: p.order.unwrap_or(u32::MAX),
            timeout,
            stream_timeout,
            max_input_tokens: raw.model_info.max_input_tokens,
            organization: p.organization.clone(),
            extra_allowed_fields: raw.sluice.extra_allowed_fields.clone(),
            drop_fields: raw
                .sluice
                .drop_fields
                .iter()
                .chain(p.additional_drop_params.iter().flatten())
                .cloned()
                .collect(),
        })
    }

    fn keys(&mut self, entries: Vec<(String, RawKey)>, groups: &BTreeSet<&str>) -> Vec<VirtualKey> {
        let mut out: Vec<VirtualKey> = Vec::new();
        for (i, (path, raw)) in entries.into_iter().enumerate() {
            let digest = match (raw.key, raw.key_sha256) {
                (Some(k), None) => self
                    .resolve(k, &format!("{path}.key"))
                    .map(|k| KeyDigest::of(k.as_bytes())),
                (None, Some(h)) => match KeyDigest::from_hex(&h) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        self.problem(format!("{path}.key_sha256"), e);
                        None
                    }
                },
                _ => {
                    self.problem(path.clone(), "set exactly one of `key` and `key_sha256`");
                    None
                }
            };
            if let Some(models) = &raw.models {
                for (j, m) in models.iter().enumerate() {
                    self.known_group(groups, m, &format!("{path}.models[{j}]"));
                }
            }
            for (field, map) in [
                ("model_tpm_limit", &raw.model_tpm_limit),
                ("model_rpm_limit", &raw.model_rpm_limit),
            ] {
                for (m, v) in map {
                    let p = format!("{path}.{field}.{m}");
                    self.known_group(groups, m, &p);
                    self.positive(Some(*v), &p);
                }
            }
            let tpm_limit = self.positive(raw.tpm_limit, &format!("{path}.tpm_limit"));
            let rpm_limit = self.positive(raw.rpm_limit, &format!("{path}.rpm_limit"));
            let Some(digest) = digest else { continue };
            if out.iter().any(|k| k.digest == digest) {
                self.problem(path, "the same key is configured twice");
                continue;
            }
            out.push(VirtualKey {
                digest,
                alias: raw.key_alias.unwrap_or_else(|| format!("key-{i}")),
                models: raw.models,
                tpm_limit,
                rpm_limit,
                model_tpm_limit: raw.model_tpm_limit,
                model_rpm_limit: raw.model_rpm_limit,
            });
        }
        out
    }

    fn known_group(&mut self, groups: &BTreeSet<&str>, name: &str, path: &str) {
        if !groups.contains(name) {
            let candidates: Vec<&str> = groups.iter().copied().collect();
            let hint = did_you_mean(name, &candidates);
            self.problem(path, format!("no model group `{name}` in model_list{hint}"));
        }
    }

    fn router(&mut self, raw: RawRouterSettings, groups: &BTreeSet<&str>) -> RouterSettings {
        let routing_strategy = match raw.routing_strategy.as_deref() {
            None | Some("simple-shuffle") => RoutingStrategy::SimpleShuffle,
            Some("least-busy") => RoutingStrategy::LeastBusy,
            Some("usage-based-routing" | "usage-based-routing-v2") => RoutingStrategy::UsageBased,
            Some("latency-based-routing") => RoutingStrategy::LatencyBased,
            Some(s @ "cost-based-routing") => {
                self.warn(
                    "router_settings.routing_strategy",
                    format!("`{s}` is not implemented by Sluice; using simple-shuffle"),
                );
                RoutingStrategy::SimpleShuffle
            }
            Some(other) => {
                self.problem(
                    "router_settings.routing_strategy",
                    format!(
                        "unknown strategy `{other}` (simple-shuffle, least-busy, \
                         usage-based-routing-v2, latency-based-routing)"
                    ),
                );
                RoutingStrategy::SimpleShuffle
            }
        };
        let fallbacks = self.fallbacks(raw.fallbacks, "router_settings.fallbacks", groups);
        let context_window_fallbacks = self.fallbacks(
            raw.context_window_fallbacks,
            "router_settings.context_window_fallbacks",
            groups,
        );
        let content_policy_fallbacks = self.fallbacks(
            raw.content_policy_fallbacks,
            "router_settings.content_policy_fallbacks",
            groups,
        );
        let default_fallbacks = raw.default_fallbacks.unwrap_or_default();
        for (i, g) in default_fallbacks.iter().enumerate() {
            self.known_group(
                groups,
                g,
                &format!("router_settings.default_fallbacks[{i}]"),
            );
        }
        let cooldown_time = self
            .seconds(raw.cooldown_time, "router_settings.cooldown_time")
            .unwrap_or(Duration::from_secs(5));
        RouterSettings {
            routing_strategy,
            fallbacks,
            context_window_fallbacks,
            content_policy_fallbacks,
            default_fallbacks,
            num_retries: raw.num_retries.unwrap_or(2),
            // Reported (if bad) where deployments take it as their default.
            timeout: raw
                .timeout
                .and_then(|t| Duration::try_from_secs_f64(t).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_TIMEOUT),
            allowed_fails: raw.allowed_fails.unwrap_or(3),
            cooldown_time,
        }
    }

    /// LiteLLM writes fallbacks as a list of one-entry maps: `[{gpt-4: [gpt-35]}, …]`.
    fn fallbacks(
        &mut self,
        raw: Option<Vec<BTreeMap<String, Vec<String>>>>,
        path: &str,
        groups: &BTreeSet<&str>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, entry) in raw.unwrap_or_default().into_iter().enumerate() {
            for (from, to) in entry {
                let p = format!("{path}[{i}].{from}");
                self.known_group(groups, &from, &p);
                for (j, t) in to.iter().enumerate() {
                    self.known_group(groups, t, &format!("{p}[{j}]"));
                }
                out.entry(from).or_default().extend(to);
            }
        }
        out
    }

    fn redis(&mut self, raw: &RouterRedis) -> Option<RedisSettings> {
        let url = match (&raw.url, &raw.host) {
            (Some(_), Some(_)) => {
                self.problem(
                    "router_settings.redis_url",
                    "set either redis_url or redis_host/redis_port, not both",
                );
                return None;
            }
            (Some(url), None) => self.resolve(url.clone(), "router_settings.redis_url")?,
            (None, Some(host)) => {
                let host = self.resolve(host.clone(), "router_settings.redis_host")?;
                let port = raw.port.unwrap_or(6379);
                let password = match &raw.password {
                    Some(p) => self.resolve(p.clone(), "router_settings.redis_password")?,
                    None => String::new(),
                };
                if password.is_empty() {
                    format!("redis://{host}:{port}")
                } else {
                    format!("redis://:{password}@{host}:{port}")
                }
            }
            (None, None) => {
                if raw.port.is_some() || raw.password.is_some() {
                    self.problem(
                        "router_settings.redis_host",
                        "redis_port/redis_password are set but redis_host is not",
                    );
                }
                return None;
            }
        };
        let scheme_ok = [
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
        ]
        .iter()
        .any(|s| url.starts_with(s));
        if !scheme_ok {
            self.problem(
                "router_settings.redis_url",
                "expected a redis://, rediss:// or redis+cluster:// URL",
            );
            return None;
        }
        Some(RedisSettings {
            url: Secret::new(url),
        })
    }

    fn limits(&mut self, raw: RawLimits) -> LimitSettings {
        let period = self
            .seconds(raw.period, "limits.period")
            .unwrap_or(Duration::from_secs(60));
        let slots = match raw.slots {
            None => 60,
            Some(n) if (1..=3600).contains(&n) => n,
            Some(n) => {
                self.problem(
                    "limits.slots",
                    format!("must be between 1 and 3600, got {n}"),
                );
                60
            }
        };
        if period.as_millis() < u128::from(slots) {
            self.problem(
                "limits.slots",
                "each slot must be at least 1 ms (period ÷ slots)",
            );
        }
        let max_lease_fraction = match raw.max_lease_fraction {
            None => 0.05,
            Some(f) if f > 0.0 && f <= 1.0 => f,
            Some(f) => {
                self.problem(
                    "limits.max_lease_fraction",
                    format!("must be in (0, 1], got {f}"),
                );
                0.05
            }
        };
        let on_redis_error = match raw.on_redis_error.as_deref() {
            None | Some("local") => OnRedisError::Local,
            Some("open") => OnRedisError::Open,
            Some("closed") => OnRedisError::Closed,
            Some(other) => {
                self.problem(
                    "limits.on_redis_error",
                    format!("expected local, open or closed, got `{other}`"),
                );
                OnRedisError::Local
            }
        };
        LimitSettings {
            period,
            slots,
            lease_ttl: self
                .seconds(raw.lease_ttl, "limits.lease_ttl")
                .unwrap_or(Duration::from_secs(5).min(period)),
            horizon: self
                .seconds(raw.horizon, "limits.horizon")
                .unwrap_or(Duration::from_millis(500)),
            max_lease_fraction,
            on_redis_error,
            default_max_tokens: self
                .positive(raw.default_max_tokens, "limits.default_max_tokens")
                .unwrap_or(1024),
            redis_timeout: self
                .seconds(raw.redis_timeout, "limits.redis_timeout")
                .unwrap_or(Duration::from_millis(500)),
            admit_wait: self
                .seconds(raw.admit_wait, "limits.admit_wait")
                .unwrap_or(Duration::from_millis(25)),
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerSettings {
        let max_body_bytes = match raw.max_body_bytes {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(0) => {
                self.problem("server.max_body_bytes", "must be at least 1");
                DEFAULT_MAX_BODY_BYTES
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        };
        if raw.threads == Some(0) {
            self.problem("server.threads", "must be at least 1");
        }
        ServerSettings {
            host: raw.host.unwrap_or_else(|| "0.0.0.0".to_owned()),
            port: raw.port.unwrap_or(DEFAULT_PORT),
            max_body_bytes,
            threads: raw.threads.filter(|t| *t > 0),
            grace_period: self
                .seconds(raw.grace_period, "server.grace_period")
                .unwrap_or(Duration::from_secs(30)),
            client_timeout: self
                .seconds(raw.client_timeout, "server.client_timeout")
                .unwrap_or(Duration::from_secs(60)),
            deployment_header: raw.deployment_header.unwrap_or(true),
            admin_listen: raw.admin_listen.filter(|a| {
                let ok = a.parse::<std::net::SocketAddr>().is_ok();
                if !ok {
                    self.problem(
                        "server.admin_listen",
                        format!("expected host:port, got `{a}`"),
                    );
                }
                ok
            }),
            tls: raw.tls.and_then(|t| {
                let mut ok = true;
                for (field, path) in [("cert", &t.cert), ("key", &t.key)] {
                    if let Err(e) = std::fs::metadata(path) {
                        self.problem(
                            format!("server.tls.{field}"),
                            format!("cannot read {path}: {e}"),
                        );
                        ok = false;
                    }
                }
                ok.then_some(TlsFiles {
                    cert: t.cert,
                    key: t.key,
                })
            }),
            h2c: raw.h2c.unwrap_or(true),
            access_log: match raw.access_log.as_deref() {
                None | Some("json") => AccessLog::Json,
                Some("text") => AccessLog::Text,
                Some("off") => AccessLog::Off,
                Some(other) => {
                    self.problem(
                        "server.access_log",
                        format!("expected json, text or off, got `{other}`"),
                    );
                    AccessLog::Json
                }
            },
        }
    }
}

struct RouterRedis {
    host: Option<String>,
    port: Option<u16>,
    password: Option<String>,
    url: Option<String>,
}

/// Parses `api_base` into its parts. Only `http` and `https` with a host are accepted; a query
/// string has no meaning here (Azure's `api-version` has its own key).
fn parse_api_base(raw: &str) -> Result<ApiBase, String> {
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("not a valid URL `{raw}`: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("`{raw}` must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{raw}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err("credentials in api_base are not supported; use api_key".to_owned());
    }
    if uri.query().is_some() {
        return Err(format!("`{raw}` must not carry a query string"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = uri.path().trim_end_matches('/').to_owned();
    Ok(ApiBase {
        tls,
        host,
        port,
        path,
    })
}

fn ignored_path(prefix: &str, path: &serde_ignored::Path<'_>) -> (String, String) {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut String, last: &mut String) {
        use serde_ignored::Path as P;
        match path {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out, last);
                out.push_str(&format!("[{index}]"));
            }
            P::Map { parent, key } => {
                walk(parent, out, last);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
                last.clone_from(key);
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                walk(parent, out, last);
            }
        }
    }
    let mut inner = String::new();
    let mut last = String::new();
    walk(path, &mut inner, &mut last);
    (join(prefix, &inner), last)
}

fn join(prefix: &str, inner: &str) -> String {
    let inner = inner.trim_start_matches('.');
    if inner.is_empty() {
        prefix.to_owned()
    } else if prefix.is_empty() || inner.starts_with('[') {
        format!("{prefix}{inner}")
    } else {
        format!("{prefix}.{inner}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// ` (did you mean `x`?)` when a known name is within two edits.
fn did_you_mean(name: &str, known: &[&str]) -> String {
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
