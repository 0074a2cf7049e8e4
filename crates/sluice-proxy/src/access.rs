//! One JSON access-log line per API request (log target `sluice::access`).
//!
//! It names who called (key alias, never the key), what they asked for, every deployment that
//! was tried and how that went, every one passed over and why, the status, the tokens settled
//! and the time taken. Never a key, a body or a header value other than the request id.

use sluice_config::AccessLog;
use tokio::time::Instant;

/// The record of one request, filled in along its path and written when it ends.
#[derive(Debug)]
pub struct Access<'a> {
    started: Instant,
    /// Time spent with upstreams (for the overhead metric).
    pub upstream_time: std::time::Duration,
    /// The client's `x-request-id` (when it is a sane token), else a generated one.
    request_id: RequestId,
    method: http::Method,
    path: String,
    /// The key's alias (`master` for the master key).
    pub key: Option<&'a str>,
    /// The model group asked for.
    pub group: Option<&'a str>,
    /// Deployments tried, in order, with what happened.
    pub tried: Vec<Tried<'a>>,
    /// Deployments passed over without a call, with why.
    pub skipped: Vec<Skipped<'a>>,
    status: u16,
    /// Tokens settled (the response's `usage`), when known.
    pub tokens: Option<u64>,
    took: std::time::Duration,
}

/// One attempt.
#[derive(Debug)]
pub struct Tried<'a> {
    /// Deployment id.
    pub deployment: &'a str,
    /// What happened.
    pub outcome: Outcome,
}

/// How an attempt went: an upstream's HTTP status (written `http_<status>`), or a failure
/// without one (`connect_error`, `timeout`, `broken`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Http(u16),
    /// No answer; the failure's label.
    Failed(&'static str),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(status) => write!(f, "http_{status}"),
            Self::Failed(label) => f.write_str(label),
        }
    }
}

/// One candidate passed over.
#[derive(Debug)]
pub struct Skipped<'a> {
    /// Deployment id.
    pub deployment: &'a str,
    /// `budget`, `cooldown` or `context_window`.
    pub reason: &'static str,
}

/// A request's id: the client's, or 16 random hex digits of Sluice's (kept inline: no
/// allocation for the common request that brings none).
#[derive(Debug)]
enum RequestId {
    Client(String),
    Generated([u8; 16]),
}

impl<'a> Access<'a> {
    /// Starts a record for a request that arrived at `started`, taking over its `path` and the
    /// client's `x-request-id` value, if any.
    pub fn start(
        started: Instant,
        method: http::Method,
        path: String,
        request_id: Option<Vec<u8>>,
    ) -> Self {
        let request_id = request_id
            .filter(|id| {
                !id.is_empty() && id.len() <= 128 && id.iter().all(|b| b.is_ascii_graphic())
            })
            .and_then(|id| String::from_utf8(id).ok())
            .map_or_else(generated_id, RequestId::Client);
        Self {
            started,
            upstream_time: std::time::Duration::ZERO,
            request_id,
            method,
            path,
            key: None,
            group: None,
            tried: Vec::new(),
            skipped: Vec::new(),
            status: 0,
            tokens: None,
            took: std::time::Duration::ZERO,
        }
    }

    /// The request's id (the client's `x-request-id` when it sent a sane one).
    pub fn request_id(&self) -> &str {
        match &self.request_id {
            RequestId::Client(id) => id,
            // Hex digits: ASCII, so this cannot fail.
            RequestId::Generated(hex) => std::str::from_utf8(hex).unwrap_or_default(),
        }
    }

    /// The request's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Notes an attempt.
    pub fn tried(&mut self, deployment: &'a str, outcome: Outcome) {
        self.tried.push(Tried {
            deployment,
            outcome,
        });
    }

    /// Notes a candidate passed over.
    pub fn skipped(&mut self, deployment: &'a str, reason: &'static str) {
        self.skipped.push(Skipped { deployment, reason });
    }

