//! agent-cpu: the CPU standby. Receives the GPU machine's workspace generation by generation,
//! verified and crash-consistent; probes its GPU peer; becomes the primary when promoted.

use clap::Parser;
use standby::agent::args::{AgentArgs, CpuArgs};
use standby::agent::runtime;
use standby::cli::{fail, init_logging, parse_or_exit, usage_error};
use standby::trust::tls;

/// The CPU standby of a Standby pair.
///
/// Either a static pair (`--tls-dir`) or managed by a coordinator (`--coordinator`, with a
/// `--join-token` the first time). Every setting can also come from a `STANDBY_*` environment
/// variable or a TOML file (`--config`); a flag wins over the environment, which wins over the
/// file.
#[derive(Parser, Debug)]
#[command(name = "agent-cpu", version)]
#[command(mut_arg("workspace", |a| a.help(
    "Directory that holds the replica of the GPU machine's workspace")))]
#[command(mut_arg("state_dir", |a| a.help(
    "Directory for the agent's own state (catalog, epoch, certificates). Keep it on the same \
     filesystem as the workspace so staged files can be renamed into place")))]
#[command(mut_arg("listen", |a| a.help("Address to listen on for replication")))]
#[command(mut_arg("advertise", |a| a.help(
    "Address the GPU agent should use, when it differs from --listen (NAT, public IP)")))]
#[command(mut_arg("heartbeat_interval", |a| a.help("Heartbeat (and GPU probe) interval")))]
#[command(mut_arg("on_demote", |a| a.help(
    "Command run (with sh -c, waited for) before this machine hands the primary role back to \
     a restored GPU machine: stop the application here")))]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    cpu: CpuArgs,
}

fn main() {
    let cli: Cli = parse_or_exit();
    let cfg = cli
        .cpu
        .resolve(cli.agent)
        .unwrap_or_else(|e| usage_error(e));
    init_logging("info");
    tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let run = async {
        let opened = runtime::open(&cfg).await?;
        runtime::run(cfg, opened).await
    };
    if let Err(e) = rt.block_on(run) {
        fail(&e);
    }
}
