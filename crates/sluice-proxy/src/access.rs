//! One JSON access-log line per API request (log target `sluice::access`).
//!
//! It names who called (key alias, never the key), what they asked for, every deployment that
//! was tried and how that went, every one passed over and why, the status, the tokens settled
//! and the time taken. Never a key, a body or a header value other than the request id.

use serde::Serialize;
use sluice_config::AccessLog;
use tokio::time::Instant;

/// The record of one request, filled in along its path and written when it ends.
#[derive(Debug, Serialize)]
pub struct Access {
    #[serde(skip)]
    started: Instant,
    /// Time spent with upstreams (for the overhead metric).
    #[serde(skip)]
    pub upstream_time: std::time::Duration,
    /// The client's `x-request-id` (when it is a sane token), else a generated one.
    pub request_id: String,
    method: String,
    path: String,
    /// The key's alias (`master` for the master key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The model group asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Deployments tried, in order, with what happened.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<Tried>,
    /// Deployments passed over without a call, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
    status: u16,
    /// Tokens settled (the response's `usage`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    duration_ms: f64,
}

/// One attempt.
#[derive(Debug, Serialize)]
pub struct Tried {
    /// Deployment id.
    pub deployment: String,
    /// `ok`, `http_<status>`, `connect_error`, `timeout`, `broken`.
    pub outcome: String,
}

/// One candidate passed over.
#[derive(Debug, Serialize)]
pub struct Skipped {
    /// Deployment id.
    pub deployment: String,
    /// `budget`, `cooldown` or `context_window`.
    pub reason: &'static str,
}

impl Access {
    /// Starts a record for a request that arrived at `started`.
    pub fn start(started: Instant, method: &str, path: &str, request_id: Option<&[u8]>) -> Self {
        let request_id = request_id
            .filter(|id| {
                !id.is_empty() && id.len() <= 128 && id.iter().all(|b| b.is_ascii_graphic())
            })
            .and_then(|id| std::str::from_utf8(id).ok())
            .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned);
        Self {
            started,
            upstream_time: std::time::Duration::ZERO,
            request_id,
            method: method.to_owned(),
            path: path.to_owned(),
            key: None,
            group: None,
            tried: Vec::new(),
            skipped: Vec::new(),
            status: 0,
            tokens: None,
            duration_ms: 0.0,
        }
    }

    /// Notes an attempt.
    pub fn tried(&mut self, deployment: &str, outcome: impl Into<String>) {
        self.tried.push(Tried {
            deployment: deployment.to_owned(),
            outcome: outcome.into(),
        });
    }

    /// Notes a candidate passed over.
    pub fn skipped(&mut self, deployment: &str, reason: &'static str) {
        self.skipped.push(Skipped {
            deployment: deployment.to_owned(),
            reason,
        });
    }

    /// Writes the line in `format`.
    pub fn finish(mut self, status: u16, format: AccessLog) {
        self.status = status;
        self.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        match format {
            AccessLog::Off => {}
            AccessLog::Json => crate::logging::access_line(|out| {
                // Serializing into a Vec fails only on a non-string map key: there is none.
                let _ = serde_json::to_writer(out, &self);
            }),
            AccessLog::Text => {
                let list = |items: Vec<String>| {
                    if items.is_empty() {
                        "-".to_owned()
                    } else {
                        items.join(",")
                    }
                };
                let tried = list(
                    self.tried
                        .iter()
                        .map(|t| format!("{}:{}", t.deployment, t.outcome))
                        .collect(),
                );
                let skipped = list(
                    self.skipped
                        .iter()
                        .map(|s| format!("{}:{}", s.deployment, s.reason))
                        .collect(),
                );
                log::info!(
                    target: crate::logging::ACCESS_TARGET,
                    "request_id={} key={} {} {} group={} status={} tokens={} duration_ms={:.1} tried={tried} skipped={skipped}",
                    self.request_id,
                    self.key.as_deref().unwrap_or("-"),
                    self.method,
                    self.path,
                    self.group.as_deref().unwrap_or("-"),
                    self.status,
                    self.tokens.map_or_else(|| "-".to_owned(), |t| t.to_string()),
                    self.duration_ms,
                );
            }
        }
    }
}
