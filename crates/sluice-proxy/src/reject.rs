//! The one table that maps every way Sluice refuses or fails a request to an HTTP status,
//! OpenAI's error `type`/`code`, and a bounded label for logs and metrics.

use sluice_openai::{ErrorBody, ErrorType, ParseError};

/// Why a request gets an error answer from Sluice itself.
#[derive(Debug)]
pub enum Rejection {
    /// No route for this path.
    NotFound,
    /// A known path with the wrong method.
    MethodNotAllowed,
    /// No credential presented.
    MissingKey,
    /// A credential that matches no key.
    BadKey,
    /// The body is larger than `server.max_body_bytes`.
    TooLarge(usize),
    /// The body is not a usable request.
    BadRequest(ParseError),
    /// The request declares a body type other than JSON.
    UnsupportedMediaType,
    /// The body did not arrive within `server.client_timeout`.
    RequestTimeout,
    /// `model` names no configured group.
    UnknownModel(String),
    /// The key may not call this group.
    ModelNotAllowed(String),
    /// Every candidate failed to connect or answered garbage.
    UpstreamUnreachable,
    /// Every candidate timed out.
    UpstreamTimeout,
    /// The last candidate's answer broke off or was not what it claimed (malformed JSON).
    UpstreamBroken,
    /// Sluice is shutting down.
    Draining,
    /// The limits have not reached their ledger yet (readiness only).
    NotReady,
    /// An admin endpoint called without the master key.
    AdminOnly,
    /// A reload was asked for and the new config does not load.
    ReloadRefused(String),
    /// No candidate had budget: the earliest limit to refill, and the headers to send.
    RateLimited(sluice_ratelimit::Rejected, crate::limits::RateHeaders),
}

impl Rejection {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound | Self::UnknownModel(_) => 404,
            Self::MethodNotAllowed => 405,
            Self::MissingKey | Self::BadKey => 401,
            Self::ModelNotAllowed(_) | Self::AdminOnly => 403,
            Self::ReloadRefused(_) => 400,
            Self::TooLarge(_) => 413,
            Self::UnsupportedMediaType => 415,
            Self::RequestTimeout => 408,
            Self::BadRequest(_) => 400,
            Self::UpstreamUnreachable | Self::UpstreamBroken => 502,
            Self::Draining | Self::NotReady => 503,
            Self::RateLimited(..) => 429,
            Self::UpstreamTimeout => 504,
        }
    }

    /// A bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::MissingKey => "missing_key",
            Self::BadKey => "invalid_key",
            Self::TooLarge(_) => "body_too_large",
            Self::BadRequest(_) => "bad_request",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RequestTimeout => "request_timeout",
            Self::UnknownModel(_) => "unknown_model",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamBroken => "upstream_bad_response",
            Self::Draining => "draining",
            Self::NotReady => "not_ready",
            Self::AdminOnly => "admin_only",
            Self::ReloadRefused(_) => "reload_refused",
            Self::RateLimited(..) => "rate_limited",
        }
    }

    /// The body in OpenAI's shape. Messages name the model or the field, never a key.
    pub fn body(&self) -> ErrorBody {
        use ErrorType as T;
        match self {
            Self::NotFound => ErrorBody::new(
                T::InvalidRequest,
                Some("unknown_url"),
                "Unknown request URL",
            ),
            Self::MethodNotAllowed => ErrorBody::new(
                T::InvalidRequest,
                Some("method_not_allowed"),
                "This endpoint does not accept that HTTP method",
            ),
            Self::MissingKey => ErrorBody::new(
                T::Authentication,
                Some("missing_api_key"),
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ),
            Self::BadKey => ErrorBody::new(
                T::Authentication,
                Some("invalid_api_key"),
                "Incorrect API key provided",
            ),
            Self::RequestTimeout => ErrorBody::new(
                T::InvalidRequest,
                Some("request_timeout"),
                "The request body did not arrive in time",
            ),
            Self::UnsupportedMediaType => ErrorBody::new(
                T::InvalidRequest,
                Some("unsupported_media_type"),
                "The request body must be JSON: send `Content-Type: application/json`",
            ),
            Self::TooLarge(max) => ErrorBody::new(
                T::InvalidRequest,
                Some("request_too_large"),
                format!("The request body exceeds the limit of {max} bytes"),
            ),
            Self::BadRequest(e) => {
                let b = ErrorBody::new(T::InvalidRequest, None, e.to_string());
                match e.param() {
                    Some(p) => b.with_param(p),
                    None => b,
                }
            }
            Self::UnknownModel(m) => ErrorBody::new(
                T::InvalidRequest,
                Some("model_not_found"),
                format!("The model `{m}` does not exist or you do not have access to it."),
            )
            .with_param("model"),
            Self::ModelNotAllowed(m) => ErrorBody::new(
                T::Permission,
                Some("model_not_allowed"),
                format!("This key is not allowed to call the model `{m}`."),
            )
            .with_param("model"),
            Self::UpstreamUnreachable => ErrorBody::new(
                T::Api,
                Some("upstream_unreachable"),
                "No upstream deployment could be reached",
            ),
            Self::UpstreamBroken => ErrorBody::new(
                T::Api,
                Some("upstream_bad_response"),
                "The upstream deployment's answer broke off or was malformed",
            ),
            Self::UpstreamTimeout => ErrorBody::new(
                T::Api,
                Some("upstream_timeout"),
                "The upstream deployment did not answer in time",
            ),
            Self::Draining => ErrorBody::new(
                T::Api,
                Some("shutting_down"),
                "The gateway is shutting down",
            ),
            Self::AdminOnly => ErrorBody::new(
                T::Permission,
                Some("admin_only"),
                "This endpoint needs the master key",
            ),
            Self::ReloadRefused(why) => ErrorBody::new(
                T::InvalidRequest,
                Some("reload_refused"),
                format!("The new configuration was refused; the running one stays. {why}"),
            ),
            Self::NotReady => ErrorBody::new(
                T::Api,
                Some("not_ready"),
                "The gateway has not reached its rate-limit store yet",
            ),
            Self::RateLimited(r, _) => ErrorBody::new(
                T::RateLimit,
                Some("rate_limit_exceeded"),
                format!(
                    "Rate limit reached for {}. Please try again in {:.1}s.",
                    r.limit,
                    r.retry_after.as_secs_f64()
                ),
            ),
        }
    }
}
