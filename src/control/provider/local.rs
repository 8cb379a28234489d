//! The `local` provider: a machine is an agent process on this host with its own directory
//! under the coordinator's (`<dir>/machines/<label>/`: workspace, state, log, pid). It is the
//! demo's and the tests' provider, and a real one for a single big host.
//!
//! A machine outlives the coordinator (its own process group, like a cloud machine), is found
//! again by its label after a coordinator restart, and destroying it kills its process group
//! and deletes its directory, disk included.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Machine, MachineState, Offer, Provider, ProviderError, Startup};
use crate::types::Side;

pub struct Local {
    root: PathBuf,
    bin_dir: PathBuf,
    heartbeat: Duration,
    /// Extra arguments for the agents (e.g. a shorter debounce in the demo).
    pub extra_args: Vec<String>,
}

/// One machine [`Local::stop_machines`] dealt with.
#[derive(Debug, PartialEq, Eq)]
pub struct Stopped {
    /// The machine's label (its directory's name).
    pub label: String,
    /// The agent's pid when it was running and was stopped; None when it was not running.
    pub stopped_pid: Option<u32>,
    /// Whether its directory was deleted.
    pub removed: bool,
}

/// Why [`Local::stop_machines`] could not stop a machine.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("cannot list the local machines in {}: {source}", dir.display())]
    List {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "machine {label}: its agent (pid {pid}) still runs after SIGKILL; see `ps -o pid,stat,cmd -g {pid}`"
    )]
    Alive { label: String, pid: u32 },
    #[error("cannot delete the machine directory {}: {source} (its agent is stopped; delete it by hand)", dir.display())]
    Remove {
        dir: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &str, e: std::io::Error) -> ProviderError {
    ProviderError::Transient(format!("{what}: {e}"))
}

impl Local {
    /// Machines live under `root`; agent binaries are taken from `bin_dir`.
    pub fn new(root: PathBuf, bin_dir: PathBuf, heartbeat: Duration) -> Local {
        Local {
            root,
            bin_dir,
            heartbeat,
            extra_args: Vec::new(),
        }
    }

