//! A site on a LAN of network namespaces: the coordinator on host `coord`, agents on hosts of
//! their own, all real processes, each started inside its host's namespace. The admin CLI runs
//! inside `coord` with a time limit (a stopped coordinator must not hang the test).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::netns::Lan;
use super::{AGENT_CPU, AGENT_GPU, COORDINATOR, Proc, wait_until};

pub const COORD_PORT: u16 = 7700;

pub struct Site {
    pub lan: Lan,
    pub dir: PathBuf,
    pub coord_dir: PathBuf,
    pub coord: Option<Proc>,
    pub coord_log: PathBuf,
    coord_args: Vec<String>,
    coord_env: Vec<(String, String)>,
}

impl Site {
    /// A LAN on 10.`subnet`.0.0/24 with host `coord` (.1) running `coordinator serve` with
    /// `args` (and `env`), advertised to agents at its LAN address.
    pub fn new(dir: &Path, subnet: u8, args: &[&str], env: &[(&str, &str)]) -> Site {
        Self::on(Lan::new(subnet), dir, args, env)
    }

    /// [`Site::new`] on a LAN made beforehand.
    pub fn on(mut lan: Lan, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Site {
        let ip = lan.host("coord", 1);
        let coord_dir = dir.join("coord");
        let st = Command::new(COORDINATOR)
            .args(["init", "--dir"])
            .arg(&coord_dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut coord_args: Vec<String> = vec![
            "serve".into(),
            "--dir".into(),
            coord_dir.display().to_string(),
            "--listen".into(),
            format!("0.0.0.0:{COORD_PORT}"),
            "--advertise".into(),
            format!("{ip}:{COORD_PORT}"),
            "--metrics-listen".into(),
            "127.0.0.1:9464".into(),
        ];
        coord_args.extend(args.iter().map(|s| s.to_string()));
        let mut s = Site {
            lan,
            dir: dir.to_path_buf(),
            coord_log: dir.join("coordinator.log"),
            coord_dir,
            coord: None,
            coord_args,
            coord_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.start_coordinator();
        s
    }

    /// The coordinator's URL as agents on the LAN dial it.
    pub fn coord_url(&self) -> String {
        format!("{}:{COORD_PORT}", self.lan.ip("coord"))
    }

    pub fn start_coordinator(&mut self) {
        let _ = fs::remove_file(self.coord_dir.join("serve.addr"));
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.coord_log)
            .unwrap();
        let mut c = self.lan.cmd("coord", COORDINATOR);
        c.args(&self.coord_args)
            .env("STANDBY_LOG", "info")
            .stderr(logf);
        for (k, v) in &self.coord_env {
            c.env(k, v);
        }
        self.coord = Some(Proc(c.spawn().unwrap()));
        let ok = wait_until(Duration::from_secs(30), || {
            self.coord_dir.join("serve.addr").exists()
        });
        assert!(ok, "coordinator did not start: {}", self.coord_log_text());
    }

    /// kill -9 of the coordinator.
    pub fn kill_coordinator(&mut self) {
        self.coord.take();
    }

    pub fn coord_pid(&self) -> Option<i32> {
        self.coord.as_ref().map(|p| p.0.id() as i32)
    }

    pub fn coord_log_text(&self) -> String {
        fs::read_to_string(&self.coord_log).unwrap_or_default()
    }

    pub fn token(&self, pair: &str, role: &str) -> String {
        super::join_token(&self.coord_dir, pair, role, "10m")
    }

    /// The admin CLI, for use from another thread.
    pub fn cli(&self) -> AdminCli {
        AdminCli {
            ns: self.lan.ns("coord"),
            dir: self.coord_dir.clone(),
        }
    }

    pub fn admin(&self, args: &[&str]) -> Output {
        self.cli().admin(args)
    }

    pub fn pairs(&self) -> Option<Vec<serde_json::Value>> {
        self.cli().pairs()
    }

    pub fn pair(&self, name: &str) -> Option<serde_json::Value> {
        self.cli().pair(name)
    }

    pub fn state(&self, name: &str) -> Option<(String, u64)> {
        self.cli().state(name)
    }
}

/// The coordinator's admin CLI, run inside host `coord`.
#[derive(Clone)]
pub struct AdminCli {
    ns: String,
    dir: PathBuf,
}

impl AdminCli {
    /// An admin verb, given at most 10 s (a stopped coordinator must not hang the caller).
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["--", "timeout", "10", COORDINATOR])
            .args(args)
            .args(["--server", &format!("127.0.0.1:{COORD_PORT}"), "--tls-dir"])
            .arg(self.dir.join("admin"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `pairs --json`; None when the coordinator does not answer.
    pub fn pairs(&self) -> Option<Vec<serde_json::Value>> {
        let out = self.admin(&["pairs", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn pair(&self, name: &str) -> Option<serde_json::Value> {
        self.pairs()?.into_iter().find(|p| p["pair"] == name)
    }

    /// (state, epoch) of a pair, when the coordinator answers.
    pub fn state(&self, name: &str) -> Option<(String, u64)> {
        self.pair(name).map(|p| {
            (
                p["state"].as_str().unwrap_or("").to_string(),
                p["epoch"].as_u64().unwrap_or(0),
            )
        })
    }
}

/// Where agents on a LAN find their coordinators: the LAN, the test's directory (agents live
/// below it), the coordinators' addresses and a join token for the agent's seat.
pub struct Coordinators<'a> {
    pub lan: &'a Lan,
    pub dir: &'a Path,
    pub urls: &'a str,
    pub token: &'a str,
}

/// An agent on a host of the LAN, joined with a token on its first start; restarts keep its
/// state directory (its certificate) and its port.
pub struct Agent {
    pub proc: Option<Proc>,
    pub host: String,
    pub role: &'static str,
    pub machine: String,
    pub workspace: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Agent {
    /// Starts agent-`role` on `host` listening on `port`, as machine `machine`.
    pub fn start(
        site: &Site,
        host: &str,
        role: &'static str,
        pair: &str,
        machine: &str,
        port: u16,
        extra: &[&str],
    ) -> Agent {
        let to = Coordinators {
            lan: &site.lan,
            dir: &site.dir,
            urls: &site.coord_url(),
            token: &site.token(pair, role),
        };
        Self::start_on(&to, host, role, machine, port, extra)
    }

    /// The same for coordinators elsewhere on a LAN (`urls`: one or several addresses).
    pub fn start_on(
        to: &Coordinators,
        host: &str,
        role: &'static str,
        machine: &str,
        port: u16,
        extra: &[&str],
    ) -> Agent {
        let base = to.dir.join(machine);
        let mut args: Vec<String> = vec![
            "--workspace".into(),
            base.join("workspace").display().to_string(),
            "--state-dir".into(),
            base.join("state").display().to_string(),
            "--coordinator".into(),
            to.urls.to_string(),
            "--listen".into(),
            format!("0.0.0.0:{port}"),
            "--machine".into(),
            machine.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut a = Agent {
            proc: None,
            host: host.into(),
            role,
            machine: machine.into(),
            workspace: base.join("workspace"),
            state: base.join("state"),
            log: to.dir.join(format!("{machine}.log")),
            args,
        };
        fs::create_dir_all(&a.workspace).unwrap();
        a.spawn(to.lan, Some(to.token));
        a
    }

    fn spawn(&mut self, lan: &Lan, token: Option<&str>) {
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let bin = if self.role == "gpu" {
            AGENT_GPU
        } else {
            AGENT_CPU
        };
        let mut c = lan.cmd(&self.host, bin);
        c.args(&self.args).env("STANDBY_LOG", "info").stderr(logf);
        if let Some(t) = token {
            c.env("STANDBY_JOIN_TOKEN", t);
        }
        self.proc = Some(Proc(c.spawn().unwrap()));
    }

    /// kill -9.
    pub fn kill(&mut self) {
        self.proc.take();
    }

    /// Starts again after a kill (no token: it keeps the certificate it joined with).
    pub fn restart(&mut self, site: &Site) {
        self.kill();
        self.spawn(&site.lan, None);
    }

    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(|p| p.0.id() as i32)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Who acted as the primary at which epoch, from agent logs: a receiver's "session started"
/// names the sender and the epoch it accepted, and a promotion names the promoted machine's
/// epoch. Returns epoch -> the machines seen as primary at that epoch.
pub fn primaries(logs: &[(&str, String)]) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut m: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    let field = |line: &str, key: &str| -> Option<String> {
        let i = line.find(&format!(" {key}="))? + key.len() + 2;
        Some(
            line[i..]
                .split_whitespace()
                .next()?
                .trim_matches('"')
                .to_string(),
        )
    };
    for (machine, log) in logs {
        for line in log.lines() {
            let (who, epoch) = if line.contains("session started") {
                (field(line, "sender"), field(line, "epoch"))
            } else if line.contains("promoted: this machine is the primary now") {
                (Some(machine.to_string()), field(line, "epoch"))
            } else {
                continue;
            };
            if let (Some(w), Some(e)) = (who, epoch.and_then(|e| e.parse::<u64>().ok())) {
                let v = m.entry(e).or_default();
                if !v.contains(&w) {
                    v.push(w);
                }
            }
        }
    }
    m
}
