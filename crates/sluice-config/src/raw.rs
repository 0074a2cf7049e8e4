//! Stage one: the YAML as written, before validation.
//!
//! These structs mirror LiteLLM's `config.yaml` names so a LiteLLM file deserializes unchanged.
//! Unknown keys are *not* rejected by serde here: [`crate::load`] walks the ignored keys with
//! `serde_ignored` so it can warn about known-but-unsupported LiteLLM keys and report every
//! unknown key, not just the first.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One entry of `model_list`.
#[derive(Debug, Deserialize)]
pub(crate) struct RawDeployment {
    pub model_name: String,
    pub litellm_params: RawLitellmParams,
    #[serde(default)]
    pub model_info: RawModelInfo,
    /// Sluice's own per-deployment settings.
    #[serde(default)]
    pub sluice: RawDeploymentSluice,
}

/// `model_list[].sluice`: what LiteLLM has no key for.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawDeploymentSluice {
    #[serde(default)]
    pub extra_allowed_fields: Vec<String>,
    #[serde(default)]
    pub drop_fields: Vec<String>,
}

/// `model_list[].litellm_params`.
#[derive(Debug, Deserialize)]
pub(crate) struct RawLitellmParams {
    pub model: String,
    pub api_base: Option<String>,
    pub api_key: Option<String>,
    pub api_version: Option<String>,
    pub tpm: Option<u64>,
    pub rpm: Option<u64>,
    pub weight: Option<f64>,
    pub order: Option<u32>,
    pub timeout: Option<f64>,
    pub stream_timeout: Option<f64>,
    pub organization: Option<String>,
    /// LiteLLM's name for fields to drop for this deployment.
    pub additional_drop_params: Option<Vec<String>>,
}

/// `model_list[].model_info` (LiteLLM); only the keys Sluice uses are typed.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawModelInfo {
    pub id: Option<String>,
    pub max_input_tokens: Option<u64>,
}

/// `general_settings`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawGeneralSettings {
    pub master_key: Option<String>,
}

/// `router_settings`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawRouterSettings {
    pub routing_strategy: Option<String>,
    pub fallbacks: Option<Vec<BTreeMap<String, Vec<String>>>>,
    pub context_window_fallbacks: Option<Vec<BTreeMap<String, Vec<String>>>>,
    pub content_policy_fallbacks: Option<Vec<BTreeMap<String, Vec<String>>>>,
    pub default_fallbacks: Option<Vec<String>>,
    pub num_retries: Option<u32>,
    pub allowed_fails: Option<u32>,
    pub cooldown_time: Option<f64>,
    pub timeout: Option<f64>,
    pub stream_timeout: Option<f64>,
    pub redis_host: Option<String>,
    pub redis_port: Option<u16>,
    pub redis_password: Option<String>,
    pub redis_url: Option<String>,
}

/// `server`: Sluice's listener settings.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawServer {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub max_body_bytes: Option<u64>,
    pub threads: Option<usize>,
    pub grace_period: Option<f64>,
    pub client_timeout: Option<f64>,
    pub deployment_header: Option<bool>,
    pub admin_listen: Option<String>,
    pub access_log: Option<String>,
    pub tls: Option<RawTls>,
    pub h2c: Option<bool>,
}

/// `server.tls`.
#[derive(Debug, Deserialize)]
pub(crate) struct RawTls {
    pub cert: String,
    pub key: String,
}

/// `limits`: Sluice's rate-limit tuning.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawLimits {
    pub period: Option<f64>,
    pub slots: Option<u32>,
    pub lease_ttl: Option<f64>,
    pub horizon: Option<f64>,
    pub max_lease_fraction: Option<f64>,
    pub on_redis_error: Option<String>,
    pub default_max_tokens: Option<u64>,
    pub redis_timeout: Option<f64>,
    pub admit_wait: Option<f64>,
}

/// `filter`: the outbound allow-list's global setting.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawFilter {
    pub unknown_fields: Option<String>,
}

/// One entry of `keys`: a virtual key.
#[derive(Debug, Deserialize)]
pub(crate) struct RawKey {
    pub key: Option<String>,
    pub key_sha256: Option<String>,
    pub key_alias: Option<String>,
    pub models: Option<Vec<String>>,
    pub tpm_limit: Option<u64>,
    pub rpm_limit: Option<u64>,
    #[serde(default)]
    pub model_tpm_limit: BTreeMap<String, u64>,
    #[serde(default)]
    pub model_rpm_limit: BTreeMap<String, u64>,
}

/// Keys LiteLLM understands that Sluice does not implement: a file carrying them still loads,
/// with a warning per key. Anything neither typed above nor listed here is an error.
///
/// Taken from LiteLLM's proxy config reference (`config_settings` page) for the sections a
/// gateway config uses; sections Sluice does not read at all (`litellm_settings`,
/// `environment_variables`, …) are listed in [`LITELLM_SECTIONS`] instead.
pub(crate) const LITELLM_KNOWN_KEYS: &[&str] = &[
    // litellm_params
    "custom_llm_provider",
    "max_retries",
    "input_cost_per_token",
    "output_cost_per_token",
    "input_cost_per_second",
    "output_cost_per_second",
    "region_name",
    "max_parallel_requests",
    "max_budget",
    "budget_duration",
    "use_in_pass_through",
    "merge_reasoning_content_in_choices",
    "tags",
    "api_type",
    "drop_params",
    "mock_response",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_region_name",
    "vertex_project",
    "vertex_location",
    "vertex_credentials",
    "azure_ad_token",
    "azure_ad_token_provider",
    "tenant_id",
    "client_id",
    "client_secret",
    "configurable_clientside_auth_params",
    "litellm_credential_name",
    // model_info
    "mode",
    "base_model",
    "max_tokens",
    "max_output_tokens",
    "supports_function_calling",
    "supports_vision",
    "supports_response_schema",
    "access_groups",
    "db_model",
    "team_id",
    // general_settings
    "database_url",
    "database_connection_pool_limit",
    "database_connection_timeout",
    "store_model_in_db",
    "disable_spend_logs",
    "alerting",
    "alerting_threshold",
    "proxy_batch_write_at",
    "background_health_checks",
    "health_check_interval",
    "allowed_routes",
    "admin_only_routes",
    "enforce_user_param",
    "ui_access_mode",
    "custom_auth",
    "master_key_env",
    "max_request_size_mb",
    "max_response_size_mb",
    "forward_client_headers_to_llm_api",
    "pass_through_endpoints",
    // router_settings
    "enable_pre_call_checks",
    "retry_policy",
    "allowed_fails_policy",
    "model_group_alias",
    "cache_responses",
    "routing_strategy_args",
    "redis_db",
    "enable_tag_filtering",
    "provider_budget_config",
    "disable_cooldowns",
    "retry_after",
    "set_verbose",
    "debug_level",
    "max_fallbacks",
    "optional_pre_call_checks",
];

/// Top-level sections of a LiteLLM config that Sluice does not read: each key inside them
/// warns.
pub(crate) const LITELLM_SECTIONS: &[&str] = &[
    "litellm_settings",
    "environment_variables",
    "credential_list",
    "callback_settings",
    "guardrails",
    "files_settings",
    "finetune_settings",
    "assistant_settings",
];
