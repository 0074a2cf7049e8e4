//! End-to-end tests: Sluice started in-process on a free port, in front of mock upstreams,
//! driven by a real HTTP client. One test binary, many modules (link time matters).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod common;
mod config_files;
mod downstream;
mod errors;
mod fallbacks;
mod faults;
mod filter;
mod limits;
mod metrics;
mod mock;
mod ops;
mod prometheus;
mod proxy;
mod slow_redis;
mod streaming;
mod transport;
mod wire;
