//! Benchmark: issue 15's edit mix, and an insertion alone, after a full sync; Standby's agents
//! against `rsync -a --delete -e ssh` (and `--fsync`) on the same data, in the same run.
//!
//! `cargo bench --bench edits` (release build). The tree: 3 checkpoints of
//! `STANDBY_BENCH_BIG_MIB` (256) MiB and `STANDBY_BENCH_SMALL` (20,000) small files. After a full
//! sync by each tool, `STANDBY_BENCH_RUNS` (3) rounds of each case, every tool syncing each round:
//! - **edit mix**: 16 scattered 64 KiB overwrites in `big-0`, a 1 MiB append to `big-1`, 100 bytes
//!   inserted near the start of `big-2` (in place: the rest of the file shifts), 20 small files
//!   deleted, 100 appended to, 50 chmodded, one renamed, the `models` symlink retargeted;
//! - **insertion**: 100 bytes inserted at offset 0 of `big-2`, nothing else.
//!
//! Per tool and case, the median over the rounds of: wall time (and ratio to rsync), bytes on the
//! wire, the sender's own count of bytes sent, and **bytes written on the receiver**. Where the
//! benchmark runs as root, each side gets its own fresh ext4 image (loop device) and its own
//! network namespace, so:
//! - bytes written = sectors written by the receiving filesystem's loop device
//!   (`/sys/block/loopN/stat`) between a `sync -f` before and after the run: data, metadata and
//!   journal, the same meter for both tools. agent-cpu's state directory (commit journal,
//!   history snapshots) is on a third image and counted apart; agent-cpu's own `write_bytes`
//!   (`/proc/<pid>/io`: replica, stage, journal and history alike) is printed as a cross-check;
//! - bytes on the wire = loopback bytes of the benchmark's network namespace: both directions,
//!   TCP/IP headers and TLS or SSH included (nothing else runs there).
//!
//! After every round each replica is compared with the source (content, modes, links), so a tool
//! that skipped work is caught. These are figures, not tests: nothing is asserted about time.

#[path = "../tests/common/mod.rs"]
mod common;
mod rig;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rand::RngExt;
use rig::{FreshFs, Sshd, env_usize, median, settle};
use standby::trust::identity::Role;

/// Where each side's data lives, and the images that hold it (None: not root, plain directories).
struct Places {
    _tmp: tempfile::TempDir,
    src_root: PathBuf,
    rx_root: PathBuf,
    state_root: PathBuf,
    rx: Option<FreshFs>,
    state: Option<FreshFs>,
    _src: Option<FreshFs>,
}

impl Places {
    fn new() -> Places {
        let tmp = tempfile::tempdir().unwrap();
        let src = FreshFs::mount();
        let rx = FreshFs::mount_quiet("12G", 16384);
        let state = FreshFs::mount_quiet("16G", 1 << 20);
        let dir = |f: &Option<FreshFs>, name: &str| match f {
            Some(f) => f.path().to_path_buf(),
            None => {
                let d = tmp.path().join(name);
                fs::create_dir_all(&d).unwrap();
                d
            }
        };
        Places {
            src_root: dir(&src, "src-side"),
            rx_root: dir(&rx, "receiving-side"),
            state_root: dir(&state, "cpu-state"),
            _tmp: tmp,
            rx,
            state,
            _src: src,
        }
    }

    /// Bytes written so far by the receiving filesystem and by agent-cpu's state filesystem.
    fn written(&self) -> (Option<u64>, Option<u64>) {
        let w = |f: &Option<FreshFs>| {
            f.as_ref().map(|f| {
                f.sync();
                f.written()
            })
        };
        (w(&self.rx), w(&self.state))
    }
}

/// One tool's figures for one round.
#[derive(Clone, Copy, Default)]
struct Run {
    secs: f64,
    wire: Option<u64>,
    sent: u64,
    written: Option<u64>,
    state_written: Option<u64>,
    process_written: Option<u64>,
}

/// Inserts `data` at `at` in place: same file, the rest of it moves up by `data.len()`.
fn insert(p: &Path, at: u64, data: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut tail = Vec::new();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_to_end(&mut tail).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(data).unwrap();
    f.write_all(&tail).unwrap();
}

/// The small files of the tree (regular files outside `data/big-*`), in a stable order.
fn small_files(root: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(&e.path(), out);
            } else if t.is_file() && !e.file_name().to_string_lossy().starts_with("big-") {
                out.push(e.path());
            }
        }
    }
    let mut v = Vec::new();
    walk(root, &mut v);
    v.sort();
    v
}

