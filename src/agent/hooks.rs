//! The operator's hooks (`on_promote`, `on_demote`): shell commands run with `sh -c` when this
//! machine's role changes. Their environment tells them the hook, the pair, the epoch and the
//! workspace (`STANDBY_HOOK`, `STANDBY_PAIR`, `STANDBY_EPOCH`, `STANDBY_WORKSPACE`).

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

/// How long a hook that nobody waits for may run before its outcome is logged as "still running".
const UNWATCHED_LIMIT: Duration = Duration::from_secs(600);

fn command(name: &str, command: &str, pair: &str, epoch: u64, workspace: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("STANDBY_HOOK", name)
        .env("STANDBY_PAIR", pair)
        .env("STANDBY_EPOCH", epoch.to_string())
        .env("STANDBY_WORKSPACE", workspace);
    cmd
}

/// Runs an operator hook and waits for it (at most `limit`): `on_demote` must have stopped the
/// application before the final sync. A hook still running at the limit is killed.
pub async fn run_hook_wait(
    name: &str,
    command_line: &str,
    pair: &str,
    epoch: u64,
    workspace: &Path,
    limit: Duration,
) -> Result<(), String> {
    let mut child = command(name, command_line, pair, epoch, workspace)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("{name} exited with {st}")),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(_) => Err(format!("{name} still running after {limit:?}")),
    }
}

/// Runs an operator hook without waiting for it (an empty command does nothing); its outcome
/// is logged.
pub fn run_hook(name: &str, command_line: &str, pair: &str, epoch: u64, workspace: &Path) {
    if command_line.trim().is_empty() {
        return;
    }
    let mut child = match command(name, command_line, pair, epoch, workspace).spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(hook = %name, error = %e, "cannot start hook");
            return;
        }
    };
    let name = name.to_string();
    tokio::spawn(async move {
        match tokio::time::timeout(UNWATCHED_LIMIT, child.wait()).await {
            Ok(Ok(st)) if st.success() => tracing::info!(hook = %name, "hook finished"),
            Ok(Ok(st)) => tracing::warn!(hook = %name, status = %st, "hook failed"),
            Ok(Err(e)) => tracing::warn!(hook = %name, error = %e, "hook failed"),
            Err(_) => tracing::warn!(hook = %name, "hook still running after 10 minutes"),
        }
    });
}
