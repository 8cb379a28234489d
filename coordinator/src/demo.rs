//! `coordinator demo`: the whole story on one machine with real processes. A coordinator (the
//! `local` provider) and a GPU/CPU agent pair over mTLS on loopback; a workload is written and
//! flushed; the GPU agent is killed with SIGKILL; detection, failover, provisioning, restore,
//! verification and cutover are shown as they happen; a timeline table and a blake3 comparison
//! of the two workspaces end it. Everything it started is stopped, and its directory removed
//! (unless --keep).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::failover::{Policy, Timing};
use crate::proto::admin_client::AdminClient;
use crate::proto::{self, EventKind, EventsRequest, ListPairsRequest, PairState, PairView};
use crate::trust::identity::{Identity, Role};
use crate::trust::tls::{self, Expect, TlsMaterial};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

const PAIR: &str = "demo";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where to run (default: a fresh directory under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the directory (logs, workspaces, state) afterwards.
    #[arg(long)]
    keep: bool,
    /// Size of the dataset file, MiB.
    #[arg(long, default_value_t = 64)]
    dataset_mib: u64,
}

/// One transition of the pair, as the coordinator reported it.
#[derive(Clone, Debug)]
struct Step {
    unix_ms: u64,
    to: String,
    message: String,
}

/// What the demo started, stopped on drop whatever happens.
struct Rig {
    dir: PathBuf,
    keep: bool,
    children: Vec<Child>,
    shutdown: CancellationToken,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Machines of the local provider run in process groups of their own.
        crate::control::provider::local::Local::stop_all(&self.dir.join("machines"));
        self.shutdown.cancel();
        if self.keep {
            println!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn say(t0: Instant, msg: impl std::fmt::Display) {
    println!("[{:>6.2}s] {msg}", t0.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
}

/// The agent binaries beside this program; built first when run from `cargo run`.
fn agent_bins() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this program")?;
    let dir = exe.parent().context("no parent directory")?.to_path_buf();
    let present = || {
        ["agent-gpu", "agent-cpu"]
            .iter()
            .all(|b| dir.join(b).exists())
    };
    if !present()
        && let Some(cargo) = std::env::var_os("CARGO")
    {
        println!("building agent-gpu and agent-cpu (first run only) ...");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", "agent-gpu", "--bin", "agent-cpu"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        // `cargo run` gave this process the package's CARGO_PKG_*, CARGO_MANIFEST_* and OUT_DIR.
        // ring's build script declares `rerun-if-env-changed` on several of them, so a nested
        // cargo that inherits them reruns it and rebuilds ring and everything above it (rustls,
        // reqwest, tonic, this crate) twice: once here, and once more in the next plain build.
        // Without them this build only compiles and links the two agents.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_") || k.starts_with("CARGO_MANIFEST_") || k == "OUT_DIR" {
                cmd.env_remove(&key);
            }
        }
        let st = cmd.status().context("running cargo build")?;
        if !st.success() {
            bail!("building the agents failed");
        }
    }
    if !present() {
        bail!(
            "agent-gpu and agent-cpu are not beside {} (build them: cargo build --release)",
            exe.display()
        );
    }
    Ok(dir)
}

fn spawn_agent(
    bins: &Path,
    role: &str,
    dir: &Path,
    coordinator: &str,
    token: &str,
) -> anyhow::Result<Child> {
    let ws = dir.join(format!("{role}-0/workspace"));
    let state = dir.join(format!("{role}-0/state"));
    std::fs::create_dir_all(&ws)?;
    std::fs::create_dir_all(&state)?;
    let log = std::fs::File::create(dir.join(format!("{role}-0/agent.log")))?;
    Command::new(bins.join(format!("agent-{role}")))
        .arg("--workspace")
        .arg(&ws)
        .arg("--state-dir")
        .arg(&state)
        .args(["--coordinator", coordinator, "--listen", "127.0.0.1:0"])
        .args(["--machine", &format!("demo-{role}-0")])
        .env("STANDBY_JOIN_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting agent-{role}"))
}

