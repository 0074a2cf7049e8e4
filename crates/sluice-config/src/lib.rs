//! Sluice's configuration: YAML in, a validated [`Config`] out.
//!
//! The file format follows LiteLLM's `config.yaml` (`model_list`, `litellm_params`,
//! `router_settings`, `general_settings`) so users can bring the file they have, plus Sluice's
//! own sections (`server`, `keys`). Loading is two-staged: raw serde structs (`raw`), then
//! validation into the types below, which are what the rest of Sluice uses. Loading reports
//! *every* problem at once, each named by the path of the offending key
//! (`model_list[2].litellm_params.tpm`); LiteLLM keys that Sluice does not implement load with
//! a warning.
//!
//! This crate does no I/O beyond reading the environment for `os.environ/NAME` values and
//! depends on nothing of the proxy's, so `sluice check` stays fast.
//!
//! Not here: anything that runs. Resolving upstream addresses, connection pools and limiter
//! state belong to the crates that use a [`Config`].

mod raw;
mod secret;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub use secret::{KeyDigest, Secret};
pub use validate::{load, load_with_env};

/// Default listen port (LiteLLM's, so clients need no change).
pub const DEFAULT_PORT: u16 = 4000;
/// Default cap on a request body (`server.max_body_bytes`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default upstream timeout for a whole request (LiteLLM's default is 6000 s; a front door
/// wants a tighter one).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener settings.
    pub server: ServerSettings,
    /// Digest of `general_settings.master_key`; the master key may call every model.
    pub master_key: Option<KeyDigest>,
    /// Virtual keys, in file order.
    pub keys: Vec<VirtualKey>,
    /// Model groups, in order of first appearance in `model_list`.
    pub groups: Vec<ModelGroup>,
    /// `router_settings`.
    pub router: RouterSettings,
    /// Redis connection, when configured; without it Sluice runs on in-process state.
    pub redis: Option<RedisSettings>,
    /// `limits`: how TPM/RPM limits are enforced.
    pub limits: LimitSettings,
    /// `filter.unknown_fields`: refuse (400) requests carrying fields in no allow-list,
    /// instead of dropping those fields.
    pub reject_unknown_fields: bool,
}

impl Config {
    /// The group named `name`, if configured.
    pub fn group(&self, name: &str) -> Option<&ModelGroup> {
        self.groups.iter().find(|g| g.name == name)
    }
}

/// `server`: where and how Sluice listens.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to bind (default `0.0.0.0`).
    pub host: String,
    /// Port to bind (default [`DEFAULT_PORT`]).
    pub port: u16,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Worker threads (default: the number of CPUs).
    pub threads: Option<usize>,
    /// How long in-flight requests may take to finish on shutdown.
    pub grace_period: Duration,
    /// How long a client has to send a whole request, headers and body (and how long an idle
    /// keep-alive connection is kept): a slow-loris client is cut off after this.
    pub client_timeout: Duration,
    /// Whether responses carry `x-sluice-deployment` naming the deployment that served them.
    pub deployment_header: bool,
    /// A separate `host:port` for `/metrics` and health; when set, the main port does not
    /// serve `/metrics`.
    pub admin_listen: Option<String>,
    /// The access log's format.
    pub access_log: AccessLog,
    /// Serve HTTPS with this certificate chain and key (PEM files); HTTP/2 is offered by ALPN.
    pub tls: Option<TlsFiles>,
    /// Accept cleartext HTTP/2 (h2c, prior knowledge) besides HTTP/1.1 (default true).
    pub h2c: bool,
}

/// `server.tls`: PEM files for the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// `server.access_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    /// One JSON object per line (default).
    Json,
    /// One `key=value` line per request.
    Text,
    /// No access log.
    Off,
}

/// A model group: every `model_list` entry sharing one `model_name`.
#[derive(Debug, Clone)]
pub struct ModelGroup {
    /// The `model_name` clients ask for.
    pub name: String,
    /// Its deployments, in file order.
    pub deployments: Vec<Deployment>,
}

