//! Invariant 1 under fire: kill -9 either agent at seeded random points of a large generation;
//! once agent-cpu restarts, its replica is exactly the old or the new generation, never a mix,
//! and the next run converges.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rand::RngExt;
use rand::rngs::StdRng;
use standby::trust::identity::Role;

/// Tree B: tree A with many kinds of change.
fn mutate(root: &Path, rng: &mut StdRng) {
    let mut files: Vec<_> = Vec::new();
    collect_files(root, &mut files);
    files.sort();
    for (i, p) in files.iter().enumerate() {
        match i % 7 {
            0 => {
                let n = rng.random_range(10..5000);
                fs::write(p, text(rng, n)).unwrap()
            }
            1 if i % 2 == 1 => fs::remove_file(p).unwrap(),
            _ => {}
        }
    }
    for i in 0..300 {
        let n = rng.random_range(0..9000);
        fs::write(root.join(format!("data/new-{i}.bin")), bytes(rng, n)).unwrap();
    }
    // A big file edited in place in several places, another rewritten, a third renamed.
    let big = root.join("data/big-0.bin");
    let mut d = fs::read(&big).unwrap();
    for k in 0..6 {
        let at = k * (d.len() / 6) + 77;
        d[at..at + 4096].copy_from_slice(&bytes(rng, 4096));
    }
    fs::write(&big, d).unwrap();
    write_big(&root.join("data/big-1.bin"), rng, 12 << 20);
    fs::rename(
        root.join("data/big-2.bin"),
        root.join("data/big-2-renamed.bin"),
    )
    .unwrap();
    fs::remove_file(root.join("models")).unwrap();
    std::os::unix::fs::symlink("data", root.join("models")).unwrap();
    fs::remove_dir_all(root.join("deep")).unwrap();
    fs::write(root.join("deep"), b"a file where a directory was").unwrap();
    fs::create_dir_all(root.join("fresh/dir/tree")).unwrap();
    let t0 = 1_750_000_000;
    let mut all = Vec::new();
    collect_files(root, &mut all);
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, t0 + i as i64, 0);
    }
    fix_dir_mtimes(root);
}

fn collect_files(d: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            collect_files(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// Makes `dst` an exact copy of `src` (content, modes, mtimes, symlinks).
fn copy_tree(src: &Path, dst: &Path) {
    if dst.exists() {
        fs::remove_dir_all(dst).unwrap();
    }
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn kill_9_at_random_points_leaves_old_or_new_generation() {
    let seed = seed("kill_9_at_random_points_leaves_old_or_new_generation");
    let iterations: usize = std::env::var("STANDBY_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let mut rng = rng(seed);
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let (a, b, src) = (t.path().join("a"), t.path().join("b"), t.path().join("src"));
    make_tree(&a, &mut rng, 1500, &[16 << 20, 8 << 20, 8 << 20]);
    copy_tree(&a, &b);
    mutate(&b, &mut rng);
    let snaps = [snapshot(&a), snapshot(&b)];
    assert!(!diff(&snaps[0], &snaps[1]).is_empty());

    let gtls = pki.node("p", Role::Gpu);
    let gst = t.path().join("gpu");
    let mut cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );

    // Baseline: A durable, then time a clean A -> B generation.
    copy_tree(&a, &src);
    assert!(
        diff(&snapshot(&src), &snaps[0]).is_empty(),
        "cp -a must reproduce the tree exactly"
    );
    once(&src, &gst, &gtls, &cpu.addr);
    copy_tree(&b, &src);
    let t0 = Instant::now();
    once(&src, &gst, &gtls, &cpu.addr);
    let clean = t0.elapsed();
    assert!(diff(&snapshot(&cpu.workspace), &snaps[1]).is_empty());
    eprintln!("clean A->B generation: {clean:?}");

    let mut current = 1; // the replica holds B
    let (mut old_seen, mut new_seen) = (0, 0);
    for i in 0..iterations {
        let target = 1 - current;
        copy_tree(if target == 0 { &a } else { &b }, &src);
        let mut gpu = spawn_once(&src, &gst, &gtls, &cpu.addr);
        // Half the kills anywhere in the generation, half around its end (commit and apply).
        let d = clean.as_micros() as u64;
        let delay = Duration::from_micros(if rng.random_bool(0.5) {
            rng.random_range(0..(d * 13 / 10).max(1))
        } else {
            rng.random_range(d * 85 / 100..(d * 115 / 100).max(d * 85 / 100 + 1))
        });
        std::thread::sleep(delay);
        let victim_gpu = rng.random_bool(0.5);
        if victim_gpu {
            gpu.kill();
            std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
            cpu.kill();
        } else {
            cpu.kill();
            gpu.kill();
        }
        cpu.restart(); // rolls a committed generation forward before it serves
        let got = snapshot(&cpu.workspace);
        let outcome = if diff(&got, &snaps[current]).is_empty() {
            old_seen += 1;
            "old"
        } else if diff(&got, &snaps[target]).is_empty() {
            new_seen += 1;
            "new"
        } else {
            panic!(
                "iteration {i} (seed {seed}): replica is neither generation after killing {} at {delay:?}:\nvs old:\n{}\nvs new:\n{}",
                if victim_gpu { "agent-gpu" } else { "agent-cpu" },
                diff(&got, &snaps[current]),
                diff(&got, &snaps[target])
            );
        };
        eprintln!(
            "iteration {i}: killed {} at {delay:?}: replica is the {outcome} generation",
            if victim_gpu {
                "agent-gpu then agent-cpu"
            } else {
                "agent-cpu"
            }
        );
        // The next run converges on the target, whatever state both sides were left in.
        once(&src, &gst, &gtls, &cpu.addr);
        assert!(
            diff(&snapshot(&cpu.workspace), &snaps[target]).is_empty(),
            "iteration {i}: did not converge: {}",
            diff(&snapshot(&cpu.workspace), &snaps[target])
        );
        assert_eq!(
            staged_files(&cpu.state.join("stage")),
            0,
            "stage directory not cleaned"
        );
        current = target;
    }
    eprintln!(
        "{iterations} kills (seed {seed}): {old_seen} left the old generation, {new_seen} the new one"
    );
}
