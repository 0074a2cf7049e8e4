//! Credentials: kept out of `Debug` output, and virtual keys kept only as digests.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A credential (upstream API key, Redis password). `Debug` prints `Secret(***)`, so a config
/// dumped in a log or an error never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// SHA-256 of a client key. Sluice stores only these and compares them in constant time.
///
/// Looking a presented key up by its digest leaks, through timing, at most something about the
/// *digest* of what the client sent, which tells an attacker nothing about a valid key
/// (pre-image resistance); equality itself is constant-time all the same.
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Digest of a key as presented (`sk-...`).
    pub fn of(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// Parses a hex `key_sha256`.
    ///
    /// # Errors
    /// When `hex` is not 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex.trim(), &mut out)
            .map_err(|e| format!("expected 64 hex digits (a SHA-256): {e}"))?;
        Ok(Self(out))
    }
}

impl PartialEq for KeyDigest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for KeyDigest {}

impl std::hash::Hash for KeyDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Consistent with `eq`: equal digests have equal bytes.
        self.0.hash(state);
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A digest prefix is enough to tell keys apart in a debug dump.
        write!(f, "KeyDigest({}…)", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let d = KeyDigest::of(b"sk-live-123");
        assert!(!format!("{d:?}").contains("sk-live"));
    }

    #[test]
    fn hex_digest_matches_literal() {
        let hex = "8d969eef6ecad3c29a3a629280e686cf0c3f5d5a86aff3ca12020c923adc6c92"; // sha256("123456")
        assert_eq!(KeyDigest::from_hex(hex).unwrap(), KeyDigest::of(b"123456"));
        assert_ne!(KeyDigest::of(b"123457"), KeyDigest::of(b"123456"));
        assert!(KeyDigest::from_hex("abc").is_err());
    }
}
