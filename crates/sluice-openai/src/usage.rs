//! Reading `usage` out of responses, JSON or SSE, as they pass through.

use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;

/// OpenAI's `usage` object (the fields Sluice settles with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens (0 for embeddings).
    #[serde(default)]
    pub completion_tokens: u64,
    /// Total, when the provider sends it.
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// Tokens to charge: `total_tokens`, else prompt + completion.
    pub fn tokens(&self) -> u64 {
        if self.total_tokens > 0 {
            self.total_tokens
        } else {
            self.prompt_tokens + self.completion_tokens
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<Usage>,
    choices: Option<Elements>,
}

/// A JSON array read only for how many elements it has (each is checked and skipped; nothing
/// is allocated, unlike a `Vec<IgnoredAny>`).
struct Elements(usize);

impl<'de> Deserialize<'de> for Elements {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Counter;
        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = Elements;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Elements, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Elements(n))
            }
        }
        d.deserialize_seq(Counter)
    }
}

/// The `usage` of a whole JSON response body, if it has one.
pub fn usage_of_json(body: &[u8]) -> Option<Usage> {
    json_answer(body).flatten()
}

/// Reads a whole JSON answer: `None` when it is not JSON at all (a broken upstream; JSON is
/// UTF-8, RFC 8259 §8.1, so invalid UTF-8 anywhere counts as broken), else its `usage` if it
/// has one.
///
/// The body is checked as UTF-8 whole (with SIMD) and then read as text: serde_json reading
/// bytes checks every key and string it keeps on its own, which cost more than the whole check.
pub fn json_answer(body: &[u8]) -> Option<Option<Usage>> {
    let text = simdutf8::basic::from_utf8(body).ok()?;
    match serde_json::from_str::<WithUsage>(text) {
        Ok(w) => Some(w.usage),
        Err(_) => serde_json::from_str::<IgnoredAny>(text).ok().map(|_| None),
    }
}

/// Relays an SSE body event by event, noting the `usage` it carries.
///
/// With `strip_usage_chunk`, the usage-only chunk (`choices: []`, `usage: {…}`) is held back:
/// Sluice asked for it on the client's behalf and the client did not. Otherwise bytes go out
/// exactly as they came in, chunk for chunk.
#[derive(Debug)]
pub struct SseRelay {
    strip_usage_chunk: bool,
    pending: BytesMut,
    usage: Option<Usage>,
    chunks: u64,
}

impl SseRelay {
    /// A relay; see the type docs for `strip_usage_chunk`.
    pub fn new(strip_usage_chunk: bool) -> Self {
        Self {
            strip_usage_chunk,
            pending: BytesMut::new(),
            usage: None,
            chunks: 0,
        }
    }

    /// The usage seen so far (the last one wins).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Data events seen, other than `[DONE]` and the usage-only chunk. Providers stream about
    /// one token per event, so this is the completion so far of a stream cut short.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Takes one chunk from upstream and returns what to send downstream now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if !self.strip_usage_chunk {
            // Scan complete lines for usage; forward the chunk untouched.
            self.pending.extend_from_slice(&chunk);
            while let Some(end) = memchr::memchr(b'\n', &self.pending) {
                let line = self.pending.split_to(end + 1);
                self.scan_line(&line);
            }
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        while let Some((end, sep)) = event_end(&self.pending) {
            let event = self.pending.split_to(end + sep);
            let mut usage_only = false;
            for line in event[..].split(|b| *b == b'\n') {
                usage_only |= self.scan_line(line) == Some(true);
            }
            if !usage_only {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// What is left at the end of the stream (an unterminated last event), to forward as is.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if !self.strip_usage_chunk {
            self.scan_line(&rest);
        }
        rest
    }

