//! Highly available coordinators for the end-to-end tests and the benchmarks: `coordinator
//! init` once, copied to three directories, three coordinators on a real etcd cluster
//! ([`super::etcd`]), each on a fixed loopback port; and a pair joined by hand through them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::etcd::Cluster;
use super::*;

/// The coordinators' timing (`serve` flags).
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// `--leader-lease`.
    pub lease: &'static str,
    /// `--heartbeat-interval`.
    pub heartbeat: &'static str,
    /// `--failover-after`.
    pub failover_after: &'static str,
}

impl Tuning {
    /// What the tests use: a short lease and fast heartbeats, so hand-overs take seconds.
    pub const TESTS: Tuning = Tuning {
        lease: "4s",
        heartbeat: "500ms",
        failover_after: "3s",
    };
    /// The coordinator's defaults.
    pub const DEFAULTS: Tuning = Tuning {
        lease: "6s",
        heartbeat: "1s",
        failover_after: "3s",
    };
}

/// One of the coordinators: its directory (a copy of the first's `init`) and fixed port.
pub struct Member {
    pub dir: PathBuf,
    pub listen: String,
    pub proc: Option<Proc>,
    tuning: Tuning,
}

impl Member {
    pub fn start(&mut self, etcd: &[String]) {
        let _ = fs::remove_file(self.dir.join("serve.addr"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("coordinator.log"))
            .unwrap();
        let child = Command::new(COORDINATOR)
            .args(["serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &self.listen, "--metrics-listen", "127.0.0.1:0"])
            .args([
                "--provider",
                "none",
                "--store",
                "etcd",
                "--etcd",
                &etcd.join(","),
            ])
            .args(["--leader-lease", self.tuning.lease])
            .args(["--heartbeat-interval", self.tuning.heartbeat])
            .args(["--failover-after", self.tuning.failover_after])
            .env("STANDBY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
    }

    /// Whether it leads (followers listen too, but only the leader writes `serve.addr`).
    pub fn serves(&self) -> bool {
        self.proc.is_some() && self.dir.join("serve.addr").exists()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

pub struct Site {
    pub members: Vec<Member>,
    pub etcd: Cluster,
}

impl Site {
    /// `coordinator init` once, copied to three directories (the CA, token and backup keys are
    /// shared by copying), and three coordinators started on the etcd cluster.
    pub fn start(root: &Path) -> Option<Site> {
        Self::start_tuned(root, Tuning::TESTS)
    }

    /// The same with this `--leader-lease`.
    pub fn start_with(root: &Path, lease: &'static str) -> Option<Site> {
        Self::start_tuned(
            root,
            Tuning {
                lease,
                ..Tuning::TESTS
            },
        )
    }

    /// The same with these settings.
    pub fn start_tuned(root: &Path, tuning: Tuning) -> Option<Site> {
        let etcd = Cluster::start(3)?;
        let first = root.join("c0");
        let st = Command::new(COORDINATOR)
            .args(["init", "--dir"])
            .arg(&first)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut members = Vec::new();
        for i in 0..3 {
            let dir = root.join(format!("c{i}"));
            if i > 0 {
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(&first)
                    .arg(&dir)
                    .status()
                    .unwrap();
                assert!(st.success());
            }
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            members.push(Member {
                dir,
                listen: format!("127.0.0.1:{port}"),
                proc: None,
                tuning,
            });
        }
        let mut site = Site { members, etcd };
        let eps = site.etcd.endpoints();
        for m in &mut site.members {
            m.start(&eps);
        }
        Some(site)
    }

    pub fn addresses(&self) -> String {
        let all: Vec<&str> = self.members.iter().map(|m| m.listen.as_str()).collect();
        all.join(",")
    }

    /// The one member that serves, once exactly one does.
    pub fn leader(&self, within: Duration) -> usize {
        let mut found = None;
        let ok = wait_until(within, || {
            let serving: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].serves())
                .collect();
            found = (serving.len() == 1).then(|| serving[0]);
            found.is_some()
        });
        assert!(ok, "no single leader:\n{}", self.logs());
        found.unwrap()
    }

    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {}\n{}", m.dir.display(), m.log()))
            .collect()
    }

    /// `coordinator pairs --json` through member `i`.
    pub fn pairs(&self, i: usize) -> Vec<serde_json::Value> {
        let m = &self.members[i];
        let out = Command::new(COORDINATOR)
            .args(["pairs", "--json", "--server", &m.listen, "--tls-dir"])
            .arg(m.dir.join("admin"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Site {
    /// An admin verb through member `i`.
    pub fn admin(&self, i: usize, args: &[&str]) -> std::process::Output {
        let m = &self.members[i];
        Command::new(COORDINATOR)
            .args(args)
            .args(["--server", &m.listen, "--tls-dir"])
            .arg(m.dir.join("admin"))
            .output()
            .unwrap()
    }

    /// `coordinator status --json` through member `i`.
    pub fn status(&self, i: usize) -> serde_json::Value {
        let out = self.admin(i, &["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Member `i`'s `/metrics` (followers serve them too).
    pub fn metrics(&self, i: usize) -> String {
        let addr = fs::read_to_string(self.members[i].dir.join("metrics.addr")).unwrap();
        http_get(addr.trim(), "/metrics")
    }
}

/// A pair joined by hand through the leader `at` (agents given all three addresses), Syncing
/// with its tree flushed to the CPU. Returns (cpu, gpu).
pub fn joined_pair(site: &Site, at: usize, root: &Path) -> (Managed, Managed) {
    joined_pair_via(site, at, &site.addresses(), root)
}

/// The same with the agents given `coords` only.
pub fn joined_pair_via(site: &Site, at: usize, coords: &str, root: &Path) -> (Managed, Managed) {
    let token = |role: &str| join_token(&site.members[at].dir, "p", role, "10m");
    let ws = root.join("gpu-ws");
    make_tree(&ws, &mut rng(seed("ha")), 20, &[1 << 20]);
    let cpu = Managed::cpu(
        coords,
        Some(&token("cpu")),
        &root.join("cpu-ws"),
        &root.join("cpu-state"),
        &[],
    );
    let gpu = Managed::gpu(
        coords,
        Some(&token("gpu")),
        &ws,
        &root.join("gpu-state"),
        &["--debounce", "100ms"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        site.pairs(at)
            .iter()
            .any(|p| p["pair"] == "p" && p["state"] == "Syncing")
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(ok, "{}", site.logs());
    (cpu, gpu)
}
