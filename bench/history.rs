//! Benchmark: what recording a snapshot costs per generation, against the generation's
//! replication time, in the same run.
//!
//! `cargo bench --bench history` (release build). Two cases, each its own pair and store:
//! - `checkpoint`: one file of random bytes (`STANDBY_BENCH_CKPT_MIB`, default 256 MiB), then
//!   `STANDBY_BENCH_CKPT_PERMILLE` (default 10, i.e. 1 %) of it overwritten in scattered 64 KiB
//!   pieces;
//! - `small files`: a varied tree of `STANDBY_BENCH_SMALL` (default 20 000) small files, then
//!   `STANDBY_BENCH_SMALL_CHANGED` (default 20) of them rewritten.
//!
//! Each generation is replicated by `agent-gpu --once` into an `agent-cpu --history=false` (its
//! time is the `duration_ms` of the sender's report: durable on the standby when it ends). Then
//! the benchmark records the replica into its own [`Store`], with the manifest the standby
//! committed, read from its catalog (`<state-dir>/replica.snap` + `.log`) with `Catalog::peek`,
//! which writes nothing: the running agent goes on owning those files, and with what the
//! generation changed in place, built from its commit record as the standby's receiver builds
//! it (`Edits::add`), and with the root of the sender's report (the root the commit checked, as
//! the receiver hands it over). That is the call the standby's recorder makes after each commit
//! (`src/agent/snapshots.rs`), on the same data, page cache included. The record's time includes
//! what the recorder does first: bringing its copy of the manifest (here the previous
//! generation's) up to this generation with the changes of its commit record, as the receiver
//! hands them over.
//!
//! `STANDBY_BENCH_WHOLE=1` records without that hint (changed files read whole, the root
//! hashed by the record).
//!
//! Prints, per generation: replication ms, record ms, record ÷ replication (target under 10 %
//! for the changed generations), bytes the generation added to the store (pack bytes, plus the
//! snapshot file), and what the record read. The first generation of each case (the whole tree
//! recorded) is shown too. A second table splits each record's time into its phases
//! (`standby::history::Phases`). Nothing is asserted about times.

#[path = "../tests/common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use rand::RngExt;
use rand::rngs::StdRng;
use standby::history::{Changed, Hint, Phases, Store};
use standby::proto::state::Change;
use standby::replication::catalog::Catalog;
use standby::replication::manifest::Manifest;
use standby::replication::receive::CATALOG;
use standby::replication::receive::edits::Edits;
use standby::text::{hex, unhex};
use standby::trust::identity::Role;

const PIECE: usize = 64 << 10;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// One generation's figures.
struct Row {
    case: &'static str,
    generation: &'static str,
    replication_ms: u64,
    /// The recorder's copy of the manifest brought up to the generation, and the record.
    record: Duration,
    /// Of `record`: applying the generation's changes to the copy.
    upkeep: Duration,
    stored_bytes: u64,
    snapshot_file_bytes: u64,
    files_read: u64,
    bytes_read: u64,
    runs_encoded: u64,
    phases: Phases,
}

/// A pair (GPU workspace and state, a running CPU agent) and the benchmark's own store.
struct Case {
    src: PathBuf,
    gpu_state: PathBuf,
    gpu_tls: PathBuf,
    cpu: Cpu,
    store: Store,
    /// The manifest recorded last.
    previous: RefCell<Option<Manifest>>,
}

impl Case {
    fn new(dir: &Path, pki: &Pki, name: &str) -> Case {
        let cpu = Cpu::start_with(
            &dir.join("replica"),
            &dir.join("cpu"),
            &pki.node(name, Role::Cpu),
            "127.0.0.1:0",
            &["--history=false"],
            &[],
        );
        Case {
            src: dir.join("src"),
            gpu_state: dir.join("gpu"),
            gpu_tls: pki.node(name, Role::Gpu),
            cpu,
            store: Store::open(&dir.join("store")).unwrap(),
            previous: RefCell::new(None),
        }
    }

