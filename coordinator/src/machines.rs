//! `coordinator machines stop-all --dir D`: stops the machines the `local` provider started.
//!
//! A local machine is an agent process in its own process group, and it outlives the
//! coordinator on purpose, as a cloud machine does: a coordinator restart must not take a pair's
//! workload or its replication down. So `serve` never stops them on its way out; this verb is
//! the operator's way to, once the coordinator is stopped (a running one would see the machines
//! gone and fail over or provision replacements). See ARCHITECTURE.md, "Stopping local machines".

use std::path::PathBuf;
use std::time::Duration;

use crate::control::provider::local::Local;

#[derive(clap::Subcommand, Debug)]
pub enum MachinesCmd {
    /// Stop every machine the local provider started under DIR/machines (stop `coordinator
    /// serve` first): SIGTERM to each agent's process group, SIGKILL after --grace. Their
    /// directories (workspace, replica, agent state) stay, so a later `serve` finds the
    /// machines stopped, unless --remove.
    StopAll {
        #[arg(long, env = "STANDBY_DIR")]
        dir: PathBuf,
        /// Also delete each machine's directory, its workspace and replica included (what
        /// destroying a machine does).
        #[arg(long)]
        remove: bool,
        /// How long an agent has to stop after SIGTERM before it is killed.
        #[arg(long, default_value = "10s")]
        grace: String,
    },
}

pub fn run(cmd: MachinesCmd) -> anyhow::Result<()> {
    let MachinesCmd::StopAll { dir, remove, grace } = cmd;
    let grace: Duration =
        crate::cli::parse_duration(&grace).unwrap_or_else(|e| crate::cli::usage_error(e));
    let outcomes = Local::stop_machines(&dir.join("machines"), remove, grace)?;
    let (mut running, mut failed) = (0, 0);
    for outcome in &outcomes {
        match outcome {
            Ok(s) => {
                let what = match s.stopped_pid {
                    Some(pid) => format!("stopped its agent (pid {pid})"),
                    None => "its agent was not running".to_string(),
                };
                let gone = if s.removed { "; directory deleted" } else { "" };
                println!("{}: {what}{gone}", s.label);
                running += usize::from(s.stopped_pid.is_some());
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    println!("{} local machines, {running} stopped", outcomes.len());
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} local machines could not be stopped",
            outcomes.len()
        );
    }
    Ok(())
}
