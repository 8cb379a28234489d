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

use anyhow::{Context, bail};
use standby::control::failover::{Policy, Timing};
use standby::proto::admin_client::AdminClient;
use standby::proto::{EventsRequest, ListPairsRequest, PairView};
use standby::trust::identity::{Identity, Role};
use standby::trust::tls::{self, Expect, TlsMaterial};
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
        standby::control::provider::local::Local::stop_all(&self.dir.join("machines"));
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
                    p.state, p.epoch, p.reason
                ))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// blake3 of every regular file under `root`, by relative path.
fn tree(root: &Path) -> anyhow::Result<BTreeMap<String, (u64, blake3::Hash)>> {
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
fn digest(t: &BTreeMap<String, (u64, blake3::Hash)>) -> blake3::Hash {
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

async fn story(a: &DemoArgs, bins: &Path, rig: &mut Rig, t0: Instant) -> anyhow::Result<()> {
    let dir = rig.dir.clone();
    say(t0, format!("directory {}", dir.display()));
    crate::init_quiet(&dir)?;
    let timing = Timing::default();
    let opts = standby::control::service::ServeOptions {
        dir: dir.clone(),
        listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
        timing,
        cert_days: 1,
        provider: "local".into(),
        cpu_provider: String::new(),
        policy: Policy {
            auto_recover: true,
            boot_timeout: Duration::from_secs(60),
            backoff_base: Duration::from_secs(1),
            ..Policy::default()
        },
        provision: standby::control::provider::ProvisionConfig::default(),
        advertise: String::new(),
        local_bin_dir: Some(bins.to_path_buf()),
        local_agent_args: Vec::new(),
        vastai: Default::default(),
        gcp: Default::default(),
        command: Default::default(),
    };
    let shutdown = rig.shutdown.clone();
    let server = tokio::spawn(standby::control::service::serve(opts, shutdown));
    let addr_file = dir.join("serve.addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            break a;
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
    };
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
    let mut admin = AdminClient::new(ch);

    let ttl = Duration::from_secs(600);
    let cpu_token = standby::control::service::mint_token(&dir, PAIR, Role::Cpu, ttl)?;
    let gpu_token = standby::control::service::mint_token(&dir, PAIR, Role::Gpu, ttl)?;
    rig.children
        .push(spawn_agent(bins, "cpu", &dir, &addr, &cpu_token)?);
    rig.children
        .push(spawn_agent(bins, "gpu", &dir, &addr, &gpu_token)?);
    let p = wait_for(
        &mut admin,
        Duration::from_secs(30),
        "the pair to sync",
        |p| p.state == "Syncing",
    )
    .await?;
    say(
        t0,
        format!(
            "pair {PAIR} Syncing at epoch {}: GPU agent demo-gpu-0, CPU standby demo-cpu-0",
            p.epoch
        ),
    );

    let gpu_ws = dir.join("gpu-0/workspace");
    let cpu_ws = dir.join("cpu-0/workspace");
    {
        let (ws, n) = (gpu_ws.clone(), a.dataset_mib);
        tokio::task::spawn_blocking(move || workload(&ws, n, t0)).await??;
    }
    let flushed = Instant::now();
    let out = Command::new(bins.join("agent-gpu"))
        .args(["flush", "--state-dir"])
        .arg(dir.join("gpu-0/state"))
        .args(["--timeout", "60s"])
        .output()?;
    if !out.status.success() {
        bail!(
            "agent-gpu flush failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let before = tree(&gpu_ws)?;
    let replica = tree(&cpu_ws)?;
    if before != replica {
        bail!("after the flush the CPU replica differs from the GPU workspace");
    }
    say(
        t0,
        format!(
            "flushed in {} ms: {} files, {} durable on the CPU standby (blake3 {})",
            flushed.elapsed().as_millis(),
            before.len(),
            mib(before.values().map(|v| v.0).sum()),
            &digest(&before).to_hex()[..16]
        ),
    );

    // Transitions as the coordinator reports them.
    let steps: Arc<Mutex<Vec<Step>>> = Arc::default();
    let mut events = admin
        .clone()
        .events(EventsRequest {
            follow: true,
            heartbeats: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let seen = steps.clone();
    let since = standby::host::unix_ms_now();
    let follower = tokio::spawn(async move {
        while let Ok(Some(e)) = events.message().await {
            // The stream starts with history: only what happens from now on counts.
            if e.pair != PAIR || e.kind != "transition" || e.unix_ms < since {
                continue;
            }
            say(
                t0,
                format!("{} -> {}: {}", e.from_state, e.to_state, e.message),
            );
            seen.lock().expect("steps").push(Step {
                unix_ms: e.unix_ms,
                to: e.to_state.clone(),
                message: e.message.clone(),
            });
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let gpu = &mut rig.children[1];
    let killed = Instant::now();
    let killed_ms = standby::host::unix_ms_now();
    gpu.kill().context("killing the GPU agent")?;
    let _ = gpu.wait();
    say(
        t0,
        "SIGKILL to the GPU agent (demo-gpu-0): the GPU machine is gone",
    );

    wait_for(&mut admin, Duration::from_secs(30), "failover", |p| {
        p.primary == "cpu" && p.epoch >= 2
    })
    .await?;
    // The CPU is the primary now: work goes on there, and must survive the way back.
    let note = "written on the CPU standby while it was the primary\n";
    std::fs::write(cpu_ws.join("ckpt/written-during-failover.txt"), note)?;
    say(
        t0,
        "wrote ckpt/written-during-failover.txt on the CPU (now primary)",
    );

    let mut last_pct = 0;
    let done = loop {
        let p = pair(&mut admin).await?.context("the pair vanished")?;
        if p.state == "Syncing" && p.epoch >= 3 && p.primary == "gpu" {
            break p;
        }
        if p.state == "Restoring" && p.restore_total_bytes > 0 {
            let pct = (p.restore_done_bytes * 100 / p.restore_total_bytes).min(100);
            if pct >= last_pct + 25 {
                last_pct = pct - pct % 25;
                say(
                    t0,
                    format!(
                        "restore {pct:>3}%: {} of {}",
                        mib(p.restore_done_bytes),
                        mib(p.restore_total_bytes)
                    ),
                );
            }
        }
        if killed.elapsed() > Duration::from_secs(150) {
            bail!(
                "not recovered within 150 s: {} at epoch {} ({})",
                p.state,
                p.epoch,
                p.reason
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recovered = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    follower.abort();
    let new_gpu = done
        .gpu
        .as_ref()
        .map(|m| m.machine.clone())
        .unwrap_or_default();
    let new_ws = dir.join("machines").join(&new_gpu).join("workspace");
    if !new_ws.is_dir() {
        bail!(
            "the new GPU machine {new_gpu:?} has no workspace under {}",
            dir.display()
        );
    }

    // Verification: the new GPU holds exactly the CPU's replica, which holds everything
    // flushed before the kill plus what was written on the CPU meanwhile.
    let cpu_now = tree(&cpu_ws)?;
    let gpu_now = tree(&new_ws)?;
    let lost: Vec<&String> = before
        .iter()
        .filter(|(p, v)| gpu_now.get(*p) != Some(v))
        .map(|(p, _)| p)
        .collect();
    let ok_note = std::fs::read_to_string(new_ws.join("ckpt/written-during-failover.txt"))
        .is_ok_and(|s| s == note);

    // The timeline.
    let steps = steps.lock().expect("steps").clone();
    println!();
    println!("Timeline (from the SIGKILL, t = 0)");
    println!(
        "{:<14} {:>9} {:>10}  what happened",
        "phase", "start", "duration"
    );
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
    for (phase, start, dur, what) in &rows {
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
        format_args!("{new_gpu} is the primary again at epoch {}", done.epoch)
    );
    println!();
    println!("Verification (blake3 of every file)");
    let line = |who: &str, t: &BTreeMap<String, (u64, blake3::Hash)>| {
        println!(
            "  {who:<34} {:>5} files {:>10}  {}",
            t.len(),
            mib(t.values().map(|v| v.0).sum()),
            digest(t).to_hex()
        );
    };
    line("flushed on the old GPU before kill", &before);
    line("CPU standby (replica)", &cpu_now);
    line(&format!("new GPU ({new_gpu})"), &gpu_now);
    let same = cpu_now == gpu_now;
    println!(
        "  new GPU == CPU replica: {}; flushed files kept: {}; file written during failover: {}",
        if same { "identical" } else { "DIFFERENT" },
        if lost.is_empty() {
            "all".to_string()
        } else {
            format!("{} missing or changed", lost.len())
        },
        if ok_note { "present" } else { "MISSING" }
    );
    if !same {
        bail!("the new GPU's workspace differs from the CPU replica");
    }
    if !lost.is_empty() {
        bail!("flushed files lost or changed: {:?}", lost);
    }
    if !ok_note {
        bail!("the file written on the CPU during the failover is not on the new GPU");
    }
    println!();
    println!(
        "demo passed: recovered {:.1} s after the kill, nothing lost",
        recovered.as_secs_f64()
    );
    Ok(())
}