/// One upstream deployment (a `model_list` entry).
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Stable name used in logs, metrics and `x-sluice-deployment`: `model_info.id` when set,
    /// else `<model_name>.<n>` with `n` its index within the group.
    pub id: String,
    /// The provider, from the `provider/` prefix of `litellm_params.model`.
    pub provider: Provider,
    /// The model name sent upstream (`litellm_params.model` without the provider prefix).
    pub upstream_model: String,
    /// Where requests go.
    pub api_base: ApiBase,
    /// Credential sent upstream in place of the client's.
    pub api_key: Option<Secret>,
    /// Azure's `api-version` query parameter.
    pub api_version: Option<String>,
    /// Tokens per minute this deployment may take.
    pub tpm: Option<u64>,
    /// Requests per minute this deployment may take.
    pub rpm: Option<u64>,
    /// Relative weight for `simple-shuffle` routing.
    pub weight: f64,
    /// Priority: lower orders are tried first.
    pub order: u32,
    /// Deadline for the upstream's response headers (and whole non-streamed body).
    pub timeout: Duration,
    /// Longest pause between two chunks of a stream.
    pub stream_timeout: Duration,
    /// `model_info.max_input_tokens`.
    pub max_input_tokens: Option<u64>,
    /// `litellm_params.organization`, sent as `OpenAI-Organization`.
    pub organization: Option<String>,
    /// Request fields allowed on top of the endpoint's table (`sluice.extra_allowed_fields`).
    pub extra_allowed_fields: Vec<String>,
    /// Request fields always dropped (`sluice.drop_fields`, and LiteLLM's
    /// `additional_drop_params`).
    pub drop_fields: Vec<String>,
}

/// An upstream provider, selected by the `provider/` prefix of `litellm_params.model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// `openai/` (and a bare model name): OpenAI or any OpenAI-compatible server.
    OpenAi,
    /// `hosted_vllm/`: a vLLM server's OpenAI-compatible API; `api_base` required.
    HostedVllm,
    /// `azure/`: Azure OpenAI; `api_base` and `api_version` required, `api-key` header.
    Azure,
    /// `anthropic/`: Anthropic's OpenAI-compatible endpoint.
    Anthropic,
    /// `gemini/`: Gemini's OpenAI-compatible endpoint.
    Gemini,
}

impl Provider {
    /// The prefix as written in `litellm_params.model`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::HostedVllm => "hosted_vllm",
            Self::Azure => "azure",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Self> {
        Some(match prefix {
            "openai" | "openai_compatible" | "custom_openai" => Self::OpenAi,
            "hosted_vllm" | "vllm" => Self::HostedVllm,
            "azure" => Self::Azure,
            "anthropic" => Self::Anthropic,
            "gemini" => Self::Gemini,
            _ => return None,
        })
    }

    /// The base URL used when `api_base` is not set, if the provider has a public one.
    fn default_api_base(self) -> Option<&'static str> {
        match self {
            Self::OpenAi => Some("https://api.openai.com/v1"),
            Self::Anthropic => Some("https://api.anthropic.com/v1"),
            Self::Gemini => Some("https://generativelanguage.googleapis.com/v1beta/openai"),
            Self::HostedVllm | Self::Azure => None,
        }
    }
}

/// A parsed `api_base`: scheme, authority and the path prefix endpoints are appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase {
    /// `https`?
    pub tls: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port (default 443 / 80 by scheme).
    pub port: u16,
    /// Path prefix without a trailing slash (`/v1`, or empty).
    pub path: String,
}

