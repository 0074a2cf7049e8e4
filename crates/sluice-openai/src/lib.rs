//! The OpenAI wire format as Sluice needs it: parse a request once, shape it for an upstream,
//! and speak OpenAI's error body.
//!
//! A request body is read as a list of top-level fields whose values stay raw bytes (where
//! each lies in the body; one pass of `walk.rs` validates the whole body and finds them, its
//! strings 64 bytes a step with SIMD): Sluice looks at `model`, `stream` and the token fields,
//! and never rebuilds a DOM of the prompt. Shaping for a deployment rewrites `model` and keeps
//! the other fields as slices of the client's body, written upstream with one vectored write:
//! a 1 MiB prompt costs two scans (UTF-8, then the grammar) and no copy in Sluice.
//!
//! Not here: HTTP, routing, limits. This crate knows JSON, not sockets.

mod error;
pub mod filter;
mod request;
mod usage;
mod walk;

#[cfg(test)]
mod props;

pub use error::{ErrorBody, ErrorType};
pub use filter::{Allowlist, DropReason, FieldPolicy, Policy, Verdict};
pub use request::{Body, BodyBuf, Dropped, Endpoint, ParseError, Request, Shaped};
pub use usage::{json_answer, usage_of_json, SseRelay, Usage};
