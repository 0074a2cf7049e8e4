//! `sluice`: parse the command line, load the config (exit 64 when it is bad), serve.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod alloc;

#[global_allocator]
static ALLOCATOR: alloc::Mimalloc = alloc::Mimalloc;

/// Exit status for a configuration that does not load (sysexits' EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

/// Sluice: a front door for OpenAI-compatible LLM APIs.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The YAML configuration file.
    #[arg(long, short, global = true, default_value = "config.yaml")]
    config: String,
    /// Address to listen on (overrides `server.host`).
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (overrides `server.port`; default 4000).
    #[arg(long)]
    port: Option<u16>,
    /// Take the listening sockets over from the running Sluice (zero-downtime upgrade: start
    /// the new binary with this flag, then send the old one SIGQUIT).
    #[arg(long)]
    upgrade: bool,
    /// The socket the listening sockets are handed over on.
    #[arg(long, default_value = "/tmp/sluice_upgrade.sock")]
    upgrade_sock: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and exit: 0 when it loads, 64 naming every bad key.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    sluice_proxy::logging::init("info,pingora_core=warn");
    let code = run(&cli);
    sluice_proxy::logging::flush();
    code
}

fn run(cli: &Cli) -> ExitCode {
    let text = match std::fs::read_to_string(&cli.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sluice: cannot read {}: {e}", cli.config);
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let loaded = match sluice_config::load(&text) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice: {}: {e}", cli.config);
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    for w in &loaded.warnings {
        log::warn!("{}: {w}", cli.config);
    }
    let config = loaded.config;
    if matches!(cli.command, Some(Command::Check)) {
        let deployments: usize = config.groups.iter().map(|g| g.deployments.len()).sum();
        println!(
            "{}: ok ({} model group(s), {deployments} deployment(s), {} key(s), {} warning(s))",
            cli.config,
            config.groups.len(),
            config.keys.len(),
            loaded.warnings.len()
        );
        return ExitCode::SUCCESS;
    }
    let listen = sluice_proxy::Listen::from_config(&config, cli.host.as_deref(), cli.port);
    log::info!(
        "sluice listening on {} ({} threads)",
        listen.addr,
        listen.threads
    );
    let lifecycle = sluice_proxy::Lifecycle {
        config_path: Some(cli.config.clone().into()),
        exit_when_drained: true,
        runtime_per_worker: true,
        upgrade: cli.upgrade,
        upgrade_sock: Some(cli.upgrade_sock.clone()),
    };
    let (server, _gateway) = match sluice_proxy::build_server_with(config, &listen, lifecycle) {
        Ok(built) => built,
        Err(e) => {
            eprintln!("sluice: {}: {e}", cli.config);
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    server.run(pingora_core::server::RunArgs {
        shutdown_signal: Box::new(sluice_proxy::Signals),
    });
    ExitCode::SUCCESS
}