    /// Replicates the workspace as it is, then records the committed generation.
    fn generation(&self, case: &'static str, generation: &'static str) -> Row {
        settle();
        let r = once(&self.src, &self.gpu_state, &self.gpu_tls, &self.cpu.addr);
        let replication_ms = r["duration_ms"]
            .as_u64()
            .expect("duration_ms in the report");
        for left in ["still_changing", "deferred"] {
            assert!(r.get(left).is_none(), "files left for later: {r}");
        }
        let (manifest, edits, changes) = self.committed(
            r["generation"].as_u64().expect("generation in the report"),
            r["root"].as_str().expect("root in the report"),
        );
        let before = self.store.stats().stored_bytes;
        let snaps_before = dir_bytes(&self.store.dir().join("snapshots"));
        // The standby applied this generation and is idle: its replica holds it throughout.
        let committed = manifest.generation;
        let holds = || committed;
        // The root the standby's commit checked, as its receiver hands it to the recorder.
        let mut hint = Hint {
            root: unhex(r["root"].as_str().expect("root in the report"))
                .and_then(|b| b.try_into().ok())
                .expect("a 32-byte root in hex"),
            edits: &edits,
            changed: None,
            workspace_generation: &holds,
        };
        // The recorder's copy: the previous generation, brought up to this one with the changes
        // its commit hands over (timed); the first generation is handed over whole (a move).
        // It gathers the paths they touch: the walk skips the runs none of them falls in.
        let mut copy = self.previous.borrow().clone().unwrap_or_default();
        let t0 = Instant::now();
        let changed = match changes {
            Some(changes) => {
                let undo = copy.apply_undoable(&changes).unwrap();
                let since = copy.generation;
                copy.generation = manifest.generation;
                Some(Changed {
                    since,
                    paths: undo.paths().cloned().collect(),
                })
            }
            None => {
                copy = manifest;
                None
            }
        };
        let upkeep = t0.elapsed();
        assert_eq!(hint.root, copy.root(), "the copy follows the commits");
        hint.changed = changed.as_ref();
        let manifest = copy;
        let t0 = Instant::now();
        let rec = self
            .store
            .record_with(
                &self.cpu.workspace,
                &manifest,
                SystemTime::now(),
                (!whole_reads()).then_some(&hint),
            )
            .unwrap();
        let record = upkeep + t0.elapsed();
        *self.previous.borrow_mut() = Some(manifest);
        Row {
            case,
            generation,
            replication_ms,
            record,
            upkeep,
            stored_bytes: self.store.stats().stored_bytes - before,
            snapshot_file_bytes: dir_bytes(&self.store.dir().join("snapshots")) - snaps_before,
            files_read: rec.files_read,
            bytes_read: rec.bytes_read,
            runs_encoded: rec.runs_encoded,
            phases: rec.phases,
        }
    }