    /// The JSON line: fields in declaration order, absent ones (no key, nothing tried, …) left
    /// out. Written by hand: through serde, escaping went byte by byte through every string
    /// (1.9k instructions a line, 3 % of a request); here a string with nothing to escape, which
    /// is every one but a hostile path, is copied whole.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"request_id\":");
        json_str(out, self.request_id());
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method.as_str());
        out.extend_from_slice(b",\"path\":");
        json_str(out, &self.path);
        if let Some(key) = &self.key {
            out.extend_from_slice(b",\"key\":");
            json_str(out, key);
        }
        if let Some(group) = &self.group {
            out.extend_from_slice(b",\"group\":");
            json_str(out, group);
        }
        json_objects(out, b"tried", &self.tried, |out, t| {
            out.extend_from_slice(b"\"deployment\":");
            json_str(out, t.deployment);
            out.extend_from_slice(b",\"outcome\":\"");
            // Labels are fixed identifiers and `http_` a number: nothing to escape.
            match t.outcome {
                Outcome::Http(status) => {
                    out.extend_from_slice(b"http_");
                    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
                }
                Outcome::Failed(label) => out.extend_from_slice(label.as_bytes()),
            }
            out.push(b'"');
        });
        json_objects(out, b"skipped", &self.skipped, |out, s| {
            out.extend_from_slice(b"\"deployment\":");
            json_str(out, s.deployment);
            out.extend_from_slice(b",\"reason\":");
            json_str(out, s.reason);
        });
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        if let Some(tokens) = self.tokens {
            out.extend_from_slice(b",\"tokens\":");
            out.extend_from_slice(itoa::Buffer::new().format(tokens).as_bytes());
        }
        out.extend_from_slice(b",\"duration_ms\":");
        write_millis(out, self.took);
        out.push(b'}');
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Writes the line in `format`; `took` is the request's time from `started` to its end.
    pub fn finish(mut self, status: u16, took: std::time::Duration, format: AccessLog) {
        self.status = status;
        self.took = took;
        match format {
            AccessLog::Off => {}
            AccessLog::Json => {
                let at = self.started + took;
                crate::logging::access_line(at, |out| self.write_json(out));
            }
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
                    self.request_id(),
                    self.key.unwrap_or("-"),
                    self.method,
                    self.path,
                    self.group.unwrap_or("-"),
                    self.status,
                    self.tokens.map_or_else(|| "-".to_owned(), |t| t.to_string()),
                    self.took.as_secs_f64() * 1000.0,
                );
            }
        }
    }
}

/// A request id for a request that came without one: 16 random hex digits (written without
/// `format!`, whose machinery was ~500 instructions a request).
fn generated_id() -> RequestId {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = rand::random::<u64>();
    RequestId::Generated(std::array::from_fn(|i| {
        HEX[((n >> ((15 - i) * 4)) & 0xf) as usize]
    }))
}

/// `took` in milliseconds to the microsecond, as a JSON number with three decimals (`1.170`):
/// what a reader of the log wants, where the float's own digits (`1.1703860000000001`) were
/// noise from the nanosecond clock.
fn write_millis(out: &mut Vec<u8>, took: std::time::Duration) {
    let micros = took.as_micros();
    out.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    let frac = (micros % 1000) as u16; // below 1000
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `,"name":[{…},…]` for a non-empty list, each object's fields written by `fields`; nothing
/// for an empty one.
fn json_objects<T>(out: &mut Vec<u8>, name: &[u8], items: &[T], fields: impl Fn(&mut Vec<u8>, &T)) {
    if items.is_empty() {
        return;
    }
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name);
    out.extend_from_slice(b"\":[");
    for (i, item) in items.iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"{" } else { b",{" });
        fields(out, item);
        out.push(b'}');
    }
    out.push(b']');
}

