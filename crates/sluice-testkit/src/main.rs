//! `sluice-mock`: the mock OpenAI-compatible upstream as a program, for demos and load runs.

use std::time::Duration;

use clap::Parser;
use sluice_testkit::{MockConfig, MockUpstream};

/// A mock OpenAI-compatible upstream on loopback.
#[derive(Debug, Parser)]
#[command(name = "sluice-mock", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8001)]
    port: u16,
    /// Name echoed in answers.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Delay before answering, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Answer every request with this status.
    #[arg(long)]
    status: Option<u16>,
    /// Retry-After seconds on 429s.
    #[arg(long)]
    retry_after: Option<u64>,
    /// Own requests-per-minute limit.
    #[arg(long)]
    rpm: Option<usize>,
    /// Reject fields outside OpenAI's schema with 400.
    #[arg(long)]
    strict: bool,
    /// Require this API key.
    #[arg(long)]
    api_key: Option<String>,
    /// Content events per stream.
    #[arg(long, default_value_t = 3)]
    stream_chunks: usize,
    /// Pause between stream events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    stream_interval_ms: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let config = MockConfig {
        name: args.name,
        latency: Duration::from_millis(args.latency_ms),
        status: args.status,
        retry_after: args.retry_after,
        rpm_limit: args.rpm,
        strict: args.strict,
        api_key: args.api_key,
        stream_chunks: args.stream_chunks,
        stream_interval: Duration::from_millis(args.stream_interval_ms),
        ..MockConfig::default()
    };
    let mock = MockUpstream::bind(&format!("{}:{}", args.host, args.port), config).await?;
    println!("sluice-mock listening on {}", mock.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