async fn pair(c: &mut AdminClient<tonic::transport::Channel>) -> anyhow::Result<Option<PairView>> {
    let ps = c
        .list_pairs(ListPairsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    Ok(ps.pairs.into_iter().find(|p| p.pair == PAIR))
}

/// Waits until `f` holds for the pair, or fails with `what`.
async fn wait_for(
    c: &mut AdminClient<tonic::transport::Channel>,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&PairView) -> bool,
) -> anyhow::Result<PairView> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(p) = pair(c).await?
            && f(&p)
        {
            return Ok(p);
        }
        if Instant::now() > deadline {
            let now = pair(c).await?;
            bail!(
                "timed out after {} s waiting for {what} (pair: {})",
                limit.as_secs(),
                now.map_or("absent".into(), |p| format!(
                    "{} at epoch {}: {}",
                    p.state(),
                    p.epoch,
                    p.reason
                ))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every regular file of a tree by relative path: its size and blake3.
type Tree = BTreeMap<String, (u64, blake3::Hash)>;

/// blake3 of every regular file under `root`, by relative path.
fn tree(root: &Path) -> anyhow::Result<Tree> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let mut h = blake3::Hasher::new();
                h.update_mmap(&p)
                    .with_context(|| format!("hashing {}", p.display()))?;
                let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(rel, (e.metadata()?.len(), h.finalize()));
            }
        }
    }
    Ok(out)
}

/// One digest over a tree: every path with its size and blake3.
fn digest(t: &Tree) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for (p, (n, f)) in t {
        h.update(p.as_bytes());
        h.update(&[0]);
        h.update(&n.to_le_bytes());
        h.update(f.as_bytes());
    }
    h.finalize()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Writes the workload: source files, a dataset and a checkpoint that grows in steps.
fn workload(ws: &Path, dataset_mib: u64, t0: Instant) -> anyhow::Result<()> {
    std::fs::create_dir_all(ws.join("code"))?;
    for i in 0..200 {
        std::fs::write(
            ws.join(format!("code/module_{i:03}.py")),
            format!("# module {i}\ndef step_{i}(x):\n    return x * {i} + 1\n").repeat(20),
        )?;
    }
    std::fs::create_dir_all(ws.join("data"))?;
    let mut seed = blake3::Hasher::new_derive_key("standby demo dataset");
    seed.update(&std::process::id().to_le_bytes());
    let mut xof = seed.finalize_xof();
    let mut f = std::fs::File::create(ws.join("data/train.bin"))?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..dataset_mib {
        xof.fill(&mut buf);
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    say(
        t0,
        format!("workload: 200 source files, data/train.bin ({dataset_mib} MiB)"),
    );
    std::fs::create_dir_all(ws.join("ckpt"))?;
    let mut ck = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ws.join("ckpt/model.pt"))?;
    for step in 1..=8 {
        xof.fill(&mut buf);
        for _ in 0..2 {
            ck.write_all(&buf)?;
        }
        ck.flush()?;
        std::fs::write(ws.join("ckpt/latest"), format!("step {}\n", step * 100))?;
        std::thread::sleep(Duration::from_millis(150));
    }
    say(
        t0,
        "workload: ckpt/model.pt grew to 16 MiB in 8 steps while replicating",
    );
    Ok(())
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let bins = agent_bins()?;
    let t0 = Instant::now();
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("standby-demo-{}", std::process::id())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} is not empty", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut rig = Rig {
        dir: dir.clone(),
        keep: a.keep,
        children: Vec::new(),
        shutdown: CancellationToken::new(),
    };
    let r = rt.block_on(story(&a, &bins, &mut rig, t0));
    drop(rig);
    r
}

/// The story, act by act; each act says what it did as it happens.
async fn story(a: &DemoArgs, bins: &Path, rig: &mut Rig, t0: Instant) -> anyhow::Result<()> {
    let mut demo = Demo::set_up(bins, rig, t0).await?;
    demo.join_pair(rig).await?;
    let before = demo.replicate(a.dataset_mib).await?;
    let timeline = demo.follow_transitions().await?;
    let killed = demo.kill_gpu(rig)?;
    demo.fail_over().await?;
    let done = demo.recover(killed.at).await?;
    let recovered = killed.at.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    timeline.follower.abort();
    let new_gpu = done
        .gpu
        .as_ref()
        .map(|m| m.machine.clone())
        .unwrap_or_default();
    let check = demo.verify(&before, &new_gpu)?;
    let steps = timeline.steps.lock().expect("steps").clone();
    print_timeline(&steps, killed.unix_ms, recovered, &new_gpu, done.epoch);
    check.print(&before, &new_gpu)?;
    println!();
    println!(
        "demo passed: recovered {:.1} s after the kill, nothing lost",
        recovered.as_secs_f64()
    );
    Ok(())
}

/// What the acts share: the demo's directory and clock, the agent binaries, the coordinator's
/// address and an admin connection to it.
struct Demo {
    dir: PathBuf,
    bins: PathBuf,
    t0: Instant,
    addr: String,
    admin: AdminClient<tonic::transport::Channel>,
}

