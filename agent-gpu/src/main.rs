//! agent-gpu: runs on each GPU machine. Watches the workspace and streams verified block deltas
//! of every change straight to its paired agent-cpu; heartbeats its health to the coordinator.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use standby::agent::config::AgentConfig;
use standby::agent::socket;
use standby::cli::{FileConfig, defaults, fail, init_logging, parse_or_exit, usage_error};
use standby::replication::continuous::{self, LoopConfig, Target};
use standby::replication::send::{Sender, SenderOptions};
use standby::trust::identity::Role;
use standby::trust::tls;

/// The GPU side of a Standby pair.
///
/// Either a static pair (`--tls-dir` and `--peer`) or managed by a coordinator (`--coordinator`,
/// with a `--join-token` the first time). Every setting can also come from a `STANDBY_*`
/// environment variable or a TOML file (`--config`); a flag wins over the environment, which
/// wins over the file.
#[derive(Parser, Debug)]
#[command(name = "agent-gpu", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd2>,
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
    /// Directory with static certificates (ca.pem, node.pem, node.key).
    #[arg(long, env = "STANDBY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The paired agent-cpu of a static pair, as host:port.
    #[arg(long, env = "STANDBY_PEER")]
    peer: Option<String>,
    /// The coordinator, as host:port (it tells this agent where its CPU standby is).
    #[arg(long, env = "STANDBY_COORDINATOR")]
    coordinator: Option<String>,
    /// Single-use token from `coordinator token` (first start only).
    #[arg(long, env = "STANDBY_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Address for the probe and restore endpoint.
    #[arg(long, env = "STANDBY_LISTEN")]
    listen: Option<String>,
    /// Address others should use to reach this agent, when it differs from --listen (NAT).
    #[arg(long, env = "STANDBY_ADVERTISE")]
    advertise: Option<String>,
    /// Machine name reported to the coordinator (default: the host name).
    #[arg(long, env = "STANDBY_MACHINE")]
    machine: Option<String>,
    /// Heartbeat interval.
    #[arg(long, env = "STANDBY_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
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
    /// Command run (with sh -c, waited for) before this machine hands the primary role over
    /// (hibernation): stop the application here.
    #[arg(long, env = "STANDBY_ON_DEMOTE")]
    on_demote: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "STANDBY_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd2 {
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
    /// Fault injection for drills: make the running agent report a fatal GPU fault.
    Fault {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
        #[arg(long, default_value = "Xid 79 (simulated): GPU has fallen off the bus")]
        reason: String,
    },
}

struct Config {
    workspace: PathBuf,
    state_dir: PathBuf,
    tls_dir: Option<PathBuf>,
    peer: Option<String>,
    coordinator: Option<String>,
    join_token: Option<String>,
    listen: String,
    advertise: String,
    machine: String,
    heartbeat: Duration,
    once: bool,
    loop_cfg: LoopConfig,
    compress_level: i32,
    on_demote: String,
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
    let peer = f.pick_opt(a.peer, "peer")?;
    let coordinator = f.pick_opt(a.coordinator, "coordinator")?;
    let tls_dir = f.pick_opt(a.tls_dir, "tls_dir")?;
    match (&peer, &coordinator) {
        (Some(_), Some(_)) => {
            return Err("give either --peer (static pair) or --coordinator, not both".into());
        }
        (None, None) => return Err("--peer (static pair) or --coordinator is required".into()),
        (Some(_), None) if tls_dir.is_none() => return Err("a static pair needs --tls-dir".into()),
        _ => {}
    }
    Ok(Config {
        workspace: need(a.workspace, "workspace")?,
        state_dir: need(a.state_dir, "state_dir")?,
        tls_dir,
        peer,
        coordinator,
        join_token: f.pick_opt(a.join_token, "join_token")?,
        listen: f.pick(a.listen, "listen", || defaults::GPU_LISTEN.to_string())?,
        advertise: f.pick(a.advertise, "advertise", String::new)?,
        machine: f.pick(a.machine, "machine", standby::host::name)?,
        heartbeat: f.pick_duration(
            a.heartbeat_interval,
            "heartbeat_interval",
            defaults::HEARTBEAT,
        )?,
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
        on_demote: f.pick(a.on_demote, "on_demote", String::new)?,
    })
}

fn control_call(
    rt: &tokio::runtime::Runtime,
    state_dir: &std::path::Path,
    req: socket::Request,
) -> socket::Reply {
    match rt.block_on(socket::request(state_dir, &req)) {
        Ok(r) if r.ok => r,
        Ok(r) => fail(&anyhow::anyhow!(
            r.error.unwrap_or_else(|| "unknown error".into())
        )),
        Err(e) => fail(&anyhow::anyhow!(e)),
    }
}

fn main() {
    let cli: Cli = parse_or_exit();
    tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.cmd {
        Some(Cmd2::Flush { state_dir, timeout }) => {
            init_logging("warn");
            let t = standby::cli::parse_duration(&timeout).unwrap_or_else(|e| usage_error(e));
            let req = socket::Request::Flush {
                timeout_ms: t.as_millis() as u64,
            };
            match rt.block_on(socket::request(&state_dir, &req)) {
                Ok(r) if r.ok => println!("durable: generation {}", r.generation.unwrap_or(0)),
                Ok(r) => fail(&anyhow::anyhow!(
                    "flush failed: {}",
                    r.error.unwrap_or_else(|| "unknown error".into())
                )),
                Err(e) => fail(&anyhow::anyhow!(e)),
            }
        }
        Some(Cmd2::Status { state_dir }) => {
            init_logging("warn");
            let r = control_call(&rt, &state_dir, socket::Request::Status);
            println!("{}", r.status.unwrap_or_default());
        }
        Some(Cmd2::Fault { state_dir, reason }) => {
            init_logging("warn");
            control_call(&rt, &state_dir, socket::Request::Fault { reason });
            println!("fault injected: the next heartbeat reports it");
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
    let once = cfg.once;
    let acfg = AgentConfig {
        role: Role::Gpu,
        workspace: cfg.workspace,
        state_dir: cfg.state_dir,
        tls_dir: cfg.tls_dir,
        peer: cfg.peer,
        coordinator: cfg.coordinator,
        join_token: cfg.join_token,
        listen: cfg.listen,
        advertise: cfg.advertise,
        machine: cfg.machine,
        heartbeat: cfg.heartbeat,
        loop_cfg: cfg.loop_cfg,
        compress_level: cfg.compress_level,
        on_promote: String::new(),
        on_demote: cfg.on_demote,
    };
    let opened = standby::agent::runtime::open(&acfg).await?;
    if !once {
        return standby::agent::runtime::run(acfg, opened).await;
    }
    let Some(peer) = &acfg.peer else {
        usage_error("--once needs --peer (a static pair)");
    };
    let target = Target {
        url: peer.clone(),
        identity: opened.peer.clone(),
        epoch: None,
    };
    let mut opts = SenderOptions::new(acfg.workspace.clone(), acfg.state_dir.clone());
    opts.compress_level = acfg.compress_level;
    opts.machine = acfg.machine.clone();
    let guard = opened.receiver.state().lock_owned().await;
    let figures = Arc::new(Mutex::new(Default::default()));
    let mut sender =
        tokio::task::spawn_blocking(move || Sender::new(opts, guard, figures)).await??;
    let report = continuous::once(&mut sender, &opened.material, &target).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
