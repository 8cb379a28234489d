//! agent-cpu: the CPU standby. Receives the GPU machine's workspace generation by generation,
//! verified and crash-consistent; probes its GPU peer; becomes the primary when promoted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use standby::cli::{FileConfig, defaults, fail, init_logging, parse_or_exit, usage_error};
use standby::identity::{Identity, Role};
use standby::proto::command::Cmd;
use standby::receive::{Receiver, ReceiverOptions};
use standby::tls;
use standby::types::Epoch;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The CPU standby of a Standby pair.
///
/// Either a static pair (`--tls-dir`) or managed by a coordinator (`--coordinator`, with a
/// `--join-token` the first time). Every setting can also come from a `STANDBY_*` environment
/// variable or a TOML file (`--config`); a flag wins over the environment, which wins over the
/// file.
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
    /// Directory with static certificates (ca.pem, node.pem, node.key).
    #[arg(long, env = "STANDBY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The coordinator, as host:port.
    #[arg(long, env = "STANDBY_COORDINATOR")]
    coordinator: Option<String>,
    /// Single-use token from `coordinator token` (first start only).
    #[arg(long, env = "STANDBY_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Address to listen on for replication.
    #[arg(long, env = "STANDBY_LISTEN")]
    listen: Option<String>,
    /// Address the GPU agent should use, when it differs from --listen (NAT, public IP).
    #[arg(long, env = "STANDBY_ADVERTISE")]
    advertise: Option<String>,
    /// Machine name reported to the coordinator (default: the host name).
    #[arg(long, env = "STANDBY_MACHINE")]
    machine: Option<String>,
    /// Heartbeat (and GPU probe) interval.
    #[arg(long, env = "STANDBY_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Command run (with sh -c) when this machine is promoted to primary.
    #[arg(long, env = "STANDBY_ON_PROMOTE")]
    on_promote: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "STANDBY_CONFIG")]
    config: Option<PathBuf>,
}

struct Config {
    workspace: PathBuf,
    state_dir: PathBuf,
    tls_dir: Option<PathBuf>,
    coordinator: Option<String>,
    join_token: Option<String>,
    listen: String,
    advertise: String,
    machine: String,
    heartbeat: Duration,
    on_promote: String,
}

fn config(cli: Cli) -> Result<Config, String> {
    let f = FileConfig::load(cli.config.as_deref())?;
    let need = |v: Option<PathBuf>, key: &str| -> Result<PathBuf, String> {
        f.pick_opt(v, key)?
            .ok_or_else(|| format!("--{} is required", key.replace('_', "-")))
    };
    let tls_dir = f.pick_opt(cli.tls_dir, "tls_dir")?;
    let coordinator = f.pick_opt(cli.coordinator, "coordinator")?;
    if tls_dir.is_none() && coordinator.is_none() {
        return Err("--tls-dir (static pair) or --coordinator is required".into());
    }
    Ok(Config {
        workspace: need(cli.workspace, "workspace")?,
        state_dir: need(cli.state_dir, "state_dir")?,
        tls_dir,
        coordinator,
        join_token: f.pick_opt(cli.join_token, "join_token")?,
        listen: f.pick(cli.listen, "listen", || defaults::CPU_LISTEN.to_string())?,
        advertise: f.pick(cli.advertise, "advertise", String::new)?,
        machine: f.pick(cli.machine, "machine", standby::send::hostname)?,
        heartbeat: f.pick_duration(
            cli.heartbeat_interval,
            "heartbeat_interval",
            defaults::HEARTBEAT,
        )?,
        on_promote: f.pick(cli.on_promote, "on_promote", String::new)?,
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
    let material = standby::join::identity(
        Role::Cpu,
        &cfg.state_dir,
        cfg.tls_dir.as_deref(),
        cfg.coordinator.as_deref(),
        cfg.join_token.as_deref(),
        &cfg.machine,
    )
    .await?;
    let pair = material.identity.pair().expect("node identity").to_string();
    let _lock = standby::statedir::lock(&cfg.state_dir)?;
    let gpu_id = Identity::node(&pair, Role::Gpu)?;
    let opts = ReceiverOptions {
        workspace: cfg.workspace.clone(),
        state_dir: cfg.state_dir.clone(),
        sender: gpu_id.clone(),
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

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        standby::cli::stop_signal().await;
        tracing::info!("stopping");
        stop.cancel();
    });
    let router = tls::server_builder().add_service(receiver.service());
    let (addr, server) =
        standby::agent::serve_endpoint(&cfg.listen, &material, Some(router), shutdown.clone())
            .await?;
    std::fs::write(cfg.state_dir.join("listen.addr"), addr.to_string())?;
    tracing::info!(%addr, pair = %pair, "serving replication");

    if let Some(url) = &cfg.coordinator {
        let probe = Arc::new(Mutex::new(standby::probe::ProbeState::default()));
        let (probe_tx, probe_rx) = watch::channel(None::<String>);
        tokio::spawn(standby::probe::run(
            probe_rx,
            material.clone(),
            gpu_id,
            cfg.heartbeat,
            probe.clone(),
            shutdown.clone(),
        ));
        let primary = Arc::new(AtomicBool::new(false));
        let (cmd_tx, mut cmd_rx) = mpsc::channel(16);
        let report: standby::link::ReportFn = {
            let (receiver, probe, primary) = (receiver.clone(), probe.clone(), primary.clone());
            let (machine, workspace, advertise) = (
                cfg.machine.clone(),
                cfg.workspace.clone(),
                cfg.advertise.clone(),
            );
            Arc::new(move || {
                let f = receiver.figures();
                let p = probe.lock().expect("probe").clone();
                standby::agent::cpu_report(
                    &machine,
                    &workspace,
                    &advertise,
                    addr.port(),
                    &f,
                    &p,
                    primary.load(Ordering::Relaxed),
                )
            })
        };
        tokio::spawn(standby::link::run(
            standby::link::LinkOptions {
                url: url.clone(),
                tls: material.clone(),
                interval: cfg.heartbeat,
            },
            report,
            cmd_tx,
            shutdown.clone(),
        ));
        let (on_promote, workspace) = (cfg.on_promote.clone(), cfg.workspace.clone());
        tokio::spawn(async move {
            let mut promoted_at: Option<Epoch> = None;
            while let Some(c) = cmd_rx.recv().await {
                match c.cmd {
                    Some(Cmd::Probe(p)) if probe_tx.borrow().as_deref() != Some(p.url.as_str()) => {
                        tracing::info!(gpu = %p.url, "probing the GPU agent");
                        let _ = probe_tx.send(Some(p.url));
                    }
                    Some(Cmd::Promote(p)) => {
                        let epoch = Epoch(p.epoch);
                        // Durable before anything else: from now on, data of older epochs is
                        // refused.
                        match receiver.raise_epoch(epoch).await {
                            Ok(_) => {}
                            Err(e) => {
                                tracing::error!(error = %e, "cannot persist the new epoch; not promoting");
                                continue;
                            }
                        }
                        primary.store(true, Ordering::Relaxed);
                        let _ = probe_tx.send(None);
                        if promoted_at != Some(epoch) {
                            promoted_at = Some(epoch);
                            tracing::warn!(%epoch, "promoted: this machine is the primary now");
                            standby::agent::run_hook(
                                "on_promote",
                                &on_promote,
                                &pair,
                                epoch.0,
                                &workspace,
                            );
                        }
                    }
                    _ => {}
                }
            }
        });
    }

    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}