    /// Notes usage on a `data:` line. `Some(true)` when the line is a usage-only chunk.
    fn scan_line(&mut self, line: &[u8]) -> Option<bool> {
        let data = line.strip_prefix(b"data:")?.trim_ascii();
        if data == b"[DONE]" {
            return Some(false);
        }
        let usage_only = memchr_usage(data).is_some() && self.note_usage(data);
        if !usage_only {
            self.chunks += 1;
        }
        Some(usage_only)
    }

    /// Reads `usage` from an event's JSON; true when the event is the usage-only chunk.
    fn note_usage(&mut self, data: &[u8]) -> bool {
        let Ok(parsed) = serde_json::from_slice::<WithUsage>(data) else {
            return false;
        };
        let Some(usage) = parsed.usage else {
            return false;
        };
        self.usage = Some(usage);
        parsed.choices.is_none_or(|c| c.0 == 0)
    }
}

/// Where an event may carry usage: after a `"usage"` key whose value is not `null`. OpenAI
/// sends `"usage":null` in every chunk of a stream that asked for usage; those are skipped
/// without parsing the event.
fn memchr_usage(data: &[u8]) -> Option<usize> {
    let finder = memchr::memmem::Finder::new(b"\"usage\"");
    let mut from = 0;
    while let Some(at) = finder.find(&data[from..]) {
        let key = from + at;
        let rest = data[key + 7..].trim_ascii_start();
        let value = rest.strip_prefix(b":").map(<[u8]>::trim_ascii_start);
        match value {
            Some(v) if v.starts_with(b"null") => from = key + 7,
            _ => return Some(key),
        }
    }
    None
}

/// The end of the first complete event in `buf`: (index of the blank line, its length).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n",
        "data: [DONE]\n\n"
    );

    fn relay_in_pieces(strip: bool, piece: usize) -> (String, Option<Usage>) {
        let mut r = SseRelay::new(strip);
        let mut out = Vec::new();
        for c in STREAM.as_bytes().chunks(piece) {
            out.extend_from_slice(&r.feed(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&r.finish());
        (String::from_utf8(out).unwrap(), r.usage())
    }

    #[test]
    fn usage_is_read_across_any_chunking() {
        for piece in [1, 3, 17, 64, 4096] {
            let (out, usage) = relay_in_pieces(false, piece);
            assert_eq!(out, STREAM, "untouched when not stripping");
            assert_eq!(usage.unwrap().tokens(), 8);
            let (out, usage) = relay_in_pieces(true, piece);
            assert!(
                !out.contains("prompt_tokens"),
                "usage chunk held back: {out}"
            );
            assert!(out.ends_with("data: [DONE]\n\n") && out.contains("\"hi\""));
            assert_eq!(usage.unwrap().completion_tokens, 3);
        }
        let mut r = SseRelay::new(false);
        r.feed(Bytes::from_static(STREAM.as_bytes()));
        assert_eq!(
            r.chunks(),
            2,
            "two content events; the usage chunk and [DONE] do not count"
        );
    }

    #[test]
    fn json_usage() {
        let u = usage_of_json(br#"{"id":"x","usage":{"prompt_tokens":2,"completion_tokens":4}}"#);
        assert_eq!(u.unwrap().tokens(), 6);
        assert!(usage_of_json(br#"{"id":"x"}"#).is_none());
        assert!(usage_of_json(b"not json").is_none());
        assert_eq!(
            json_answer(br#"{"usage":{"prompt_tokens":2}}"#)
                .unwrap()
                .unwrap()
                .tokens(),
            2
        );
        assert_eq!(json_answer(br#"[1, 2]"#), Some(None), "JSON, no usage");
        assert_eq!(
            json_answer(br#"{"usage": "odd"}"#),
            Some(None),
            "JSON, no usable usage"
        );
        assert_eq!(json_answer(br#"{"id": "x", "choices": ["#), None, "cut off");
        assert_eq!(
            json_answer(b"{\"id\":\"\xff\",\"usage\":{\"prompt_tokens\":2}}"),
            None,
            "invalid UTF-8, even in a string nothing reads, is not JSON"
        );
    }
}
