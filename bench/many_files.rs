//! Benchmark: a workspace of many small files (issue 15's "100k files" figures), in one run:
//! - **first sync**: a continuous agent-gpu starts on a workspace of `STANDBY_BENCH_FILES`
//!   (100,000) small files (≈ 2 KiB each, 100 per directory) and its standby is empty; timed to
//!   the first `agent-gpu flush` that returns (everything durable on the standby), against
//!   `rsync -a -e ssh` (and `--fsync`, unless `STANDBY_BENCH_RSYNC_FSYNC=0`: it syncs each file
//!   on its own and takes minutes) of the same tree into an empty directory;
//! - **idle cost**: then nothing changes for `STANDBY_BENCH_IDLE_SECS` (60): each agent's CPU
//!   (share of one core, from /proc) and resident memory (VmRSS at the end, VmHWM the peak).
//!
//! `cargo bench --bench many_files` (release build). Prints a table with the ratio ours ÷ rsync.

#[path = "../tests/common/mod.rs"]
mod common;
mod rig;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use rand::RngExt;
use rig::{base_dir, continuous_gpu, env_usize, rsync, settle, sshd};
use standby::trust::identity::Role;

/// `n` files of 200 B – 4 KiB (text and random halves), 100 per directory, 20 directories per
/// parent: the shape of a dataset or a source tree, not one flat directory.
fn make_small_files(root: &Path, rng: &mut rand::rngs::StdRng, n: usize) -> u64 {
    let mut total = 0;
    for i in 0..n {
        let dir = root.join(format!("d{:03}/s{:03}", i / 2000, (i / 100) % 20));
        if i % 100 == 0 {
            fs::create_dir_all(&dir).unwrap();
        }
        let size = rng.random_range(200..4096);
        let data = if i % 2 == 0 {
            text(rng, size)
        } else {
            bytes(rng, size)
        };
        fs::write(dir.join(format!("f{i}.dat")), &data).unwrap();
        total += size as u64;
    }
    total
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

struct Idle {
    cpu_share: f64,
    rss_mib: f64,
    peak_mib: f64,
}

fn measure_idle(pids: [u32; 2], secs: u64) -> [Idle; 2] {
    let before = pids.map(cpu_seconds);
    std::thread::sleep(Duration::from_secs(secs));
    let mut i = 0;
    pids.map(|pid| {
        let used = cpu_seconds(pid) - before[i];
        i += 1;
        Idle {
            cpu_share: used / secs as f64,
            rss_mib: status_kib(pid, "VmRSS") as f64 / 1024.0,
            peak_mib: status_kib(pid, "VmHWM") as f64 / 1024.0,
        }
    })
}

fn main() {
    let n = env_usize("STANDBY_BENCH_FILES", 100_000);
    let idle_secs = env_usize("STANDBY_BENCH_IDLE_SECS", 60) as u64;
    let (_fs, base) = base_dir();
    let t = tempfile::tempdir_in(&base).unwrap();
    let src = t.path().join("src");
    let mut rng = rng(7);
    println!("generating {n} small files in {} ...", t.path().display());
    let total = make_small_files(&src, &mut rng, n);
    println!("  {:.1} MiB of content", total as f64 / (1 << 20) as f64);

    let pki = Pki::new();
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("bench", Role::Cpu),
    );
    settle();
    let (gpu, _gst, first) = continuous_gpu(
        t.path(),
        &src,
        &pki.node("bench", Role::Gpu),
        &cpu.addr,
        &[],
    );
    assert_same(&src, &cpu.workspace);
    println!("  standby first sync {:>8.2} s", first.as_secs_f64());

    // Idle now, while rsync has not yet touched the page cache: the agents are measured alone.
    std::thread::sleep(Duration::from_secs(5));
    println!("idle for {idle_secs} s ...");
    let [g, c] = measure_idle([gpu.0.id(), cpu.child.id()], idle_secs);
    println!();
    println!("| idle {idle_secs} s, {n} files | CPU (share of a core) | RSS | peak RSS |");
    println!("|---|---|---|---|");
    for (name, m) in [("agent-gpu", g), ("agent-cpu", c)] {
        println!(
            "| {name} | {:.2} % | {:.1} MiB | {:.1} MiB |",
            m.cpu_share * 100.0,
            m.rss_mib,
            m.peak_mib
        );
    }

    let s = sshd(&t.path().join("sshd"));
    settle();
    let (plain, plain_bytes) = rsync(&s, &src, &t.path().join("rsync-plain"), &[]);
    let fsync = (env_usize("STANDBY_BENCH_RSYNC_FSYNC", 1) != 0).then(|| {
        settle();
        rsync(&s, &src, &t.path().join("rsync-fsync"), &["--fsync"]).0
    });
    println!(
        "  rsync   first sync {:>8.2} s ({plain_bytes} bytes sent)",
        plain.as_secs_f64()
    );
    drop(s.child);

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!();
    println!(
        "| first sync of {n} files | standby | rsync -a -e ssh | ratio | rsync --fsync | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    let (fsync_time, fsync_ratio) = match fsync {
        Some(f) => (
            format!("{:.2} s", f.as_secs_f64()),
            format!("{:.2}", ratio(first, f)),
        ),
        None => ("not run".into(), "".into()),
    };
    println!(
        "| | {:.2} s | {:.2} s | {:.2} | {fsync_time} | {fsync_ratio} |",
        first.as_secs_f64(),
        plain.as_secs_f64(),
        ratio(first, plain),
    );
}