/// The transitions of the pair, collected while the story goes on.
struct Timeline {
    steps: Arc<Mutex<Vec<Step>>>,
    follower: tokio::task::JoinHandle<()>,
}

/// When the GPU agent was killed (the timeline's zero).
struct Killed {
    at: Instant,
    unix_ms: u64,
}

/// What is written on the CPU while it is the primary, and must reach the new GPU.
const FAILOVER_NOTE: &str = "written on the CPU standby while it was the primary\n";
const FAILOVER_FILE: &str = "ckpt/written-during-failover.txt";

impl Demo {
    fn say(&self, msg: impl std::fmt::Display) {
        say(self.t0, msg)
    }

    fn gpu_ws(&self) -> PathBuf {
        self.dir.join("gpu-0/workspace")
    }

    fn cpu_ws(&self) -> PathBuf {
        self.dir.join("cpu-0/workspace")
    }

    /// Act 1: a CA, a coordinator with the `local` provider on loopback, and an admin
    /// connection to it.
    async fn set_up(bins: &Path, rig: &Rig, t0: Instant) -> anyhow::Result<Demo> {
        let dir = rig.dir.clone();
        say(t0, format!("directory {}", dir.display()));
        super::init_quiet(&dir, &[])?;
        let timing = Timing::default();
        let addr = start_coordinator(&dir, bins, timing, rig.shutdown.clone()).await?;
        say(
            t0,
            format!(
                "coordinator on {addr} (mTLS; heartbeat {} ms, failover after {} ms of silence the CPU confirms)",
                timing.heartbeat.as_millis(),
                timing.failover_after.as_millis()
            ),
        );
        let m = TlsMaterial::load(&dir.join("admin"))?;
        let ch = tls::connect(
            &addr,
            m.client_config(Expect::Exactly(Identity::Coordinator))?,
        )
        .await?;
        Ok(Demo {
            dir,
            bins: bins.to_path_buf(),
            t0,
            addr,
            admin: AdminClient::new(ch),
        })
    }

    /// Act 2: both agents join with tokens and the pair starts syncing.
    async fn join_pair(&mut self, rig: &mut Rig) -> anyhow::Result<()> {
        let ttl = Duration::from_secs(600);
        let cpu_token = crate::control::service::mint_token(&self.dir, PAIR, Role::Cpu, None, ttl)?;
        let gpu_token = crate::control::service::mint_token(&self.dir, PAIR, Role::Gpu, None, ttl)?;
        rig.children.push(spawn_agent(
            &self.bins, "cpu", &self.dir, &self.addr, &cpu_token,
        )?);
        rig.children.push(spawn_agent(
            &self.bins, "gpu", &self.dir, &self.addr, &gpu_token,
        )?);
        let p = wait_for(
            &mut self.admin,
            Duration::from_secs(30),
            "the pair to sync",
            |p| p.state() == PairState::Syncing,
        )
        .await?;
        self.say(format!(
            "pair {PAIR} Syncing at epoch {}: GPU agent demo-gpu-0, CPU standby demo-cpu-0",
            p.epoch
        ));
        Ok(())
    }

