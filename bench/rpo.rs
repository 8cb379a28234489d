//! Benchmark: how long a write takes to become durable on the standby under steady writes
//! (issue 15's "change → durable" RPO figure).
//!
//! `cargo bench --bench rpo` (release build). A continuous agent pair (agent-gpu watching, agent-cpu
//! receiving, mutual TLS on loopback, default settings; `STANDBY_BENCH_GPU_ARGS` adds flags to
//! agent-gpu, e.g. `--debounce 100ms`). After the first sync, a writer, for `STANDBY_BENCH_RPO_SECS`
//! (35) seconds: a new small file (1–4 KiB) every 100 ms, and the 8 MiB checkpoint `ckpt.bin`
//! rewritten in place (truncate and write, as `torch.save` does) every 2 s. Each write carries its
//! sequence number and wall-clock time in its first line.
//!
//! **Durable on the standby** is measured as: the file in agent-cpu's replica holds exactly the
//! content written (whole-content compare; for the checkpoint, its header line and then the blake3
//! of all 8 MiB). The receiver only puts content into the workspace after its commit point
//! (`src/replication/receive/commit.rs`: staged data fsynced, then the generation's record
//! appended to the catalog and fsynced, then applied), so content seen there is durable: a crash
//! from then on rolls the record forward. The replica is polled every 10 ms, so each figure is late
//! by up to 10 ms. A checkpoint overwritten before the standby ever held it is counted apart
//! ("superseded"): its data was never durable and the next one's delay stands for it.
//!
//! Prints p50 / p99 / max for the small files, the checkpoints and all writes. These are figures,
//! not tests: nothing is asserted about time.

#[path = "../tests/common/mod.rs"]
mod common;
mod rig;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use rand::RngExt;
use rig::{base_dir, continuous_gpu, env_usize};
use standby::trust::identity::Role;

const SMALL_EVERY: Duration = Duration::from_millis(100);
const CKPT_EVERY_TICKS: usize = 20; // 2 s
const CKPT_BYTES: usize = 8 << 20;
const HEADER: usize = 64;
const POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Small,
    Checkpoint,
}

/// One write and what became of it on the standby.
struct Write {
    kind: Kind,
    path: PathBuf,
    /// Small files: the whole content. Checkpoints: the header line (the rest is checked by hash).
    expect: Vec<u8>,
    hash: blake3::Hash,
    written: Instant,
    seen: Option<Duration>,
    superseded: bool,
}

/// A fixed-length first line: what, which, and the wall-clock time of the write.
fn header(what: &str, seq: usize) -> Vec<u8> {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut h = format!("{what} {seq} unix_ns {ns}").into_bytes();
    h.resize(HEADER - 1, b' ');
    h.push(b'\n');
    h
}

/// The writer: a small file every tick, the checkpoint every `CKPT_EVERY_TICKS` ticks.
fn writer(src: PathBuf, ticks: usize, log: Arc<Mutex<Vec<Write>>>) {
    let mut rng = rng(300);
    let start = Instant::now();
    for i in 0..ticks {
        if let Some(wait) = (start + SMALL_EVERY * i as u32).checked_duration_since(Instant::now())
        {
            std::thread::sleep(wait);
        }
        let path = PathBuf::from(format!("w/{i:05}.txt"));
        let mut data = header("small", i);
        let n = rng.random_range(1024..4096);
        data.extend(text(&mut rng, n));
        fs::write(src.join(&path), &data).unwrap();
        let w = Write {
            kind: Kind::Small,
            path,
            hash: blake3::hash(&data),
            expect: data,
            written: Instant::now(),
            seen: None,
            superseded: false,
        };
        log.lock().unwrap().push(w);
        if i % CKPT_EVERY_TICKS == CKPT_EVERY_TICKS - 1 {
            let h = header("ckpt", i / CKPT_EVERY_TICKS);
            let mut data = h.clone();
            data.extend(bytes(&mut rng, CKPT_BYTES - HEADER));
            fs::write(src.join("ckpt.bin"), &data).unwrap();
            let w = Write {
                kind: Kind::Checkpoint,
                path: PathBuf::from("ckpt.bin"),
                hash: blake3::hash(&data),
                expect: h,
                written: Instant::now(),
                seen: None,
                superseded: false,
            };
            log.lock().unwrap().push(w);
        }
    }
}

