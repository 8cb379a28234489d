//! agent-gpu: runs on each GPU machine. Watches the workspace and streams verified block deltas
//! of every change straight to its paired agent-cpu.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use standby::cli::{FileConfig, defaults, fail, init_logging, parse_or_exit, usage_error};
use standby::control;
use standby::identity::{Identity, Role};
use standby::replicate::{self, LoopConfig, Target};
use standby::send::{Sender, SenderOptions};
use standby::tls::{self, TlsMaterial};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The GPU side of a Standby pair.
///
/// Every setting can also come from a `STANDBY_*` environment variable or a TOML file
/// (`--config`); a flag wins over the environment, which wins over the file.
#[derive(Parser, Debug)]
#[command(name = "agent-gpu", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The workspace to protect (e.g. /workspace).
    #[arg(long, env = "STANDBY_WORKSPACE")]
    workspace: Option<PathBuf>,
    /// Directory for the agent's own state (index, epoch, certificates, control socket).
    #[arg(long, env = "STANDBY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Directory with ca.pem, node.pem and node.key (from `coordinator cert --role gpu`).
    #[arg(long, env = "STANDBY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The paired agent-cpu, as host:port or https://host:port.
    #[arg(long, env = "STANDBY_PEER")]
    peer: Option<String>,
    /// Sync one generation, wait until it is durable on the CPU, print a JSON report, exit.
    #[arg(long)]
    once: bool,
    /// Quiet time after the last change before a generation is sent.
    #[arg(long, env = "STANDBY_DEBOUNCE")]
    debounce: Option<String>,
    /// Longest a change may wait while writes keep coming.
    #[arg(long, env = "STANDBY_MAX_DELAY")]
    max_delay: Option<String>,
    /// Period of the quick-check rescan that catches anything inotify missed.
    #[arg(long, env = "STANDBY_RESCAN_INTERVAL")]
    rescan_interval: Option<String>,
    /// zstd level for data on the wire (0 turns compression off).
    #[arg(long, env = "STANDBY_COMPRESS_LEVEL")]
    compress_level: Option<i32>,
    /// TOML configuration file.
    #[arg(long, env = "STANDBY_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Return 0 once everything written before this call is durable on the CPU.
    Flush {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
        /// Give up after this long (exit 1).
        #[arg(long, default_value = defaults::FLUSH_TIMEOUT)]
        timeout: String,
    },
    /// Print the running agent's figures (RPO, pending bytes, last durable generation) as JSON.
    Status {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
    },
}

struct Config {
    workspace: PathBuf,
    state_dir: PathBuf,
    tls_dir: PathBuf,
    peer: String,
    once: bool,
    loop_cfg: LoopConfig,
    compress_level: i32,
}

fn config(a: RunArgs) -> Result<Config, String> {
    let f = FileConfig::load(a.config.as_deref())?;
    let need = |v: Option<PathBuf>, key: &str| -> Result<PathBuf, String> {
        f.pick_opt(v, key)?
            .ok_or_else(|| format!("--{} is required", key.replace('_', "-")))
    };
    let compress_level = f.pick(a.compress_level, "compress_level", || {
        defaults::COMPRESS_LEVEL
    })?;
    if !(0..=19).contains(&compress_level) {
        return Err(format!(
            "--compress-level must be 0..=19, not {compress_level}"
        ));
    }
    Ok(Config {
        workspace: need(a.workspace, "workspace")?,
        state_dir: need(a.state_dir, "state_dir")?,
        tls_dir: need(a.tls_dir, "tls_dir")?,
        peer: f
            .pick_opt(a.peer, "peer")?
            .ok_or("--peer is required (the agent-cpu address)")?,
        once: a.once,
        loop_cfg: LoopConfig {
            debounce: f.pick_duration(a.debounce, "debounce", defaults::DEBOUNCE)?,
            max_delay: f.pick_duration(a.max_delay, "max_delay", defaults::MAX_DELAY)?,
            rescan_interval: f.pick_duration(
                a.rescan_interval,
                "rescan_interval",
                defaults::RESCAN_INTERVAL,
            )?,
        },
        compress_level,
    })
}

fn main() {
    let cli: Cli = parse_or_exit();
    tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.cmd {
        Some(Cmd::Flush { state_dir, timeout }) => {
            init_logging("warn");
            let t = standby::cli::parse_duration(&timeout).unwrap_or_else(|e| usage_error(e));
            let req = control::Request::Flush {
                timeout_ms: t.as_millis() as u64,
            };
            match rt.block_on(control::request(&state_dir, &req)) {
                Ok(r) if r.ok => {
                    println!("durable: generation {}", r.generation.unwrap_or(0));
                }
                Ok(r) => fail(&anyhow::anyhow!(
                    "flush failed: {}",
                    r.error.unwrap_or_else(|| "unknown error".into())
                )),
                Err(e) => fail(&anyhow::anyhow!(e)),
            }
        }
        Some(Cmd::Status { state_dir }) => {
            init_logging("warn");
            match rt.block_on(control::request(&state_dir, &control::Request::Status)) {
                Ok(r) if r.ok => println!("{}", r.status.unwrap_or_default()),
                Ok(r) => fail(&anyhow::anyhow!(r.error.unwrap_or_default())),
                Err(e) => fail(&anyhow::anyhow!(e)),
            }
        }
        None => {
            let cfg = config(cli.run).unwrap_or_else(|e| usage_error(e));
            init_logging(if cfg.once { "warn" } else { "info" });
            if let Err(e) = rt.block_on(run(cfg)) {
                fail(&e);
            }
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let material = TlsMaterial::load(&cfg.tls_dir)
        .with_context(|| format!("loading certificates from {}", cfg.tls_dir.display()))?;
    let Identity::Node {
        pair,
        role: Role::Gpu,
    } = &material.identity
    else {
        bail!(
            "the certificate in {} is {}, agent-gpu needs a gpu certificate",
            cfg.tls_dir.display(),
            material.identity
        );
    };
    let peer_id = Identity::node(pair, Role::Cpu)?;
    let _lock = standby::statedir::lock(&cfg.state_dir)?;
    let mut opts = SenderOptions::new(cfg.workspace.clone(), cfg.state_dir.clone());
    opts.compress_level = cfg.compress_level;
    let t = std::time::Instant::now();
    let mut sender = tokio::task::spawn_blocking(move || Sender::open(opts)).await??;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "sender state loaded");
    let target = Target {
        url: cfg.peer.clone(),
        identity: peer_id,
        epoch: None,
    };
    if cfg.once {
        let report = replicate::once(&mut sender, &material, &target).await?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    let (ctl_tx, ctl_rx) = mpsc::channel(64);
    let ctl = tokio::spawn({
        let state_dir = cfg.state_dir.clone();
        let figures = sender.figures.clone();
        let shutdown = shutdown.clone();
        async move { control::serve(&state_dir, ctl_tx, figures, shutdown).await }
    });
    let (_target_tx, target_rx) = watch::channel(Some(target));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        standby::cli::stop_signal().await;
        tracing::info!("stopping");
        stop.cancel();
    });
    tracing::info!(workspace = %cfg.workspace.display(), peer = %cfg.peer, "replicating");
    replicate::run(
        sender,
        material,
        target_rx,
        cfg.loop_cfg,
        ctl_rx,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(2), ctl).await {
        tracing::warn!(error = %e, "control socket");
    }
    Ok(())
}
