//! Test fakes for Sluice, and nothing else.
//!
//! - [`MockUpstream`]: an OpenAI-compatible server speaking the real wire format (JSON, SSE
//!   with a final `usage` chunk on `stream_options.include_usage`, OpenAI-shaped errors,
//!   `Retry-After`), configurable per instance (latency, forced status, its own RPM limit,
//!   strict field checking, a pause mid-stream) and recording every request it receives so
//!   tests can assert who was called, how often, with what.
//! - [`RedisServer`]: a real `redis-server` on a free loopback port, stopped on drop.
//! - [`self_signed_cert`] and [`curl`]: a certificate from `openssl` and a TLS/HTTP/2 client;
//!   [`ScratchDir`]: a test's own temp directory, removed on drop.
//!
//! The upstream providers are the one thing Sluice's tests fake; Redis is always real.

mod mock;
mod redis;
mod tools;

pub use mock::{Fault, MockConfig, MockUpstream, Recorded};
pub use redis::{free_port, RedisServer};
pub use tools::{curl, self_signed_cert, ScratchDir};
