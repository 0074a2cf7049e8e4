//! Which limits each request touches, registered once at start-up, and OpenAI's
//! `x-ratelimit-*` headers.

use http::{HeaderName, HeaderValue};
use pingora_http::ResponseHeader;
use sluice_config::Config;
use sluice_ratelimit::{Kind, LimitHandle, LimitSpec, Limiter};

use crate::Map;

/// Every scope's limits, looked up by index or deployment id on the request path.
pub struct Scopes {
    deployments: Map<String, Vec<LimitHandle>>,
    /// Per key (index as in `config.keys`), per group: the key's own limits plus its
    /// per-model limits for that group.
    keys: Vec<Map<String, Vec<LimitHandle>>>,
    by_id: Map<String, LimitHandle>,
}

impl Scopes {
    /// Registers the limits of every deployment and key in `config`.
    pub fn register(config: &Config, limiter: &Limiter) -> Self {
        let mut by_id = Map::default();
        let mut reg = |id: String, limit: Option<u64>, kind: Kind| {
            limit.map(|limit| {
                let h = limiter.register(LimitSpec {
                    id: id.clone(),
                    limit,
                    kind,
                });
                by_id.insert(id, h.clone());
                h
            })
        };
        let mut deployments = Map::default();
        for d in config.groups.iter().flat_map(|g| g.deployments.iter()) {
            let handles: Vec<LimitHandle> = [
                reg(format!("deployment:{}:tpm", d.id), d.tpm, Kind::Tokens),
                reg(format!("deployment:{}:rpm", d.id), d.rpm, Kind::Requests),
            ]
            .into_iter()
            .flatten()
            .collect();
            deployments.insert(d.id.clone(), handles);
        }
        let mut keys = Vec::new();
        for k in &config.keys {
            let a = &k.alias;
            let own: Vec<LimitHandle> = [
                reg(format!("key:{a}:tpm"), k.tpm_limit, Kind::Tokens),
                reg(format!("key:{a}:rpm"), k.rpm_limit, Kind::Requests),
            ]
            .into_iter()
            .flatten()
            .collect();
            let mut per_group = Map::default();
            for g in &config.groups {
                let mut handles = own.clone();
                handles.extend(
                    [
                        reg(
                            format!("key:{a}:{}:tpm", g.name),
                            k.model_tpm_limit.get(&g.name).copied(),
                            Kind::Tokens,
                        ),
                        reg(
                            format!("key:{a}:{}:rpm", g.name),
                            k.model_rpm_limit.get(&g.name).copied(),
                            Kind::Requests,
                        ),
                    ]
                    .into_iter()
                    .flatten(),
                );
                per_group.insert(g.name.clone(), handles);
            }
            keys.push(per_group);
        }
        Self {
            deployments,
            keys,
            by_id,
        }
    }

    /// The limits of deployment `id`.
    pub fn deployment(&self, id: &str) -> &[LimitHandle] {
        self.deployments.get(id).map_or(&[], Vec::as_slice)
    }

    /// The limits key `index` is under when calling `group`.
    pub fn key(&self, index: usize, group: &str) -> &[LimitHandle] {
        self.keys
            .get(index)
            .and_then(|g| g.get(group))
            .map_or(&[], Vec::as_slice)
    }

    /// Every registered limit.
    pub fn all(&self) -> impl Iterator<Item = &LimitHandle> {
        self.by_id.values()
    }

    /// Whether `id` is a key's own limit (not a per-model one): when it refuses, no other
    /// deployment or group can serve the request.
    pub fn is_key_wide(&self, id: &str) -> bool {
        id.starts_with("key:") && id.matches(':').count() == 2
    }

    /// The limit named `id`.
    pub fn handle(&self, id: &str) -> Option<LimitHandle> {
        self.by_id.get(id).cloned()
    }

    /// Headers describing the limit named `id`.
    pub fn rate_headers_for(&self, limiter: &Limiter, id: &str) -> RateHeaders {
        match self.by_id.get(id) {
            Some(h) => RateHeaders::of(limiter, &[h]),
            None => RateHeaders::default(),
        }
    }
}

/// OpenAI's `x-ratelimit-{limit,remaining}-{requests,tokens}` for the tightest limit of each
/// kind a request touched. Remaining is this replica's view: the ledger's last answer plus
/// what it holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateHeaders {
    tokens: Option<(u64, u64)>,
    requests: Option<(u64, u64)>,
}

impl RateHeaders {
    /// The tightest token and request limits among `handles`.
    pub fn of(limiter: &Limiter, handles: &[&LimitHandle]) -> Self {
        let mut out = Self::default();
        for h in handles {
            let pair = (h.spec().limit, limiter.remaining(h));
            let slot = match h.spec().kind {
                Kind::Tokens => &mut out.tokens,
                Kind::Requests => &mut out.requests,
            };
            if slot.is_none_or(|(_, rem)| pair.1 < rem) {
                *slot = Some(pair);
            }
        }
        out
    }

    /// Adds the headers to `out`.
    pub fn apply(&self, out: &mut impl SetHeaders) {
        for (name, value) in self.fields().into_iter().flatten() {
            out.set(name, value.into());
        }
    }

    /// The header fields, as names and numbers (those of a kind without a limit are `None`).
    pub fn fields(&self) -> [Option<(HeaderName, u64)>; 4] {
        let field = |pair: Option<(u64, u64)>, name: &'static str, limit: bool| {
            pair.map(|(l, r)| (HeaderName::from_static(name), if limit { l } else { r }))
        };
        [
            field(self.tokens, "x-ratelimit-limit-tokens", true),
            field(self.tokens, "x-ratelimit-remaining-tokens", false),
            field(self.requests, "x-ratelimit-limit-requests", true),
            field(self.requests, "x-ratelimit-remaining-requests", false),
        ]
    }
}

/// Where a response's header fields are set (Pingora's `ResponseHeader`; an answer relayed from
/// an upstream is a `downstream::AnswerHead` instead).
pub trait SetHeaders {
    /// Sets `name` to `value`, replacing what it had.
    fn set(&mut self, name: HeaderName, value: HeaderValue);
}

impl SetHeaders for ResponseHeader {
    fn set(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.insert_header(name, value);
    }
}
