//! The outbound allow-list: which top-level request fields a deployment may see.
//!
//! The body sent upstream is *built* from what is allowed; nothing is forwarded because it
//! was not on a block-list. Per field, in this order:
//!
//! 1. `model` is always rewritten to the deployment's model (not a filter decision).
//! 2. Internal fields ([`is_internal`]: credentials, routing, other gateways' state, anything
//!    starting with `_`) are dropped, whatever the configuration says.
//! 3. The deployment's `drop_fields` are dropped.
//! 4. Fields of the endpoint's table are kept, except OpenAI-only ones for other providers.
//! 5. The deployment's `extra_allowed_fields` are kept (e.g. vLLM's `top_k`, `guided_json`).
//! 6. Anything else is unknown: dropped (default) or, with `reject_unknown`, refused with 400.

use std::collections::HashMap;

use crate::Endpoint;

/// `POST /v1/chat/completions` request fields, from OpenAI's API reference (Create chat
/// completion), as published in October 2025; reviewed 2026-11-22.
pub const CHAT_COMPLETIONS_FIELDS: &[&str] = &[
    "messages",
    "model",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

/// `POST /v1/completions` (legacy) request fields, same reference and date.
pub const COMPLETIONS_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
];

/// `POST /v1/embeddings` request fields, same reference and date.
pub const EMBEDDINGS_FIELDS: &[&str] = &["input", "model", "dimensions", "encoding_format", "user"];

/// Fields only OpenAI's own API accepts: dropped for other providers (Azure, vLLM, Anthropic's
/// and Gemini's compatibility endpoints) unless a deployment allows them explicitly.
pub const OPENAI_ONLY_FIELDS: &[&str] = &[
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "prediction",
    "web_search_options",
    "verbosity",
];

/// Names that carry credentials, routing or another gateway's internals. Never forwarded.
const INTERNAL_FIELDS: &[&str] = &[
    "api_key",
    "api_base",
    "api_version",
    "base_url",
    "api_type",
    "organization",
    "custom_llm_provider",
    "deployment_id",
    "mock_response",
    "proxy_server_request",
    "secret_fields",
    "user_api_key",
    "user_api_key_alias",
    "metadata_internal",
];

/// Whether `field` is internal: in the list above, or starting with `_`, `litellm_` or
/// `sluice_`. Such fields are never sent upstream, whatever the configuration says.
pub fn is_internal(field: &str) -> bool {
    field.starts_with('_')
        || field.starts_with("litellm_")
        || field.starts_with("sluice_")
        || INTERNAL_FIELDS.contains(&field)
}

/// The fields `endpoint` accepts (OpenAI's table).
pub fn endpoint_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::ChatCompletions => CHAT_COMPLETIONS_FIELDS,
        Endpoint::Completions => COMPLETIONS_FIELDS,
        Endpoint::Embeddings => EMBEDDINGS_FIELDS,
    }
}

/// What one deployment accepts beyond (or short of) its endpoint's table.
#[derive(Debug, Clone, Default)]
pub struct FieldPolicy {
    /// The provider is OpenAI itself: [`OPENAI_ONLY_FIELDS`] pass.
    pub openai: bool,
    /// Fields allowed on top of the endpoint's table.
    pub extra_allowed: Vec<String>,
    /// Fields always dropped.
    pub drop: Vec<String>,
    /// Refuse a request with an unknown field instead of dropping it.
    pub reject_unknown: bool,
}

/// Why a field was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Internal, credential or routing field.
    Internal,
    /// In the deployment's `drop_fields`.
    Configured,
    /// OpenAI-only, and the provider is not OpenAI.
    Provider,
    /// In no allow-list.
    Unknown,
}

impl DropReason {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Configured => "configured",
            Self::Provider => "provider",
            Self::Unknown => "unknown",
        }
    }
}

/// The decision for one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Keep,
    /// Leave it out.
    Drop(DropReason),
    /// Refuse the request (unknown field, `reject_unknown`).
    Reject,
}

impl FieldPolicy {
    /// The verdict for `field` on `endpoint` (see the module docs for the order).
    pub fn verdict(&self, endpoint: Endpoint, field: &str) -> Verdict {
        if is_internal(field) {
            return Verdict::Drop(DropReason::Internal);
        }
        if self.drop.iter().any(|d| d == field) {
            return Verdict::Drop(DropReason::Configured);
        }
        let extra = self.extra_allowed.iter().any(|e| e == field);
        if endpoint_fields(endpoint).contains(&field) {
            if !self.openai && !extra && OPENAI_ONLY_FIELDS.contains(&field) {
                return Verdict::Drop(DropReason::Provider);
            }
            return Verdict::Keep;
        }
        if extra {
            Verdict::Keep
        } else if self.reject_unknown {
            Verdict::Reject
        } else {
            Verdict::Drop(DropReason::Unknown)
        }
    }
}

/// What decides a field's fate: a [`FieldPolicy`] as configured, or the [`Allowlist`] compiled
/// from it for the request path. Both give the same answers.
pub trait Policy {
    /// The verdict for `field` on `endpoint`.
    fn verdict(&self, endpoint: Endpoint, field: &str) -> Verdict;

