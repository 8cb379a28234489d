//! agent-gpu: runs on each GPU machine. Watches the workspace and streams verified block deltas
//! of every change straight to its paired agent-cpu; heartbeats its health to the coordinator.

use std::path::PathBuf;

use crate::agent::args::{AgentArgs, GpuArgs};
use crate::agent::config::AgentConfig;
use crate::agent::runtime;
use crate::agent::{socket, versions};
use crate::cli::{
    defaults, fail, init_logging, parse_duration, parse_or_exit, parse_time, usage_error,
};
use crate::trust::tls;
use clap::{Parser, Subcommand};

/// The GPU side of a Standby pair.
///
/// Either a static pair (`--tls-dir` and `--peer`) or managed by a coordinator (`--coordinator`,
/// with a `--join-token` the first time). Every setting can also come from a `STANDBY_*`
/// environment variable or a TOML file (`--config`); a flag wins over the environment, which
/// wins over the file.
#[derive(Parser, Debug)]
#[command(name = "agent-gpu", version, args_conflicts_with_subcommands = true)]
#[command(mut_arg("workspace", |a| a.help("The workspace to protect (e.g. /workspace)")))]
#[command(mut_arg("state_dir", |a| a.help(
    "Directory for the agent's own state (index, epoch, certificates, control socket)")))]
#[command(mut_arg("coordinator", |a| a.help(
    "The coordinator, as host:port (it tells this agent where its CPU standby is)")))]
#[command(mut_arg("listen", |a| a.help("Address for the probe and restore endpoint")))]
#[command(mut_arg("on_demote", |a| a.help(
    "Command run (with sh -c, waited for) before this machine hands the primary role over \
     (hibernation): stop the application here")))]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd2>,
    #[command(flatten)]
    log: crate::cli::LogArgs,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    gpu: GpuArgs,
    /// Sync one generation, wait until it is durable on the CPU, print a JSON report, exit.
    #[arg(long, display_order = 10)]
    once: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd2 {
    /// Return 0 once everything written before this call is durable on the CPU.
    Flush {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
        /// Give up after this long (exit 75).
        #[arg(long, default_value = defaults::FLUSH_TIMEOUT)]
        timeout: String,
    },
    /// Print the running agent's figures (RPO, pending bytes, last durable generation) as JSON.
    Status {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// List the snapshots the CPU standby keeps of this workspace.
    Versions {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
        /// Only snapshots holding this path (relative to the workspace), counted below it.
        #[arg(long)]
        path: Option<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bring files back from a snapshot on the CPU standby: fetched over the agent's mTLS link,
    /// verified, and written into the workspace (where they replicate like any write) or --to.
    Restore {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
        /// The newest snapshot at or before this time: RFC 3339 (2026-12-01T10:00:00Z) or how
        /// long ago (10m, 2h).
        #[arg(
            long,
            conflicts_with = "snapshot",
            required_unless_present = "snapshot"
        )]
        at: Option<String>,
        /// A snapshot id (or a unique prefix of one), as `versions` lists them.
        #[arg(long)]
        snapshot: Option<String>,
        /// Only this path (a file or directory, relative to the workspace).
        #[arg(long)]
        path: Option<String>,
        /// Write below this directory instead of the workspace.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Fault injection for drills: make the running agent report a fatal GPU fault.
    Fault {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
        #[arg(long, default_value = "Xid 79 (simulated): GPU has fallen off the bus")]
        reason: String,
    },
}

pub fn main() {
    crate::host::tune_allocator();
    let cli: Cli = parse_or_exit();
    cli.log.apply();
    tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.cmd {
        Some(cmd) => {
            init_logging("warn");
            control(&rt, cmd);
        }
        None => {
            let cfg = cli
                .gpu
                .resolve(cli.agent)
                .unwrap_or_else(|e| usage_error(e));
            init_logging(if cli.once { "warn" } else { "info" });
            if let Err(e) = rt.block_on(run(cfg, cli.once)) {
                fail(&e);
            }
        }
    }
}

/// The subcommands: one request to the running agent's control socket.
fn control(rt: &tokio::runtime::Runtime, cmd: Cmd2) {
    match cmd {
        Cmd2::Flush { state_dir, timeout } => {
            let t = parse_duration(&timeout).unwrap_or_else(|e| usage_error(e));
            let req = socket::Request::Flush {
                timeout_ms: t.as_millis() as u64,
            };
            let r = control_call(rt, &state_dir, req, "flush");
            println!("durable: generation {}", r.generation.unwrap_or(0));
        }
        Cmd2::Status { state_dir } => {
            let r = control_call(rt, &state_dir, socket::Request::Status, "status");
            println!("{}", r.status.unwrap_or_default());
        }
        Cmd2::Versions {
            state_dir,
            path,
            json,
        } => {
            let req = socket::Request::Versions {
                path: path.unwrap_or_default(),
            };
            let list = control_call(rt, &state_dir, req, "versions")
                .result
                .unwrap_or_default();
            let list = list.as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::Value::Array(list));
            } else {
                print!("{}", versions::table(&list));
            }
        }
        Cmd2::Restore {
            state_dir,
            at,
            snapshot,
            path,
            to,
        } => {
            let at_unix_ms = match at {
                Some(t) => {
                    parse_time(&t, std::time::SystemTime::now()).unwrap_or_else(|e| usage_error(e))
                }
                None => 0,
            };
            let to = to.map(|t| std::path::absolute(&t).unwrap_or(t));
            let req = socket::Request::Restore {
                id: snapshot.unwrap_or_default(),
                at_unix_ms,
                path: path.unwrap_or_default(),
                to,
            };
            let r = control_call(rt, &state_dir, req, "restore");
            println!("{}", r.result.unwrap_or_default());
        }
        Cmd2::Fault { state_dir, reason } => {
            control_call(rt, &state_dir, socket::Request::Fault { reason }, "fault");
            println!("fault injected: the next heartbeat reports it");
        }
    }
}

/// One request to the running agent; a failure exits with the code its kind calls for
/// (`crate::cli::Exit`).
fn control_call(
    rt: &tokio::runtime::Runtime,
    state_dir: &std::path::Path,
    req: socket::Request,
    what: &str,
) -> socket::Reply {
    match rt.block_on(socket::request(state_dir, &req)) {
        Ok(r) if r.ok => r,
        Ok(r) => fail(&r.into_error(what).into()),
        Err(e) => fail(&e.into()),
    }
}

/// Runs the agent, or with `--once` syncs one generation to the static peer and prints the
/// report as JSON.
async fn run(cfg: AgentConfig, once: bool) -> anyhow::Result<()> {
    let opened = runtime::open(&cfg).await?;
    if !once {
        return runtime::run(cfg, opened).await;
    }
    let Some(peer) = cfg.peer.clone() else {
        usage_error("--once needs --peer (a static pair)");
    };
    let report = runtime::sync_once(&cfg, opened, &peer).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