/// Issue 15's edit mix (see the module doc); `round` keeps names of successive rounds apart.
fn edit_mix(src: &Path, rng: &mut rand::rngs::StdRng, round: usize) {
    let big = |k: usize| src.join(format!("data/big-{k}.bin"));
    let len = fs::metadata(big(0)).unwrap().len();
    let mut f = fs::OpenOptions::new().write(true).open(big(0)).unwrap();
    for _ in 0..16 {
        f.seek(SeekFrom::Start(rng.random_range(0..len - (64 << 10))))
            .unwrap();
        f.write_all(&bytes(rng, 64 << 10)).unwrap();
    }
    drop(f);
    fs::OpenOptions::new()
        .append(true)
        .open(big(1))
        .unwrap()
        .write_all(&bytes(rng, 1 << 20))
        .unwrap();
    let at = rng.random_range(4096..65536);
    insert(&big(2), at, &bytes(rng, 100));

    // Small files: disjoint picks spread over the tree.
    let mut small = small_files(src);
    for i in (1..small.len()).rev() {
        small.swap(i, rng.random_range(0..=i));
    }
    let (deleted, rest) = small.split_at(20);
    let (appended, rest) = rest.split_at(100);
    let (chmodded, rest) = rest.split_at(50);
    for p in deleted {
        fs::remove_file(p).unwrap();
    }
    for p in appended {
        let n = rng.random_range(50..2000);
        let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(&text(rng, n)).unwrap();
    }
    for p in chmodded {
        let mode = fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let next = if mode == 0o600 { 0o644 } else { 0o600 };
        fs::set_permissions(p, fs::Permissions::from_mode(next)).unwrap();
    }
    let from = &rest[0];
    let to = from.with_file_name(format!("renamed-{round}"));
    fs::rename(from, to).unwrap();
    let link = src.join("models");
    let target = if round.is_multiple_of(2) {
        "src"
    } else {
        "src/models"
    };
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(target, &link).unwrap();
}

/// The incremental cases, each run for several rounds.
#[derive(Clone, Copy)]
enum Case {
    Mix,
    Insertion,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Mix => "edit mix",
            Case::Insertion => "100 B inserted at 0",
        }
    }
}

/// The running agent-cpu and what `agent-gpu --once` needs to reach it.
struct Ours {
    cpu: Cpu,
    src: PathBuf,
    gpu_state: PathBuf,
    gpu_tls: PathBuf,
}