    /// Where the agent binaries usually are: beside the running program.
    pub fn default_bin_dir() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    }

    fn dir(&self, id: &str) -> Result<PathBuf, ProviderError> {
        crate::trust::identity::check_name(id)
            .map_err(|e| ProviderError::Rejected(format!("machine id {id:?}: {e}")))?;
        Ok(self.root.join(id))
    }

    /// Kills the agent of every machine under `root` at once (its process group), without
    /// deleting anything: for a demo or a test that ends, passed or not.
    pub fn stop_all(root: &Path) {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let label = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = std::fs::read_to_string(e.path().join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                && pid > 1
                && Self::alive(pid, &label)
            {
                // SAFETY: kill(2) on the process group of an agent this host started.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
        }
    }

    /// Stops the agent of every machine under `root` (`coordinator machines stop-all`): SIGTERM
    /// to its process group, SIGKILL after `grace`. Directories stay (workspace, replica, state:
    /// a later `serve` finds the machines stopped) unless `remove`, which deletes each one as
    /// `destroy` does. Every machine is tried: one that cannot be stopped does not keep the
    /// others running; each outcome is in the list, in name order.
    pub fn stop_machines(
        root: &Path,
        remove: bool,
        grace: Duration,
    ) -> Result<Vec<Result<Stopped, StopError>>, StopError> {
        let rd = match std::fs::read_dir(root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(StopError::List {
                    dir: root.to_path_buf(),
                    source,
                });
            }
        };
        let mut dirs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        Ok(dirs
            .iter()
            .map(|dir| Self::stop_machine(dir, remove, grace))
            .collect())
    }

    /// One machine of [`Local::stop_machines`].
    fn stop_machine(dir: &Path, remove: bool, grace: Duration) -> Result<Stopped, StopError> {
        let label = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pid = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|pid| *pid > 1);
        let running = pid.filter(|pid| Self::alive(*pid, &label));
        if let Some(pid) = running
            && !Self::signal_and_wait(pid, &label, libc::SIGTERM, grace)
            && !Self::signal_and_wait(pid, &label, libc::SIGKILL, Duration::from_secs(10))
        {
            return Err(StopError::Alive { label, pid });
        }
        if remove {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StopError::Remove {
                        dir: dir.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Ok(Stopped {
            label,
            stopped_pid: running,
            removed: remove,
        })
    }

    /// Sends `signal` to the agent's process group; whether the agent is gone within `wait`.
    fn signal_and_wait(pid: u32, label: &str, signal: i32, wait: Duration) -> bool {
        // SAFETY: kill(2) on the process group of an agent this provider started (checked by
        // its command line naming the machine's label).
        unsafe { libc::kill(-(pid as i32), signal) };
        let t = Instant::now();
        while Self::alive(pid, label) {
            if t.elapsed() > wait {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// The machine's workspace (what the tests and the demo compare).
    pub fn workspace(root: &Path, label: &str) -> PathBuf {
        root.join(label).join("workspace")
    }

    /// Its agent's state directory.
    pub fn state_dir(root: &Path, label: &str) -> PathBuf {
        root.join(label).join("state")
    }

    fn pid(&self, dir: &Path) -> Option<u32> {
        std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Whether `pid` is the agent of `label` (not a recycled pid).
    fn alive(pid: u32, label: &str) -> bool {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == label.as_bytes()))
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
    }

    fn machine(&self, id: &str) -> Result<Option<Machine>, ProviderError> {
        let dir = self.dir(id)?;
        if !dir.exists() {
            return Ok(None);
        }
        let state = match self.pid(&dir) {
            Some(pid) if Self::alive(pid, id) => MachineState::Running,
            // No pid: a create that was interrupted before its agent started.
            _ => MachineState::Stopped,
        };
        Ok(Some(Machine {
            id: id.to_string(),
            label: id.to_string(),
            state,
            place: "localhost".into(),
        }))
    }
}

#[tonic::async_trait]
impl Provider for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn search(&self, role: Side) -> Result<Vec<Offer>, ProviderError> {
        let bin = self.bin_dir.join(format!("agent-{}", role.as_str()));
        if !bin.exists() {
            return Err(ProviderError::Rejected(format!(
                "{} not found (build the agents: cargo build --release)",
                bin.display()
            )));
        }
        Ok(vec![Offer {
            id: format!("local-{}", role.as_str()),
            place: String::new(),
            region: "local".into(),
            gpu_name: if role == Side::Gpu {
                "local".into()
            } else {
                String::new()
            },
            num_gpus: u32::from(role == Side::Gpu),
            price_per_hour: 0.0,
            reliability: 1.0,
            disk_gb: (crate::disk::fsx::free_bytes(&self.root).unwrap_or(0) >> 30) as f64,
            inet_down_mbps: 10_000.0,
        }])
    }

    async fn create(&self, _offer: &Offer, s: &Startup) -> Result<Machine, ProviderError> {
        let dir = self.dir(&s.label)?;
        if let Some(m) = self.machine(&s.label)?
            && m.state != MachineState::Stopped
        {
            return Ok(m); // created already: creating is idempotent by label
        }
        std::fs::create_dir_all(&dir).map_err(|e| io("creating the machine directory", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(|e| io("opening the machine log", e))?;
        let bin = self.bin_dir.join(format!("agent-{}", s.role.as_str()));
        let mut cmd = std::process::Command::new(&bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("STANDBY_") {
                cmd.env_remove(&k);
            }
        }
        // The token goes in the environment: a command line is readable by every local user.
        cmd.env("STANDBY_JOIN_TOKEN", &s.join_token)
            .arg("--coordinator")
            .arg(&s.coordinator)
            .arg("--machine")
            .arg(&s.label)
            .arg("--workspace")
            .arg(Self::workspace(&self.root, &s.label))
            .arg("--state-dir")
            .arg(Self::state_dir(&self.root, &s.label))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--heartbeat-interval")
            .arg(format!("{}ms", self.heartbeat.as_millis()))
            .args(&self.extra_args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| io("log", e))?)
            .stderr(log)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| ProviderError::Rejected(format!("starting {}: {e}", bin.display())))?;
        let pid = child.id();
        crate::disk::crashsafe::write_atomic(&dir.join("pid"), pid.to_string().as_bytes())
            .map_err(|e| io("writing the pid file", e))?;
        // Reap it when it exits, so a dead agent reads as stopped rather than a zombie.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(Machine {
            id: s.label.clone(),
            label: s.label.clone(),
            state: MachineState::Starting,
            place: "localhost".into(),
        })
    }

    async fn get(&self, id: &str) -> Result<Option<Machine>, ProviderError> {
        self.machine(id)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Machine>, ProviderError> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io("listing machines", e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix)
                && let Ok(Some(m)) = self.machine(&name)
            {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn destroy(&self, id: &str) -> Result<(), ProviderError> {
        let dir = self.dir(id)?;
        if let Some(pid) = self.pid(&dir) {
            if Self::alive(pid, id) {
                // SAFETY: kill(2) on the agent's own process group.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            let t = Instant::now();
            while Self::alive(pid, id) {
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(ProviderError::Transient(format!(
                        "machine {id} (pid {pid}) did not die"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("deleting the machine directory", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    /// A stand-in agent for machine `label`: a shell in its own process group whose command
    /// line names the label (as an agent's `--machine` does), with its pid file written.
    /// A stand-in agent running `setup` (a `trap`, say), then sleeping; returned once `setup`
    /// has run (it touches `ready`), so a signal sent at once meets the set-up shell.
    fn fake_agent(root: &Path, label: &str, setup: &str) -> std::process::Child {
        let dir = root.join(label);
        std::fs::create_dir_all(dir.join("workspace")).unwrap();
        std::fs::write(dir.join("workspace/data"), b"replica").unwrap();
        let ready = root.join(format!("{label}.ready"));
        let script = format!("{setup} : > '{}'; sleep 60; true", ready.display());
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(label)
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(dir.join("pid"), child.id().to_string()).unwrap();
        let t = Instant::now();
        while !(ready.exists() && Local::alive(child.id(), label))
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_file(&ready).ok();
        child
    }

    fn stopped(r: Result<Vec<Result<Stopped, StopError>>, StopError>) -> Vec<Stopped> {
        r.unwrap().into_iter().map(Result::unwrap).collect()
    }

    #[test]
    fn a_machine_that_cannot_be_removed_does_not_stop_the_others() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let mut first = fake_agent(root, "sb-1-a-gpu-1", "");
        let mut last = fake_agent(root, "sb-1-c-gpu-1", "");
        // A directory that cannot be deleted: a directory inside it is read-only.
        let locked = root.join("sb-1-b-gpu-1");
        std::fs::create_dir_all(locked.join("state/inner")).unwrap();
        let ro = std::fs::Permissions::from_mode(0o500);
        std::fs::set_permissions(locked.join("state"), ro).unwrap();
        let got = Local::stop_machines(root, true, Duration::from_secs(5)).unwrap();
        // Writable again, for the temporary directory's own clean-up (when it is still there).
        let rw = std::fs::Permissions::from_mode(0o700);
        let _ = std::fs::set_permissions(locked.join("state"), rw);
        first.wait().unwrap();
        last.wait().unwrap();
        assert_eq!(got.len(), 3);
        assert!(got[0].as_ref().is_ok_and(|s| s.removed), "{got:?}");
        assert!(got[2].as_ref().is_ok_and(|s| s.removed), "{got:?}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            println!("running as root: the read-only directory was deleted anyway; not checked");
            return;
        }
        let e = got[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("sb-1-b-gpu-1") && e.contains("delete it by hand"),
            "{e}"
        );
        assert!(
            locked.join("state/inner").exists(),
            "the failed one is left as it was"
        );
    }

    #[test]
    fn stop_machines_stops_every_agent_and_keeps_or_removes_the_directories() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let mut polite = fake_agent(root, "sb-1-p-gpu-1", "");
        // An agent that ignores SIGTERM is killed after the grace.
        let mut stubborn = fake_agent(root, "sb-1-p-cpu-1", "trap '' TERM;");
        // A machine whose agent is already gone.
        std::fs::create_dir_all(root.join("sb-1-q-gpu-1")).unwrap();
        let grace = Duration::from_millis(300);
        let got = stopped(Local::stop_machines(root, false, grace));
        let (p, s) = (polite.id(), stubborn.id());
        assert_eq!(
            got,
            vec![
                Stopped {
                    label: "sb-1-p-cpu-1".into(),
                    stopped_pid: Some(s),
                    removed: false
                },
                Stopped {
                    label: "sb-1-p-gpu-1".into(),
                    stopped_pid: Some(p),
                    removed: false
                },
                Stopped {
                    label: "sb-1-q-gpu-1".into(),
                    stopped_pid: None,
                    removed: false
                },
            ]
        );
        assert!(!Local::alive(p, "sb-1-p-gpu-1") && !Local::alive(s, "sb-1-p-cpu-1"));
        polite.wait().unwrap();
        let st = stubborn.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL)
        );
        // Kept: the replica is still there for a later `serve`.
        let data = root.join("sb-1-p-cpu-1/workspace/data");
        assert_eq!(std::fs::read(&data).unwrap(), b"replica");
        // Again, now with --remove: nothing runs, every directory goes.
        let got = stopped(Local::stop_machines(root, true, grace));
        assert!(
            got.iter().all(|s| s.stopped_pid.is_none() && s.removed),
            "{got:?}"
        );
        assert_eq!(std::fs::read_dir(root).unwrap().count(), 0);
    }

    #[test]
    fn stop_machines_without_a_machines_directory_stops_nothing() {
        let t = tempfile::tempdir().unwrap();
        let got = Local::stop_machines(&t.path().join("machines"), true, Duration::ZERO).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn a_recycled_pid_is_not_signalled() {
        let t = tempfile::tempdir().unwrap();
        // Our own pid in the pid file: its command line does not name the machine.
        let dir = t.path().join("sb-1-p-gpu-1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pid"), std::process::id().to_string()).unwrap();
        let got = stopped(Local::stop_machines(t.path(), false, Duration::ZERO));
        assert_eq!(got[0].stopped_pid, None);
        assert!(dir.join("pid").exists());
    }
}
