//! The real binaries as processes: agent-cpu on loopback, agent-gpu runs (`--once`, `flush`),
//! coordinators, agents managed by a coordinator, and the guards that kill what a test started
//! (a failing test never leaves agents behind).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{join_token, make_tree, rng, seed, wait_until};

pub const AGENT_GPU: &str = env!("CARGO_BIN_EXE_agent-gpu");
pub const AGENT_CPU: &str = env!("CARGO_BIN_EXE_agent-cpu");
pub const COORDINATOR: &str = env!("CARGO_BIN_EXE_coordinator");

/// A running agent-cpu.
pub struct Cpu {
    pub child: Child,
    pub workspace: PathBuf,
    pub state: PathBuf,
    pub tls: PathBuf,
    pub addr: String,
    pub log: PathBuf,
}

impl Cpu {
    pub fn start(workspace: &Path, state: &Path, tls: &Path) -> Cpu {
        Self::start_on(workspace, state, tls, "127.0.0.1:0")
    }

    pub fn start_on(workspace: &Path, state: &Path, tls: &Path, listen: &str) -> Cpu {
        Self::start_with(workspace, state, tls, listen, &[], &[])
    }

    /// With further flags and environment (e.g. an off-site backup).
    pub fn start_with(
        workspace: &Path,
        state: &Path,
        tls: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Cpu {
        fs::create_dir_all(state).unwrap();
        let addr_file = state.join("listen.addr");
        let _ = fs::remove_file(&addr_file);
        let log = state.with_extension("log");
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(AGENT_CPU)
            .arg("--workspace")
            .arg(workspace)
            .arg("--state-dir")
            .arg(state)
            .arg("--tls-dir")
            .arg(tls)
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .env(
                "STANDBY_LOG",
                std::env::var("STANDBY_TEST_CPU_LOG").unwrap_or_else(|_| "info".into()),
            )
            // After the default, so a test's own `STANDBY_LOG` wins.
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut cpu = Cpu {
            child,
            workspace: workspace.to_path_buf(),
            state: state.to_path_buf(),
            tls: tls.to_path_buf(),
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(a) = fs::read_to_string(&addr_file)
                && !a.is_empty()
            {
                cpu.addr = a;
                break;
            }
            if let Ok(Some(st)) = cpu.child.try_wait() {
                panic!("agent-cpu exited with {st}: {}", cpu.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent-cpu did not start: {}",
                cpu.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cpu
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Restarts on the same address (the sender keeps its peer URL).
    pub fn restart(&mut self) {
        self.kill();
        let addr = self.addr.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Cpu::start_on(&self.workspace, &self.state, &self.tls, &addr)
            }));
            match next {
                Ok(c) => {
                    *self = c; // the old process is already gone
                    return;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }
}

impl Drop for Cpu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU seconds a process has used so far (utime + stime from /proc, in clock ticks of 10 ms).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// A child process killed when dropped (a failing test never leaves agents behind).
pub struct Proc(pub Child);

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Arguments of agent-gpu for a static pair (its endpoint on a free loopback port: tests run
/// several agents at once).
pub fn gpu_args(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--workspace".into(),
        workspace.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--tls-dir".into(),
        tls.display().to_string(),
        "--peer".into(),
        peer.to_string(),
    ]
}

/// `agent-gpu --once`; returns the parsed report, or panics with stderr.
pub fn once(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> serde_json::Value {
    let out = once_raw(workspace, state, tls, peer);
    if std::env::var_os("STANDBY_TEST_SHOW_LOGS").is_some() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "agent-gpu --once failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON line expected: {stdout}"
    );
    serde_json::from_str(&stdout).unwrap()
}

pub fn once_raw(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> Output {
    Command::new(AGENT_GPU)
        .args(gpu_args(workspace, state, tls, peer))
        .arg("--once")
        .output()
        .unwrap()
}

pub fn spawn_once(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> Proc {
    Proc(
        Command::new(AGENT_GPU)
            .args(gpu_args(workspace, state, tls, peer))
            .arg("--once")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A coordinator process with its directory (CA, admin certificate, state).
pub struct Coord {
    pub proc: Option<Proc>,
    pub dir: PathBuf,
    pub addr: String,
    pub metrics: String,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Coord {
    /// `coordinator init` in `dir`, then `serve` on loopback ports.
    pub fn start(dir: &Path, args: &[&str]) -> Coord {
        Self::start_env(dir, args, &[])
    }

    /// With variables in the coordinator's environment (e.g. a bucket's access key).
    pub fn start_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Coord {
        let st = Command::new(COORDINATOR)
            .args(["init", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut c = Coord {
            proc: None,
            dir: dir.to_path_buf(),
            addr: "127.0.0.1:0".into(),
            metrics: "127.0.0.1:0".into(),
            log: dir.join("coordinator.log"),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        c.serve();
        c
    }

    fn serve(&mut self) {
        let _ = fs::remove_file(self.dir.join("serve.addr"));
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(COORDINATOR)
            .args(["serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr, "--metrics-listen", &self.metrics])
            .args(if self.args.iter().any(|a| a == "--provider") {
                &[][..]
            } else {
                &["--provider", "none"][..]
            })
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("STANDBY_LOG", "info")
            .stderr(logf)
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
        let mut addr = String::new();
        let ok = wait_until(Duration::from_secs(30), || {
            addr = fs::read_to_string(self.dir.join("serve.addr")).unwrap_or_default();
            !addr.is_empty()
        });
        assert!(
            ok,
            "coordinator did not start: {}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        self.addr = addr;
        self.metrics = fs::read_to_string(self.dir.join("metrics.addr")).unwrap();
    }

    pub fn kill(&mut self) {
        self.proc.take();
    }

    /// Restarts on the same ports (agents keep their coordinator address).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve()));
            match r {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    pub fn token(&self, pair: &str, role: &str, ttl: &str) -> String {
        join_token(&self.dir, pair, role, ttl)
    }

    /// `coordinator pairs --json`.
    pub fn pairs(&self) -> Vec<serde_json::Value> {
        let out = self.admin(&["pairs", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn pair(&self, name: &str) -> Option<serde_json::Value> {
        self.pairs().into_iter().find(|p| p["pair"] == name)
    }

    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(COORDINATOR)
            .args(args)
            .args(["--server", &self.addr, "--tls-dir"])
            .arg(self.dir.join("admin"))
            .output()
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// More `serve` arguments from the next (re)start on.
    pub fn args_push(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|s| s.to_string()));
    }
}

/// An agent managed by a coordinator.
pub struct Managed {
    pub proc: Proc,
    pub workspace: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Managed {
    fn start(
        bin: &str,
        role: &str,
        coord: &str,
        token: Option<&str>,
        (ws, state): (&Path, &Path),
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Managed {
        fs::create_dir_all(state).unwrap();
        let log = state.with_extension(format!("{role}.log"));
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--workspace")
            .arg(ws)
            .arg("--state-dir")
            .arg(state)
            .args(["--coordinator", coord, "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("STANDBY_LOG", "info")
            .stderr(logf);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Managed {
            proc: Proc(cmd.spawn().unwrap()),
            workspace: ws.to_path_buf(),
            state: state.to_path_buf(),
            log,
        }
    }

    pub fn gpu(
        coord: &str,
        token: Option<&str>,
        ws: &Path,
        state: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Managed {
        Self::start(AGENT_GPU, "gpu", coord, token, (ws, state), extra, env)
    }

    pub fn cpu(
        coord: &str,
        token: Option<&str>,
        ws: &Path,
        state: &Path,
        extra: &[&str],
    ) -> Managed {
        Self::start(AGENT_CPU, "cpu", coord, token, (ws, state), extra, &[])
    }

    pub fn pid(&self) -> i32 {
        self.proc.0.id() as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Kills the agents of the machines under a directory (`<dir>/<label>/pid`: the local
/// provider's layout, and the test cloud's) when a test ends, passed or not: they outlive the
/// coordinator by design.
pub struct MachineReaper(pub PathBuf);

impl Drop for MachineReaper {
    fn drop(&mut self) {
        standby::control::provider::local::Local::stop_all(&self.0);
    }
}

/// A pair joined by hand under `dir` (`gpu-ws`, `gpu-state`, `cpu-ws`, `cpu-state`): a seeded
/// tree of `n_small` files and a 1 MiB file, both agents started with join tokens, and the pair
/// `Syncing` with the tree flushed to the CPU. Returns (cpu, gpu).
pub fn hand_joined_pair(
    coord: &Coord,
    dir: &Path,
    name: &str,
    n_small: usize,
) -> (Managed, Managed) {
    let ws = dir.join("gpu-ws");
    make_tree(&ws, &mut rng(seed(name)), n_small, &[1 << 20]);
    let cpu = Managed::cpu(
        &coord.addr,
        Some(&coord.token(name, "cpu", "10m")),
        &dir.join("cpu-ws"),
        &dir.join("cpu-state"),
        &[],
    );
    let gpu = Managed::gpu(
        &coord.addr,
        Some(&coord.token(name, "gpu", "10m")),
        &ws,
        &dir.join("gpu-state"),
        &["--debounce", "100ms"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Syncing")
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(ok, "{}", coord.log_text());
    (cpu, gpu)
}

/// `agent-gpu flush` for a state directory.
pub fn flush(state: &Path, timeout: &str) -> Output {
    Command::new(AGENT_GPU)
        .args(["flush", "--state-dir"])
        .arg(state)
        .args(["--timeout", timeout])
        .output()
        .unwrap()
}