impl Ours {
    fn snapshots(&self) -> usize {
        fs::read_dir(self.cpu.state.join("history/snapshots"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits (up to a minute) for the standby's history to record the generation just sent, so
    /// its writes are counted with this run and its CPU does not overlap the next tool's.
    fn wait_history(&self, before: usize) {
        if !wait_until(Duration::from_secs(60), || self.snapshots() > before) {
            println!("  (no new history snapshot within 60 s)");
        }
    }

    fn sync(&self, places: &Places, wire: bool) -> Run {
        settle();
        let pid = self.cpu.child.id();
        let (w0, s0) = places.written();
        let (p0, l0, h0) = (
            rig::process_write_bytes(pid),
            wire.then(rig::loopback_bytes),
            self.snapshots(),
        );
        let t0 = Instant::now();
        let r = once(&self.src, &self.gpu_state, &self.gpu_tls, &self.cpu.addr);
        let secs = t0.elapsed().as_secs_f64();
        let wire = l0.map(|l0| rig::loopback_bytes() - l0);
        self.wait_history(h0);
        let (w1, s1) = places.written();
        Run {
            secs,
            wire,
            sent: r["bytes_sent"].as_u64().unwrap(),
            written: w1.zip(w0).map(|(a, b)| a - b),
            state_written: s1.zip(s0).map(|(a, b)| a - b),
            process_written: Some(rig::process_write_bytes(pid) - p0),
        }
    }
}

fn rsync_run(s: &Sshd, src: &Path, dst: &Path, extra: &[&str], places: &Places, wire: bool) -> Run {
    settle();
    let (w0, _) = places.written();
    let l0 = wire.then(rig::loopback_bytes);
    let r = rig::rsync_stats(s, src, dst, extra);
    let wire = l0.map(|l0| rig::loopback_bytes() - l0);
    let (w1, _) = places.written();
    Run {
        secs: r.time.as_secs_f64(),
        wire,
        sent: r.sent,
        written: w1.zip(w0).map(|(a, b)| a - b),
        ..Run::default()
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.2} MiB", b as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "n/a".into())
}

fn show(tool: &str, r: &Run) {
    println!(
        "  {tool:<14} {:>7.2} s  wire {:>12}  sent {:>10.2} MiB  written {:>12}  state fs {:>12}  process {:>12}",
        r.secs,
        mib(r.wire),
        r.sent as f64 / (1 << 20) as f64,
        mib(r.written),
        mib(r.state_written),
        mib(r.process_written),
    );
}

/// The medians of each figure over the rounds (each figure on its own).
fn medians(runs: &[Run]) -> Run {
    let opt = |f: fn(&Run) -> Option<u64>| {
        let v: Option<Vec<u64>> = runs.iter().map(f).collect();
        v.map(|v| median(&v))
    };
    Run {
        secs: median(&runs.iter().map(|r| r.secs).collect::<Vec<_>>()),
        wire: opt(|r| r.wire),
        sent: median(&runs.iter().map(|r| r.sent).collect::<Vec<_>>()),
        written: opt(|r| r.written),
        state_written: opt(|r| r.state_written),
        process_written: opt(|r| r.process_written),
    }
}

fn table(rows: &[(&str, [Run; 3])]) {
    println!();
    println!(
        "| case | tool | time | ours ÷ tool | bytes on the wire | sender's bytes sent | written on the receiver | agent-cpu state fs | agent-cpu write_bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (case, [ours, plain, fsync]) in rows {
        for (tool, r) in [
            ("standby", ours),
            ("rsync -a -e ssh", plain),
            ("rsync --fsync", fsync),
        ] {
            println!(
                "| {case} | {tool} | {:.2} s | {:.2} | {} | {:.2} MiB | {} | {} | {} |",
                r.secs,
                ours.secs / r.secs,
                mib(r.wire),
                r.sent as f64 / (1 << 20) as f64,
                mib(r.written),
                mib(r.state_written),
                mib(r.process_written),
            );
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let wire = rig::own_loopback();
    let big_mib = env_usize("STANDBY_BENCH_BIG_MIB", 256);
    let small = env_usize("STANDBY_BENCH_SMALL", 20_000);
    let runs = env_usize("STANDBY_BENCH_RUNS", 3).max(1);
    let places = Places::new();
    let mut rng = rng(15);
    let src = places.src_root.join("src");
    println!("generating 3 x {big_mib} MiB + {small} small files ...");
    make_tree(&src, &mut rng, small, &[big_mib << 20; 3]);
    let pki = Pki::new();
    let s = rig::sshd(&places.src_root.join("sshd"));
    let ours = Ours {
        cpu: Cpu::start(
            &places.rx_root.join("replica"),
            &places.state_root.join("cpu"),
            &pki.node("bench", Role::Cpu),
        ),
        src: src.clone(),
        gpu_state: places.src_root.join("gpu"),
        gpu_tls: pki.node("bench", Role::Gpu),
    };
    let dst_plain = places.rx_root.join("rsync-plain");
    let dst_fsync = places.rx_root.join("rsync-fsync");
    let round = |label: &str| -> [Run; 3] {
        let o = ours.sync(&places, wire);
        show(&format!("standby {label}"), &o);
        let p = rsync_run(&s, &src, &dst_plain, &[], &places, wire);
        show("rsync", &p);
        let f = rsync_run(&s, &src, &dst_fsync, &["--fsync"], &places, wire);
        show("rsync --fsync", &f);
        for d in [&ours.cpu.workspace, &dst_plain, &dst_fsync] {
            assert_same(&src, d);
        }
        [o, p, f]
    };

    println!("full sync:");
    let full = round("");
    let mut rows = vec![("full sync", full)];
    for case in [Case::Mix, Case::Insertion] {
        let mut each: [Vec<Run>; 3] = Default::default();
        for k in 0..runs {
            match case {
                Case::Mix => edit_mix(&src, &mut rng, k),
                Case::Insertion => insert(&src.join("data/big-2.bin"), 0, &bytes(&mut rng, 100)),
            }
            println!("{}, round {}:", case.name(), k + 1);
            for (all, r) in each.iter_mut().zip(round("")) {
                all.push(r);
            }
        }
        rows.push((case.name(), each.map(|v| medians(&v))));
    }
    drop(s.child);
    table(&rows);
    println!(
        "(medians of {runs} rounds; ours ÷ tool = standby's time / that tool's time, below 1 is faster. \
         Data: 3 x {big_mib} MiB + {small} small files.)"
    );
}