/// `s` as a JSON string: copied between quotes when nothing in it needs escaping, else
/// escaped by `serde_json`.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Serializing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// The bytes a JSON string must escape: control characters, `"` and `\`.
const ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Whether any byte of `s` needs escaping in a JSON string. Every byte is looked at, with no
/// exit on the first that does: without a branch per byte, a short string (the line's ids,
/// names and path, all under 32 bytes) takes a table lookup and an OR a byte, and a long one
/// (only a client's path can be) compiles to SIMD compares, 16 bytes a step. (One comparison
/// loop for both left the short strings to its scalar tail: ~600 instructions a line.)
fn needs_escape(s: &[u8]) -> bool {
    if s.len() < 64 {
        s.iter()
            .fold(false, |escape, &b| escape | ESCAPE[usize::from(b)])
    } else {
        !s.iter().fold(true, |plain, &b| {
            plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_json_line_is_json_with_every_field_and_escapes_what_it_must() {
        let start = |method: &str, path: &str, id: Option<&[u8]>| {
            Access::start(
                Instant::now(),
                method.parse().unwrap(),
                path.to_owned(),
                id.map(<[u8]>::to_vec),
            )
        };
        let mut a = start("POST", "/v1/chat/completions", Some(b"r-1"));
        let line = |a: &Access| {
            let mut out = Vec::new();
            a.write_json(&mut out);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        let v = line(&a);
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["path"], "/v1/chat/completions");
        assert_eq!(v.as_object().unwrap().len(), 5, "{v}"); // absent fields left out
        assert_eq!(a.request_id(), "r-1");
        let generated = start("GET", "/", Some(b"bad id")).request_id().to_owned();
        assert_eq!(generated.len(), 16, "{generated}");
        assert!(generated
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let other = start("GET", "/", None).request_id().to_owned();
        assert_ne!(generated, other, "random ids");
        let fresh = start("GET", "/", None);
        let v = line(&fresh);
        assert_eq!(
            v["request_id"],
            fresh.request_id(),
            "the line has the generated id"
        );
        assert_eq!(v["method"], "GET");
        assert!(v["duration_ms"].is_f64());

        a.path = "/odd\"path\\with\u{1}é\n".to_owned();
        a.key = Some("team");
        a.group = Some("m");
        a.tried("m.0", Outcome::Http(503));
        a.tried("m.1", Outcome::Failed("timeout"));
        a.skipped("m.2", "budget");
        a.status = 200;
        a.tokens = Some(374);
        let v = line(&a);
        assert_eq!(v["path"], "/odd\"path\\with\u{1}é\n");
        // Whatever the byte's place in a long string (the check runs 16 bytes a step).
        for odd in ["\"", "\\", "\u{1f}"] {
            a.path = format!("/{}{odd}", "p".repeat(40));
            assert_eq!(line(&a)["path"].as_str(), Some(a.path.as_str()));
        }
        assert_eq!(
            (
                v["key"].as_str(),
                v["group"].as_str(),
                v["status"].as_u64(),
                v["tokens"].as_u64()
            ),
            (Some("team"), Some("m"), Some(200), Some(374))
        );
        assert_eq!(
            v["tried"],
            serde_json::json!([
                {"deployment": "m.0", "outcome": "http_503"},
                {"deployment": "m.1", "outcome": "timeout"},
            ])
        );
        assert_eq!(
            v["skipped"],
            serde_json::json!([{"deployment": "m.2", "reason": "budget"}])
        );
    }

    #[test]
    fn needs_escape_finds_any_byte_json_escapes_at_any_length() {
        for len in [0, 1, 15, 16, 31, 63, 64, 65, 200] {
            let plain = "a".repeat(len);
            assert!(!needs_escape(plain.as_bytes()), "{len} plain bytes");
            for at in [0, len / 2, len.saturating_sub(1)] {
                if len == 0 {
                    continue;
                }
                for odd in [0u8, 0x1f, b'"', b'\\'] {
                    let mut s = plain.clone().into_bytes();
                    s[at] = odd;
                    assert!(needs_escape(&s), "{odd:#x} at {at} of {len}");
                }
                // Neighbours of the escaped set pass: space, DEL, non-ASCII.
                for fine in [b' ', b'!', b'#', b'[', b']', 0x7f, 0xc3, 0xff] {
                    let mut s = plain.clone().into_bytes();
                    s[at] = fine;
                    assert!(!needs_escape(&s), "{fine:#x} at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn durations_are_milliseconds_to_the_microsecond() {
        let text = |nanos: u64| {
            let mut out = Vec::new();
            write_millis(&mut out, std::time::Duration::from_nanos(nanos));
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(1_170_386_000), "1170.386");
        assert_eq!(text(1_170_386), "1.170");
        assert_eq!(text(50_999), "0.050");
        assert_eq!(text(999), "0.000");
        assert_eq!(text(12_000_000), "12.000");
        assert_eq!(text(3_600_000_001_000), "3600000.001");
        // Always a JSON number that reads back as the same milliseconds.
        let v: serde_json::Value = serde_json::from_str(&text(1_170_386)).unwrap();
        assert_eq!(v.as_f64(), Some(1.17));
    }
}
