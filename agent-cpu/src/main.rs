//! agent-cpu: the CPU standby. Receives the GPU machine's workspace generation by generation,
//! verified and crash-consistent; probes its GPU peer; becomes the primary when promoted.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use standby::agent::config::AgentConfig;
use standby::cli::{
    FileConfig, defaults, fail, init_logging, parse_duration, parse_or_exit, usage_error,
};
use standby::replication::continuous::LoopConfig;
use standby::trust::identity::Role;
use standby::trust::tls;

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
    /// Command run (with sh -c, waited for) before this machine hands the primary role back to
    /// a restored GPU machine: stop the application here.
    #[arg(long, env = "STANDBY_ON_DEMOTE")]
    on_demote: Option<String>,
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
    on_demote: String,
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
        machine: f.pick(cli.machine, "machine", standby::host::name)?,
        heartbeat: f.pick_duration(
            cli.heartbeat_interval,
            "heartbeat_interval",
            defaults::HEARTBEAT,
        )?,
        on_promote: f.pick(cli.on_promote, "on_promote", String::new)?,
        on_demote: f.pick(cli.on_demote, "on_demote", String::new)?,
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
    let acfg = AgentConfig {
        role: Role::Cpu,
        workspace: cfg.workspace,
        state_dir: cfg.state_dir,
        tls_dir: cfg.tls_dir,
        peer: None,
        coordinator: cfg.coordinator,
        join_token: cfg.join_token,
        listen: cfg.listen,
        advertise: cfg.advertise,
        machine: cfg.machine,
        heartbeat: cfg.heartbeat,
        loop_cfg: LoopConfig {
            debounce: parse_duration(defaults::DEBOUNCE).expect("default"),
            max_delay: parse_duration(defaults::MAX_DELAY).expect("default"),
            rescan_interval: parse_duration(defaults::RESCAN_INTERVAL).expect("default"),
        },
        compress_level: defaults::COMPRESS_LEVEL,
        on_promote: cfg.on_promote,
        on_demote: cfg.on_demote,
    };
    let opened = standby::agent::runtime::open(&acfg).await?;
    standby::agent::runtime::run(acfg, opened).await
}