/// Whether the replica holds write `w` exactly.
fn holds(replica: &Path, w: &Write) -> bool {
    let Ok(mut f) = fs::File::open(replica.join(&w.path)) else {
        return false;
    };
    let mut head = vec![0u8; HEADER];
    if f.read_exact(&mut head).is_err() || head[..] != w.expect[..HEADER] {
        return false;
    }
    let mut rest = Vec::new();
    if f.read_to_end(&mut rest).is_err() {
        return false;
    }
    let mut h = blake3::Hasher::new();
    h.update(&head);
    h.update(&rest);
    h.finalize() == w.hash
}

/// Polls the replica until every write was seen (or superseded), or `give_up` passes.
fn watch(
    replica: &Path,
    log: &Mutex<Vec<Write>>,
    writer_done: impl Fn() -> bool,
    give_up: Duration,
) {
    let mut deadline = None;
    loop {
        let now = Instant::now();
        let mut log = log.lock().unwrap();
        let newest_ckpt = log.iter().rposition(|w| w.kind == Kind::Checkpoint);
        for (i, w) in log.iter_mut().enumerate() {
            if w.seen.is_some() || w.superseded {
                continue;
            }
            if w.kind == Kind::Checkpoint && Some(i) != newest_ckpt {
                w.superseded = true;
            } else if holds(replica, w) {
                w.seen = Some(now.saturating_duration_since(w.written));
            }
        }
        let open = log.iter().any(|w| w.seen.is_none() && !w.superseded);
        drop(log);
        if writer_done() {
            let d = *deadline.get_or_insert(now + give_up);
            if !open || now > d {
                return;
            }
        }
        std::thread::sleep(POLL);
    }
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    // Nearest rank.
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn row(name: &str, log: &[Write], kind: Option<Kind>) {
    let of_kind: Vec<&Write> = log
        .iter()
        .filter(|w| kind.is_none_or(|k| w.kind == k))
        .collect();
    let mut seen: Vec<Duration> = of_kind.iter().filter_map(|w| w.seen).collect();
    seen.sort();
    let superseded = of_kind.iter().filter(|w| w.superseded).count();
    let never = of_kind.len() - seen.len() - superseded;
    let ms = |d: Duration| format!("{} ms", d.as_millis());
    if seen.is_empty() {
        println!(
            "| {name} | {} | 0 | – | – | – | {superseded} | {never} |",
            of_kind.len()
        );
        return;
    }
    println!(
        "| {name} | {} | {} | {} | {} | {} | {superseded} | {never} |",
        of_kind.len(),
        seen.len(),
        ms(pct(&seen, 50)),
        ms(pct(&seen, 99)),
        ms(*seen.last().unwrap()),
    );
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let secs = env_usize("STANDBY_BENCH_RPO_SECS", 35);
    let ticks = secs * 1000 / SMALL_EVERY.as_millis() as usize;
    let extra: Vec<String> = std::env::var("STANDBY_BENCH_GPU_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let (_fs, base) = base_dir();
    let t = tempfile::tempdir_in(&base).unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("w")).unwrap();
    let mut data = header("ckpt", usize::MAX);
    data.extend(bytes(&mut rng(1), CKPT_BYTES - HEADER));
    fs::write(src.join("ckpt.bin"), &data).unwrap();

    let pki = Pki::new();
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("bench", Role::Cpu),
    );
    let (gpu, _, _) = continuous_gpu(
        t.path(),
        &src,
        &pki.node("bench", Role::Gpu),
        &cpu.addr,
        &extra,
    );
    println!(
        "steady writes for {secs} s: a small file every {} ms, {} MiB checkpoint every {} s{}",
        SMALL_EVERY.as_millis(),
        CKPT_BYTES >> 20,
        CKPT_EVERY_TICKS as u64 * SMALL_EVERY.as_millis() as u64 / 1000,
        if extra.is_empty() {
            String::new()
        } else {
            format!(" (agent-gpu {})", extra.join(" "))
        }
    );

    let log = Arc::new(Mutex::new(Vec::new()));
    let w = {
        let (src, log) = (src.clone(), log.clone());
        std::thread::spawn(move || writer(src, ticks, log))
    };
    watch(
        &cpu.workspace,
        &log,
        || w.is_finished(),
        Duration::from_secs(30),
    );
    w.join().unwrap();
    drop(gpu);
    let log = log.lock().unwrap();
    println!();
    println!("| writes | count | seen durable | p50 | p99 | max | superseded | never seen |");
    println!("|---|---|---|---|---|---|---|---|");
    row("small files", &log, Some(Kind::Small));
    row("8 MiB checkpoint", &log, Some(Kind::Checkpoint));
    row("all", &log, None);
    println!(
        "(time from the end of a write to the replica holding exactly that content; polled every {} ms)",
        POLL.as_millis()
    );
}