    /// The manifest the standby committed for `generation` (read-only from its catalog), once
    /// the standby has carried it out in the replica (its `applied` marker is in the log), its
    /// changes (what the commit hands the recorder for its copy of the manifest), and what its
    /// commit changed in place: what the standby's receiver hands its recorder
    /// (`Edits::add` over the previous manifest and the generation's record), empty when the
    /// record is not in the log any more.
    fn committed(&self, generation: u64, root: &str) -> (Manifest, Edits, Option<Vec<Change>>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = Catalog::peek(&self.cpu.state, CATALOG).unwrap();
            if p.manifest.generation.0 == generation && p.unapplied.is_none() {
                assert_eq!(
                    hex(&p.manifest.root()),
                    root,
                    "the committed manifest's root"
                );
                let mut edits = Edits::default();
                let mut changes = None;
                if let (Some(rec), Some(prev)) = (p.last, &*self.previous.borrow())
                    && rec.generation == generation
                    && rec.previous == Some(prev.generation.0)
                {
                    edits.add(prev, &rec.changes);
                    changes = Some(rec.changes);
                }
                return (p.manifest, edits, changes);
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not carry out generation {generation}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `STANDBY_BENCH_WHOLE=1`: record without the edits, every changed file read whole (the
/// recorder before it took the receiver's ranges, and its path when it has none).
fn whole_reads() -> bool {
    std::env::var("STANDBY_BENCH_WHOLE").is_ok_and(|v| v == "1")
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn settle() {
    // Start each replication without the previous step's write-back in flight.
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// `permille` of the file overwritten in 64 KiB pieces at random offsets.
fn scatter(p: &Path, rng: &mut StdRng, permille: usize) -> usize {
    let len = fs::metadata(p).unwrap().len() as usize;
    let pieces = (len * permille / 1000).div_ceil(PIECE);
    let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
    for _ in 0..pieces {
        f.seek(SeekFrom::Start(rng.random_range(0..(len - PIECE) as u64)))
            .unwrap();
        f.write_all(&bytes(rng, PIECE)).unwrap();
    }
    f.sync_all().unwrap();
    pieces
}

/// Rewrites `n` regular files spread over the tree with new content.
fn rewrite(root: &Path, rng: &mut StdRng, n: usize) {
    let mut files = Vec::new();
    collect_files(root, &mut files);
    files.sort();
    let step = (files.len() / n.max(1)).max(1);
    for p in files.iter().step_by(step).take(n) {
        let size = rng.random_range(100..6000);
        fs::write(p, text(rng, size)).unwrap();
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            collect_files(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

fn checkpoint(base: &Path, pki: &Pki, rng: &mut StdRng) -> Vec<Row> {
    let mib = env_usize("STANDBY_BENCH_CKPT_MIB", 256);
    let permille = env_usize("STANDBY_BENCH_CKPT_PERMILLE", 10);
    let case = Case::new(&base.join("checkpoint"), pki, "ckpt");
    let file = case.src.join("ckpt/model.bin");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    println!("checkpoint: {mib} MiB of random bytes ...");
    write_big(&file, rng, mib << 20);
    let first = case.generation("checkpoint", "first (whole)");
    let pieces = scatter(&file, rng, permille);
    println!("checkpoint: {pieces} x 64 KiB overwritten ({permille} ‰)");
    let changed = case.generation("checkpoint", "1 % changed");
    vec![first, changed]
}

fn small_files(base: &Path, pki: &Pki, rng: &mut StdRng) -> Vec<Row> {
    let n = env_usize("STANDBY_BENCH_SMALL", 20_000);
    let changed = env_usize("STANDBY_BENCH_SMALL_CHANGED", 20);
    let case = Case::new(&base.join("small"), pki, "small");
    println!("small files: {n} files ...");
    make_tree(&case.src, rng, n, &[]);
    let first = case.generation("small files", "first (whole)");
    rewrite(&case.src, rng, changed);
    println!("small files: {changed} rewritten");
    let second = case.generation("small files", "few changed");
    vec![first, second]
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| case | generation | replication ms | record ms | record ÷ replication | bytes stored (packs + snapshot file) | record read |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let record_ms = r.record.as_secs_f64() * 1000.0;
        println!(
            "| {} | {} | {} | {:.1} | {:.1} % | {} + {} | {} files, {} bytes |",
            r.case,
            r.generation,
            r.replication_ms,
            record_ms,
            100.0 * record_ms / r.replication_ms.max(1) as f64,
            r.stored_bytes,
            r.snapshot_file_bytes,
            r.files_read,
            r.bytes_read,
        );
    }
    println!("(target: record under 10 % of replication for the changed generations)");
    println!();
    println!(
        "| case | generation | copy upkeep ms | walk ms | read + chunk + hash ms | pack writes ms | pack seals (fsync) ms | runs encoded | encode ms | snapshot write (fsync) ms | publish ms | the rest ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    for r in rows {
        let p = &r.phases;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.case,
            r.generation,
            ms(r.upkeep),
            ms(p.walk),
            ms(p.chunk),
            ms(p.pack),
            ms(p.seal),
            r.runs_encoded,
            ms(p.encode),
            ms(p.write),
            ms(p.publish),
            ms(r.record.saturating_sub(
                r.upkeep + p.walk + p.chunk + p.pack + p.seal + p.encode + p.write + p.publish
            )),
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let base = std::env::var("STANDBY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let t = tempfile::tempdir_in(&base).unwrap();
    println!("working in {}", t.path().display());
    let pki = Pki::new();
    let mut rng = rng(42);
    let mut rows = checkpoint(t.path(), &pki, &mut rng);
    rows.extend(small_files(t.path(), &pki, &mut rng));
    print_table(&rows);
}
