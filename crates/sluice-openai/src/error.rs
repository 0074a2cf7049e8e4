//! OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.

use serde::Serialize;

/// OpenAI's `error.type` values that Sluice emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// The request is wrong (400, 404, 413).
    InvalidRequest,
    /// Missing or bad credentials (401).
    Authentication,
    /// The key may not do this (403).
    Permission,
    /// Over a limit (429).
    RateLimit,
    /// Sluice or an upstream failed (5xx).
    Api,
}

impl ErrorType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Permission => "permission_error",
            Self::RateLimit => "rate_limit_error",
            Self::Api => "api_error",
        }
    }
}

/// An error in OpenAI's shape, ready to serialize.
#[derive(Debug, Clone)]
pub struct ErrorBody {
    /// Human-readable message. Never carries a key or a body.
    pub message: String,
    /// `error.type`.
    pub kind: ErrorType,
    /// The request parameter at fault, if any.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `invalid_api_key`, …).
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Wire<'a> {
    error: WireInner<'a>,
}

#[derive(Serialize)]
struct WireInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ErrorBody {
    /// An error with no `param`.
    pub fn new(kind: ErrorType, code: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind,
            param: None,
            code,
        }
    }

    /// Names the request parameter at fault.
    #[must_use]
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = Wire {
            error: WireInner {
                message: &self.message,
                kind: self.kind.as_str(),
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serializing strings and options into a Vec cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_openai() {
        let b = ErrorBody::new(
            ErrorType::InvalidRequest,
            Some("model_not_found"),
            "no \"x\"",
        )
        .with_param("model");
        let v: serde_json::Value = serde_json::from_slice(&b.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "no \"x\"", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}})
        );
        let v: serde_json::Value =
            serde_json::from_slice(&ErrorBody::new(ErrorType::Api, None, "m").to_json()).unwrap();
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
    }
}
