//! Highly available coordinators for the tests (ARCHITECTURE.md, "Highly available
//! coordinators"): `coordinator init` once, copied to three directories (the CA, token and
//! backup keys are shared by copying), three `coordinator serve --store etcd` on a real etcd
//! cluster, on loopback or each inside a network namespace of its own; and a pair joined by hand
//! through them. The benchmarks use it too.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::etcd::{Cluster, on_net};
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

/// One of the coordinators: its directory (a copy of the first's `init`) and address.
pub struct Member {
    pub dir: PathBuf,
    /// Its `--listen` address, which it also advertises.
    pub listen: String,
    pub proc: Option<Proc>,
    tuning: Tuning,
    /// More `serve` arguments (a provider).
    extra: Vec<String>,
    /// The network namespace it runs in (None: this one, on loopback).
    pub ns: Option<String>,
}

impl Member {
    /// `program` run where this coordinator runs (inside its namespace, if it has one).
    pub fn command(&self, program: &str) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .args(["--", program]);
                c
            }
            None => Command::new(program),
        }
    }

    pub fn start(&mut self, etcd: &[String]) {
        for f in ["serve.addr", "metrics.addr"] {
            let _ = fs::remove_file(self.dir.join(f));
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("coordinator.log"))
            .unwrap();
        let mut c = self.command(COORDINATOR);
        c.args(["serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &self.listen, "--advertise", &self.listen])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--store", "etcd", "--etcd", &etcd.join(",")])
            .args(["--leader-lease", self.tuning.lease])
            .args(["--heartbeat-interval", self.tuning.heartbeat])
            .args(["--failover-after", self.tuning.failover_after])
            .args(&self.extra)
            .env("STANDBY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.proc = Some(Proc(c.spawn().unwrap()));
    }

    /// Whether it serves (only the leader writes `serve.addr`).
    pub fn serves(&self) -> bool {
        self.proc.is_some() && self.dir.join("serve.addr").exists()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        self.proc.take();
    }

    /// Its exit status once it exited (None: still running, or not started).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.as_mut()?.0.try_wait().unwrap()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }

    /// Its `/metrics` (followers serve them too).
    pub fn metrics(&self) -> String {
        self.try_metrics().expect("its /metrics")
    }

    /// Its `/metrics`, or None while it does not serve them yet.
    pub fn try_metrics(&self) -> Option<String> {
        let addr = fs::read_to_string(self.dir.join("metrics.addr")).ok()?;
        on_net(self.ns.as_deref(), || {
            try_http_get(addr.trim(), "/metrics").ok()
        })
    }

    /// An admin verb sent to this coordinator, given at most 10 s.
    pub fn admin(&self, args: &[&str]) -> Output {
        let mut c = self.command("timeout");
        c.arg("10")
            .arg(COORDINATOR)
            .args(args)
            .args(["--server", &self.listen, "--tls-dir"])
            .arg(self.dir.join("admin"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// Where each coordinator runs: (namespace, address) per member, or loopback.
pub enum Placement {
    Loopback,
    Namespaces(Vec<(String, String)>),
}

/// Three coordinators on one etcd cluster.
pub struct Group {
    pub members: Vec<Member>,
    pub etcd: Cluster,
}

impl Group {
    /// On a three-member etcd on loopback, with `--leader-lease 4s` and no provider
    /// (replacements join by hand); None when etcd is missing.
    pub fn start(root: &Path) -> Option<Group> {
        Self::start_with(root, "4s")
    }

    /// The same with this `--leader-lease`.
    pub fn start_with(root: &Path, lease: &'static str) -> Option<Group> {
        Self::start_tuned(
            root,
            Tuning {
                lease,
                ..Tuning::TESTS
            },
        )
    }

    /// The same with these settings.
    pub fn start_tuned(root: &Path, tuning: Tuning) -> Option<Group> {
        let etcd = Cluster::start(3)?;
        let none = ["--provider", "none"];
        Some(Self::on(root, etcd, tuning, &none, Placement::Loopback))
    }

    /// Three coordinators on `etcd`, placed as said, with more `serve` arguments.
    pub fn on(
        root: &Path,
        etcd: Cluster,
        tuning: Tuning,
        extra: &[&str],
        place: Placement,
    ) -> Group {
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
            let (ns, listen) = match &place {
                Placement::Loopback => (None, format!("127.0.0.1:{}", free_port())),
                Placement::Namespaces(at) => (Some(at[i].0.clone()), format!("{}:7700", at[i].1)),
            };
            members.push(Member {
                dir,
                listen,
                proc: None,
                tuning,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                ns,
            });
        }
        let mut g = Group { members, etcd };
        let eps = g.etcd.endpoints();
        for m in &mut g.members {
            m.start(&eps);
        }
        g
    }

    /// Every coordinator's address, comma-separated (what agents are given).
    pub fn addresses(&self) -> String {
        let all: Vec<&str> = self.members.iter().map(|m| m.listen.as_str()).collect();
        all.join(",")
    }

    /// The one member that serves, once exactly one does.
    pub fn leader(&self, within: Duration) -> usize {
        let found = self.try_leader(within);
        assert!(found.is_some(), "no single leader:\n{}", self.logs());
        found.unwrap()
    }

    /// The one member that serves, once exactly one does within `within`.
    pub fn try_leader(&self, within: Duration) -> Option<usize> {
        let mut found = None;
        wait_until(within, || {
            let serving: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].serves())
                .collect();
            found = (serving.len() == 1).then(|| serving[0]);
            found.is_some()
        });
        found
    }

    /// Starts member `i` again (as its supervisor would).
    pub fn restart(&mut self, i: usize) {
        let eps = self.etcd.endpoints();
        self.members[i].kill();
        self.members[i].start(&eps);
    }

    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {}\n{}", m.dir.display(), m.log()))
            .collect()
    }

    /// An admin verb through member `i`.
    pub fn admin(&self, i: usize, args: &[&str]) -> Output {
        self.members[i].admin(args)
    }

    /// `coordinator pairs --json` through member `i`.
    pub fn pairs(&self, i: usize) -> Vec<serde_json::Value> {
        let out = self.admin(i, &["pairs", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Pair `name` as whichever coordinator leads now reports it (None: none answers).
    pub fn pair(&self, name: &str) -> Option<serde_json::Value> {
        self.members.iter().filter(|m| m.serves()).find_map(|m| {
            let out = m.admin(&["pairs", "--json"]);
            let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
            all.into_iter().find(|p| p["pair"] == name)
        })
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

    /// Member `i`'s `/metrics`.
    pub fn metrics(&self, i: usize) -> String {
        self.members[i].metrics()
    }
}

/// A pair joined by hand through the leader `at` (agents given all three addresses), Syncing
/// with its tree flushed to the CPU. Returns (cpu, gpu).
pub fn joined_pair(site: &Group, at: usize, root: &Path) -> (Managed, Managed) {
    joined_pair_via(site, at, &site.addresses(), root)
}

/// The same with the agents given `coords` only.
pub fn joined_pair_via(site: &Group, at: usize, coords: &str, root: &Path) -> (Managed, Managed) {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
