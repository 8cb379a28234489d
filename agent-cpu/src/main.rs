//! agent-cpu: the CPU standby. Receives the GPU machine's workspace generation by generation,
//! verified and crash-consistent, and serves it back when a restore is needed.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use standby::cli::{FileConfig, defaults, fail, init_logging, parse_or_exit, usage_error};
use standby::identity::{Identity, Role};
use standby::receive::{Receiver, ReceiverOptions};
use standby::tls::{self, TlsMaterial};
use tokio_util::sync::CancellationToken;

/// The CPU standby of a Standby pair.
///
/// Every setting can also come from a `STANDBY_*` environment variable or a TOML file
/// (`--config`); a flag wins over the environment, which wins over the file.
#[derive(Parser, Debug)]
#[command(name = "agent-cpu", version)]
struct Cli {
    /// Directory that holds the replica of the GPU machine's workspace.
    #[arg(long, env = "STANDBY_WORKSPACE")]
    workspace: Option<PathBuf>,
    /// Directory for the agent's own state (catalog, epoch, certificates). Keep it on the same
    /// filesystem as the workspace so staged files can be renamed into place.
    #[arg(long, env = "STANDBY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Directory with ca.pem, node.pem and node.key (from `coordinator cert --role cpu`).
    #[arg(long, env = "STANDBY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Address to listen on for replication.
    #[arg(long, env = "STANDBY_LISTEN")]
    listen: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "STANDBY_CONFIG")]
    config: Option<PathBuf>,
}

struct Config {
    workspace: PathBuf,
    state_dir: PathBuf,
    tls_dir: PathBuf,
    listen: String,
}

fn config(cli: Cli) -> Result<Config, String> {
    let f = FileConfig::load(cli.config.as_deref())?;
    let need = |v: Option<PathBuf>, key: &str| -> Result<PathBuf, String> {
        f.pick_opt(v, key)?
            .ok_or_else(|| format!("--{} is required", key.replace('_', "-")))
    };
    Ok(Config {
        workspace: need(cli.workspace, "workspace")?,
        state_dir: need(cli.state_dir, "state_dir")?,
        tls_dir: need(cli.tls_dir, "tls_dir")?,
        listen: f.pick(cli.listen, "listen", || defaults::CPU_LISTEN.to_string())?,
    })
}

fn main() {
    let cli: Cli = parse_or_exit();
    let cfg = config(cli).unwrap_or_else(|e| usage_error(e));
    init_logging("info");
    tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cfg)) {
        fail(&e);
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let material = TlsMaterial::load(&cfg.tls_dir)
        .with_context(|| format!("loading certificates from {}", cfg.tls_dir.display()))?;
    let Identity::Node {
        pair,
        role: Role::Cpu,
    } = &material.identity
    else {
        bail!(
            "the certificate in {} is {}, agent-cpu needs a cpu certificate",
            cfg.tls_dir.display(),
            material.identity
        );
    };
    let _lock = standby::statedir::lock(&cfg.state_dir)?;
    let sender = Identity::node(pair, Role::Gpu)?;
    let opts = ReceiverOptions {
        workspace: cfg.workspace.clone(),
        state_dir: cfg.state_dir.clone(),
        sender,
    };
    let receiver = tokio::task::spawn_blocking(move || Receiver::open(opts))
        .await?
        .context("opening the replica")?;
    let f = receiver.figures();
    tracing::info!(
        workspace = %cfg.workspace.display(),
        generation = %f.generation,
        epoch = %f.epoch,
        entries = f.entries,
        "replica ready"
    );

    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    std::fs::write(cfg.state_dir.join("listen.addr"), addr.to_string())?;
    tracing::info!(%addr, pair = %pair, "serving replication");

    let shutdown = CancellationToken::new();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<standby::proto::replica_server::ReplicaServer<standby::receive::ReplicaService>>()
        .await;
    let incoming = tls::incoming(listener, material.server_config()?, shutdown.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        standby::cli::stop_signal().await;
        tracing::info!("stopping");
        stop.cancel();
    });
    tls::server_builder()
        .add_service(health)
        .add_service(receiver.service())
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    Ok(())
}