impl fmt::Display for ApiBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// A virtual key from `keys:`.
#[derive(Debug, Clone)]
pub struct VirtualKey {
    /// SHA-256 of the key; the key itself is not kept.
    pub digest: KeyDigest,
    /// Name for logs and metrics (`key_alias`, else `key-<n>`).
    pub alias: String,
    /// Model groups this key may call; `None` = all.
    pub models: Option<Vec<String>>,
    /// Tokens per minute across all models.
    pub tpm_limit: Option<u64>,
    /// Requests per minute across all models.
    pub rpm_limit: Option<u64>,
    /// Tokens per minute per model group.
    pub model_tpm_limit: BTreeMap<String, u64>,
    /// Requests per minute per model group.
    pub model_rpm_limit: BTreeMap<String, u64>,
}

impl VirtualKey {
    /// Whether this key may call model group `group`.
    pub fn allows(&self, group: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|g| g == group))
    }
}

/// How a group's deployments are ordered (`router_settings.routing_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutingStrategy {
    /// Weighted random (`weight`, else `rpm`, else `tpm`), LiteLLM's default.
    #[default]
    SimpleShuffle,
    /// Fewest requests in flight.
    LeastBusy,
    /// Most remaining budget.
    UsageBased,
    /// Lowest recent latency.
    LatencyBased,
}

/// `router_settings`.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// How deployments are ordered within a group.
    pub routing_strategy: RoutingStrategy,
    /// Per group: groups to fall back to, in order.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Per group: groups to fall back to when the prompt is too long.
    pub context_window_fallbacks: BTreeMap<String, Vec<String>>,
    /// Per group: groups to fall back to on a content-filter error.
    pub content_policy_fallbacks: BTreeMap<String, Vec<String>>,
    /// Fallbacks for every group.
    pub default_fallbacks: Vec<String>,
    /// Retries for the whole chain (not per group).
    pub num_retries: u32,
    /// Failures within a minute before a deployment cools down.
    pub allowed_fails: u32,
    /// How long a deployment cools down.
    pub cooldown_time: Duration,
    /// Deadline for a request's whole chain of attempts (`router_settings.timeout`).
    pub timeout: Duration,
}

/// `limits`: rate-limit tuning (Sluice's own section).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// The window a `tpm`/`rpm` is counted over (60 s: "per minute").
    pub period: Duration,
    /// Slots per window; budget comes back slot by slot.
    pub slots: u32,
    /// How long a replica holds a lease before refunding what it did not use.
    pub lease_ttl: Duration,
    /// Leases cover this much of a replica's own demand.
    pub horizon: Duration,
    /// Largest lease as a fraction of the limit; with N replicas the overshoot bound is
    /// N × this × limit.
    pub max_lease_fraction: f64,
    /// What to do while Redis is unreachable.
    pub on_redis_error: OnRedisError,
    /// Completion tokens reserved when a request sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// Longest wait for one Redis call.
    pub redis_timeout: Duration,
    /// Longest a request waits on a Redis claim before it is served on credit, charged to
    /// Redis when the claim completes (`limits.admit_wait`, default 25 ms).
    pub admit_wait: Duration,
}

/// `limits.on_redis_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Enforce `limit ÷ replicas` per replica (default).
    Local,
    /// Admit everything.
    Open,
    /// Refuse everything.
    Closed,
}

/// Where Redis is.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// A `redis://`, `rediss://` or `redis+cluster://` URL (built from `redis_host`/`redis_port`
    /// when those are used).
    pub url: Secret,
}

/// One problem found while loading, named by the path of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the key, e.g. `model_list[2].litellm_params.tpm` (empty for the whole file).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A configuration that did not load: every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", render(.problems))]
pub struct ConfigError {
    /// At least one problem.
    pub problems: Vec<Problem>,
}

fn render(problems: &[Problem]) -> String {
    let mut out = format!("invalid config ({} problem(s))", problems.len());
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

/// A configuration that loaded, with the warnings it raised (e.g. ignored LiteLLM keys).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Keys that were ignored, with why.
    pub warnings: Vec<Problem>,
}
