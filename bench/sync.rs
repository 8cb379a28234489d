//! Benchmark: Standby's agents against `rsync -a -e ssh` on the same data, in the same run.
//!
//! `cargo bench --bench sync` (release build). Generates a tree of big files plus ~20k small
//! files, then measures a full sync and an incremental sync after scattered edits, with:
//! - the agents (`agent-gpu --once` into `agent-cpu`, mutual TLS on loopback; each generation
//!   is durable — fsynced — before it is acknowledged);
//! - `rsync -a -e ssh` to a throwaway sshd on loopback (not fsynced: page cache only);
//! - the same rsync with `--fsync`, for a like-for-like durable comparison.
//!
//! Prints wall times, ratios and bytes on the wire. Sizes can be changed with
//! `STANDBY_BENCH_BIG_MIB` (per big file), `STANDBY_BENCH_BIG_FILES`, `STANDBY_BENCH_SMALL`.
//!
//! Where the data lives matters as much as the tools: on a long-used ext4 (a build machine
//! that creates and deletes hundreds of thousands of files) inode allocation slows down for
//! everyone. As root, the benchmark therefore runs on a fresh ext4 filesystem in a loop-mounted
//! image (`STANDBY_BENCH_DIR` picks a directory instead), the same for every tool.

#[path = "../tests/common/mod.rs"]
mod common;
mod rig;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::RngExt;
use rig::{base_dir, env_usize, rsync, settle, sshd};
use standby::trust::identity::Role;

fn edit(src: &Path, rng: &mut rand::rngs::StdRng, big: usize) {
    // 200 small files rewritten, 50 new ones, 20 deleted.
    let mut small = Vec::new();
    for e in fs::read_dir(src.join("src")).unwrap() {
        small.push(e.unwrap().path());
    }
    small.sort();
    for p in small.iter().filter(|p| p.is_file()).step_by(37).take(200) {
        let n = rng.random_range(100..6000);
        fs::write(p, text(rng, n)).unwrap();
    }
    for p in small
        .iter()
        .filter(|p| p.is_file())
        .skip(5)
        .step_by(97)
        .take(20)
    {
        let _ = fs::remove_file(p);
    }
    for i in 0..50 {
        fs::write(src.join(format!("src/new-{i}.py")), text(rng, 3000)).unwrap();
    }
    // Scattered in-place edits in every big file: 64 x 4 KiB each.
    for k in 0..big {
        let p = src.join(format!("data/big-{k}.bin"));
        let len = fs::metadata(&p).unwrap().len();
        let mut f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        for _ in 0..64 {
            f.seek(SeekFrom::Start(rng.random_range(0..len - 4096)))
                .unwrap();
            f.write_all(&bytes(rng, 4096)).unwrap();
        }
    }
    // And an append to the first (a growing log or checkpoint).
    if big == 0 {
        return;
    }
    fs::OpenOptions::new()
        .append(true)
        .open(src.join("data/big-0.bin"))
        .unwrap()
        .write_all(&text(rng, 2 << 20))
        .unwrap();
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let big_mib = env_usize("STANDBY_BENCH_BIG_MIB", 128);
    let big_files = env_usize("STANDBY_BENCH_BIG_FILES", 3);
    let small = env_usize("STANDBY_BENCH_SMALL", 20_000);
    let (_fs, base) = base_dir();
    let t = tempfile::tempdir_in(&base).unwrap();
    let mut rng = rng(42);
    let src = t.path().join("src");
    println!(
        "generating {big_files} x {big_mib} MiB + {small} small files in {} ...",
        t.path().display()
    );
    make_tree(&src, &mut rng, small, &vec![big_mib << 20; big_files]);
    let pki = Pki::new();
    let s = sshd(&t.path().join("sshd"));
    let gtls = pki.node("bench", Role::Gpu);
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("bench", Role::Cpu),
    );
    let gst = t.path().join("gpu");
    let dst_plain = t.path().join("rsync-plain");
    let dst_fsync = t.path().join("rsync-fsync");

    let standby = |label: &str| {
        settle();
        let t0 = Instant::now();
        let r = once(&src, &gst, &gtls, &cpu.addr);
        let d = t0.elapsed();
        println!(
            "  standby {label:<12} {:>8.2} s  {:>12} bytes sent",
            d.as_secs_f64(),
            r["bytes_sent"]
        );
        (d, r["bytes_sent"].as_u64().unwrap())
    };
    let rs = |label: &str, dst: &Path, extra: &[&str]| {
        settle();
        let (d, b) = rsync(&s, &src, dst, extra);
        println!(
            "  rsync   {label:<12} {:>8.2} s  {:>12} bytes sent",
            d.as_secs_f64(),
            b
        );
        (d, b)
    };

    println!("full sync:");
    let full_s = standby("");
    let full_r = rs("", &dst_plain, &[]);
    let full_rf = rs("--fsync", &dst_fsync, &["--fsync"]);
    assert_same(&src, &cpu.workspace);
    assert_same(&src, &dst_plain);

    edit(&src, &mut rng, big_files);
    println!("incremental sync after scattered edits:");
    let inc_s = standby("");
    let inc_r = rs("", &dst_plain, &[]);
    let inc_rf = rs("--fsync", &dst_fsync, &["--fsync"]);
    assert_same(&src, &cpu.workspace);
    assert_same(&src, &dst_plain);
    drop(s.child);
    if std::env::var_os("STANDBY_TEST_SHOW_LOGS").is_some() {
        eprintln!("agent-cpu log:\n{}", cpu.log_text());
    }

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!();
    println!(
        "| case | standby | rsync -a -e ssh | ratio | rsync --fsync | ratio | standby bytes | rsync bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, st, r, rf) in [
        ("full", full_s, full_r, full_rf),
        ("incremental", inc_s, inc_r, inc_rf),
    ] {
        println!(
            "| {name} | {:.2} s | {:.2} s | {:.2} | {:.2} s | {:.2} | {} | {} |",
            st.0.as_secs_f64(),
            r.0.as_secs_f64(),
            ratio(st.0, r.0),
            rf.0.as_secs_f64(),
            ratio(st.0, rf.0),
            st.1,
            r.1
        );
    }
    println!(
        "(ratio = standby time / rsync time; below 1 is faster. Data: {big_files} x {big_mib} MiB + {small} small files.)"
    );
}
