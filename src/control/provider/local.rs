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