    /// Act 3, healthy replication: the workload is written and flushed, and the CPU replica
    /// equals the GPU workspace. Returns the flushed tree.
    async fn replicate(&self, dataset_mib: u64) -> anyhow::Result<Tree> {
        {
            let (ws, t0) = (self.gpu_ws(), self.t0);
            tokio::task::spawn_blocking(move || workload(&ws, dataset_mib, t0)).await??;
        }
        let flushed = Instant::now();
        let out = Command::new(self.bins.join("agent-gpu"))
            .args(["flush", "--state-dir"])
            .arg(self.dir.join("gpu-0/state"))
            .args(["--timeout", "60s"])
            .output()?;
        if !out.status.success() {
            bail!(
                "agent-gpu flush failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let before = tree(&self.gpu_ws())?;
        let replica = tree(&self.cpu_ws())?;
        if before != replica {
            bail!("after the flush the CPU replica differs from the GPU workspace");
        }
        self.say(format!(
            "flushed in {} ms: {} files, {} durable on the CPU standby (blake3 {})",
            flushed.elapsed().as_millis(),
            before.len(),
            mib(before.values().map(|v| v.0).sum()),
            &digest(&before).to_hex()[..16]
        ));
        Ok(before)
    }

    /// Follows the pair's transitions from now on, printing each as it comes.
    async fn follow_transitions(&self) -> anyhow::Result<Timeline> {
        let steps: Arc<Mutex<Vec<Step>>> = Arc::default();
        let mut events = self
            .admin
            .clone()
            .events(EventsRequest {
                follow: true,
                heartbeats: false,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let (seen, t0) = (steps.clone(), self.t0);
        let since = crate::host::unix_ms_now();
        let follower = tokio::spawn(async move {
            while let Ok(Some(e)) = events.message().await {
                // The stream starts with history: only what happens from now on counts.
                if e.pair != PAIR || e.kind() != EventKind::Transition || e.unix_ms < since {
                    continue;
                }
                say(
                    t0,
                    format!("{} -> {}: {}", e.from_state(), e.to_state(), e.message),
                );
                seen.lock().expect("steps").push(Step {
                    unix_ms: e.unix_ms,
                    to: e.to_state().to_string(),
                    message: e.message.clone(),
                });
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Timeline { steps, follower })
    }

    /// Act 4, the failure: SIGKILL to the GPU agent.
    fn kill_gpu(&self, rig: &mut Rig) -> anyhow::Result<Killed> {
        let gpu = &mut rig.children[1];
        let killed = Killed {
            at: Instant::now(),
            unix_ms: crate::host::unix_ms_now(),
        };
        gpu.kill().context("killing the GPU agent")?;
        let _ = gpu.wait();
        self.say("SIGKILL to the GPU agent (demo-gpu-0): the GPU machine is gone");
        Ok(killed)
    }

    /// Act 5, failover: the CPU becomes the primary, and work goes on there (it must survive
    /// the way back).
    async fn fail_over(&mut self) -> anyhow::Result<()> {
        wait_for(&mut self.admin, Duration::from_secs(30), "failover", |p| {
            p.primary() == proto::Role::Cpu && p.epoch >= 2
        })
        .await?;
        std::fs::write(self.cpu_ws().join(FAILOVER_FILE), FAILOVER_NOTE)?;
        self.say("wrote ckpt/written-during-failover.txt on the CPU (now primary)");
        Ok(())
    }

    /// Act 6, provisioning, restore and cutover: waits until a new GPU is the primary again,
    /// showing the restore's progress in quarters.
    async fn recover(&mut self, killed: Instant) -> anyhow::Result<PairView> {
        let mut last_pct = 0;
        loop {
            let p = pair(&mut self.admin).await?.context("the pair vanished")?;
            if p.state() == PairState::Syncing && p.epoch >= 3 && p.primary() == proto::Role::Gpu {
                return Ok(p);
            }
            if p.state() == PairState::Restoring && p.restore_total_bytes > 0 {
                let pct = (p.restore_done_bytes * 100 / p.restore_total_bytes).min(100);
                if pct >= last_pct + 25 {
                    last_pct = pct - pct % 25;
                    self.say(format!(
                        "restore {pct:>3}%: {} of {}",
                        mib(p.restore_done_bytes),
                        mib(p.restore_total_bytes)
                    ));
                }
            }
            if killed.elapsed() > Duration::from_secs(150) {
                bail!(
                    "not recovered within 150 s: {} at epoch {} ({})",
                    p.state(),
                    p.epoch,
                    p.reason
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Act 7, verification: the new GPU holds exactly the CPU's replica, which holds
    /// everything flushed before the kill plus what was written on the CPU meanwhile.
    fn verify(&self, before: &Tree, new_gpu: &str) -> anyhow::Result<Check> {
        let new_ws = self.dir.join("machines").join(new_gpu).join("workspace");
        if !new_ws.is_dir() {
            bail!(
                "the new GPU machine {new_gpu:?} has no workspace under {}",
                self.dir.display()
            );
        }
        let cpu_now = tree(&self.cpu_ws())?;
        let gpu_now = tree(&new_ws)?;
        let lost = before
            .iter()
            .filter(|(p, v)| gpu_now.get(*p) != Some(v))
            .map(|(p, _)| p.clone())
            .collect();
        let note_kept =
            std::fs::read_to_string(new_ws.join(FAILOVER_FILE)).is_ok_and(|s| s == FAILOVER_NOTE);
        Ok(Check {
            cpu_now,
            gpu_now,
            lost,
            note_kept,
        })
    }
}

/// Starts the coordinator in this process; its address once it listens.
async fn start_coordinator(
    dir: &Path,
    bins: &Path,
    timing: Timing,
    shutdown: CancellationToken,
) -> anyhow::Result<String> {
    let opts = crate::control::service::ServeOptions {
        ha: None,
        dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
        status_listen: None,
        timing,
        cert_lifetime: Duration::from_secs(86_400),
        renew_grace: Duration::from_secs(86_400),
        provider: "local".into(),
        cpu_provider: String::new(),
        policy: Policy {
            auto_recover: true,
            boot_timeout: Duration::from_secs(60),
            backoff_base: Duration::from_secs(1),
            ..Policy::default()
        },
        provision: crate::control::provider::ProvisionConfig::default(),
        advertise: String::new(),
        local_bin_dir: Some(bins.to_path_buf()),
        local_agent_args: Vec::new(),
        vastai: Default::default(),
        gcp: Default::default(),
        command: Default::default(),
        reflection: false,
        public_health: false,
        backup: None,
        notify: Vec::new(),
    };
    let server = tokio::spawn(crate::control::service::serve(opts, shutdown));
    let addr_file = dir.join("serve.addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            return Ok(a);
        }
        if server.is_finished() {
            match server.await {
                Ok(Err(e)) => return Err(e.context("the coordinator stopped")),
                _ => bail!("the coordinator stopped"),
            }
        }
        if Instant::now() > deadline {
            bail!("the coordinator did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The timeline table, from the SIGKILL (t = 0) to the GPU primary again.
fn print_timeline(steps: &[Step], killed_ms: u64, recovered: Duration, new_gpu: &str, epoch: u64) {
    println!();
    println!("Timeline (from the SIGKILL, t = 0)");
    println!(
        "{:<14} {:>9} {:>10}  what happened",
        "phase", "start", "duration"
    );
    for (phase, start, dur, what) in &timeline_rows(steps, killed_ms) {
        let what: String = what.chars().take(110).collect();
        println!(
            "{:<14} {:>8.2}s {:>9.2}s  {}",
            phase,
            start.as_secs_f64(),
            dur.as_secs_f64(),
            what
        );
    }
    println!(
        "{:<14} {:>8.2}s {:>10}  {}",
        "Recovered",
        recovered.as_secs_f64(),
        "",
        format_args!("{new_gpu} is the primary again at epoch {epoch}")
    );
}

/// (phase, start, duration, what happened): detection, then each transition until the next.
fn timeline_rows(steps: &[Step], killed_ms: u64) -> Vec<(String, Duration, Duration, String)> {
    let ms = |u: u64| Duration::from_millis(u.saturating_sub(killed_ms));
    let mut rows: Vec<(String, Duration, Duration, String)> = Vec::new();
    let first = steps.first().map_or(Duration::ZERO, |s| ms(s.unix_ms));
    rows.push((
        "Detection".into(),
        Duration::ZERO,
        first,
        "heartbeats stop; the CPU agent cannot reach the GPU either".into(),
    ));
    for (i, s) in steps.iter().enumerate() {
        let start = ms(s.unix_ms);
        let end = steps.get(i + 1).map_or(start, |n| ms(n.unix_ms));
        rows.push((
            s.to.clone(),
            start,
            end.saturating_sub(start),
            s.message.clone(),
        ));
    }
    rows
}

/// What verification found.
struct Check {
    cpu_now: Tree,
    gpu_now: Tree,
    /// Flushed files missing or changed on the new GPU.
    lost: Vec<String>,
    /// Whether the file written on the CPU during the failover reached the new GPU.
    note_kept: bool,
}

impl Check {
    /// Prints the digests of the three trees and the verdict; an error when anything is off.
    fn print(&self, before: &Tree, new_gpu: &str) -> anyhow::Result<()> {
        println!();
        println!("Verification (blake3 of every file)");
        let line = |who: &str, t: &Tree| {
            println!(
                "  {who:<34} {:>5} files {:>10}  {}",
                t.len(),
                mib(t.values().map(|v| v.0).sum()),
                digest(t).to_hex()
            );
        };
        line("flushed on the old GPU before kill", before);
        line("CPU standby (replica)", &self.cpu_now);
        line(&format!("new GPU ({new_gpu})"), &self.gpu_now);
        let same = self.cpu_now == self.gpu_now;
        println!(
            "  new GPU == CPU replica: {}; flushed files kept: {}; file written during failover: {}",
            if same { "identical" } else { "DIFFERENT" },
            if self.lost.is_empty() {
                "all".to_string()
            } else {
                format!("{} missing or changed", self.lost.len())
            },
            if self.note_kept { "present" } else { "MISSING" }
        );
        if !same {
            bail!("the new GPU's workspace differs from the CPU replica");
        }
        if !self.lost.is_empty() {
            bail!("flushed files lost or changed: {:?}", self.lost);
        }
        if !self.note_kept {
            bail!("the file written on the CPU during the failover is not on the new GPU");
        }
        Ok(())
    }
}