    /// The field's metric label ([`field_label`]).
    fn label(&self, field: &str) -> &'static str {
        field_label(field)
    }
}

impl Policy for FieldPolicy {
    fn verdict(&self, endpoint: Endpoint, field: &str) -> Verdict {
        FieldPolicy::verdict(self, endpoint, field)
    }
}

/// A [`FieldPolicy`] compiled into one hash lookup per field: every name the tables or the
/// policy mention, with its verdict on each endpoint and its metric label. A name in none of
/// them is unknown (or internal by its prefix), which needs no table.
///
/// `FieldPolicy::verdict` walks the lists (the internal names, `drop_fields`, the endpoint's
/// table, `extra_allowed_fields`): ~60 string comparisons for a field that is in the chat table
/// near its end, and every list for one that is in none. On the load bench's request (five
/// top-level fields) that was ~1.5k instructions a request, against ~50 a lookup here.
#[derive(Debug, Clone)]
pub struct Allowlist {
    names: HashMap<Box<str>, Listed, foldhash::fast::RandomState>,
    reject_unknown: bool,
}

/// A name the allow-list knows.
#[derive(Debug, Clone, Copy)]
struct Listed {
    /// By [`Endpoint::index`].
    verdicts: [Verdict; Endpoint::COUNT],
    label: &'static str,
}

impl FieldPolicy {
    /// This policy, compiled for the request path.
    pub fn compile(&self) -> Allowlist {
        let names = CHAT_COMPLETIONS_FIELDS
            .iter()
            .chain(COMPLETIONS_FIELDS)
            .chain(EMBEDDINGS_FIELDS)
            .chain(OPENAI_ONLY_FIELDS)
            .chain(INTERNAL_FIELDS)
            .copied()
            .chain(self.extra_allowed.iter().map(String::as_str))
            .chain(self.drop.iter().map(String::as_str))
            .map(|name| {
                let listed = Listed {
                    verdicts: Endpoint::ALL.map(|e| self.verdict(e, name)),
                    label: field_label(name),
                };
                (name.into(), listed)
            })
            .collect();
        Allowlist {
            names,
            reject_unknown: self.reject_unknown,
        }
    }
}

impl Policy for Allowlist {
    fn verdict(&self, endpoint: Endpoint, field: &str) -> Verdict {
        match self.names.get(field) {
            Some(listed) => listed.verdicts[endpoint.index()],
            // In no list: what `FieldPolicy::verdict` decides for such a name.
            None if is_internal(field) => Verdict::Drop(DropReason::Internal),
            None if self.reject_unknown => Verdict::Reject,
            None => Verdict::Drop(DropReason::Unknown),
        }
    }

    fn label(&self, field: &str) -> &'static str {
        self.names.get(field).map_or("other", |listed| listed.label)
    }
}

/// A bounded metric label for a field name: the name itself when it is in one of the tables
/// above, else `other` (client-chosen names must not become label values).
pub fn field_label(field: &str) -> &'static str {
    CHAT_COMPLETIONS_FIELDS
        .iter()
        .chain(COMPLETIONS_FIELDS)
        .chain(EMBEDDINGS_FIELDS)
        .chain(INTERNAL_FIELDS)
        .find(|f| **f == field)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Endpoint::*;

    #[test]
    fn verdicts_follow_the_documented_order() {
        let vllm = FieldPolicy {
            openai: false,
            extra_allowed: vec!["top_k".into(), "api_key".into(), "store".into()],
            drop: vec!["temperature".into()],
            reject_unknown: false,
        };
        let cases = [
            ("messages", Verdict::Keep),
            ("top_k", Verdict::Keep),
            ("api_key", Verdict::Drop(DropReason::Internal)),
            (
                "_litellm_rate_limit_descriptors",
                Verdict::Drop(DropReason::Internal),
            ),
            ("litellm_params", Verdict::Drop(DropReason::Internal)),
            ("temperature", Verdict::Drop(DropReason::Configured)),
            ("metadata", Verdict::Drop(DropReason::Provider)),
            ("store", Verdict::Keep),
            ("guided_json", Verdict::Drop(DropReason::Unknown)),
        ];
        for (field, want) in cases {
            assert_eq!(vllm.verdict(ChatCompletions, field), want, "{field}");
        }
        let openai = FieldPolicy {
            openai: true,
            reject_unknown: true,
            ..FieldPolicy::default()
        };
        assert_eq!(openai.verdict(ChatCompletions, "metadata"), Verdict::Keep);
        assert_eq!(
            openai.verdict(ChatCompletions, "guided_json"),
            Verdict::Reject
        );
        assert_eq!(
            openai.verdict(ChatCompletions, "_x"),
            Verdict::Drop(DropReason::Internal)
        );
        assert_eq!(openai.verdict(Embeddings, "messages"), Verdict::Reject);
        assert_eq!(openai.verdict(Embeddings, "dimensions"), Verdict::Keep);
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(field_label("temperature"), "temperature");
        assert_eq!(field_label("api_base"), "api_base");
        assert_eq!(field_label("anything-a-client-invents"), "other");
    }
}
