//! History end to end (issue 14): a user's `rm -rf ckpt/` and a checkpoint overwritten with
//! garbage replicate to the standby within a second, and the snapshots the standby kept bring
//! the earlier bytes back — on the GPU with `agent-gpu versions` / `restore` over the agents'
//! mTLS link, and for an operator with `coordinator versions` / `restore` through the
//! coordinator. Bad requests get clear errors and change nothing.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use standby::trust::identity::Role;

/// The tree before the mistake: two checkpoints below `ckpt/`, a model beside it.
fn write_good(ws: &Path, seed_: u64) {
    let mut r = rng(seed_);
    fs::create_dir_all(ws.join("ckpt")).unwrap();
    write_big(&ws.join("ckpt/step-100.pt"), &mut r, 3 << 20);
    write_big(&ws.join("ckpt/step-200.pt"), &mut r, 5 << 20);
    write_big(&ws.join("model.pt"), &mut r, 2 << 20);
    fs::write(ws.join("train.py"), "print('train')\n").unwrap();
}

/// The mistake: the checkpoints deleted, the model overwritten with garbage of the same size.
fn make_mistake(ws: &Path) {
    fs::remove_dir_all(ws.join("ckpt")).unwrap();
    fs::write(ws.join("model.pt"), vec![0xff_u8; 2 << 20]).unwrap();
}

fn run(args: &[&str], state: &Path) -> Output {
    Command::new(AGENT_GPU)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

fn ok_json(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A continuous agent-gpu of pair "p" on `ws` (state `gst`, log `<dir>/gpu.log`) replicating to
/// `cpu`, once it answers `status`.
fn start_gpu(ws: &Path, gst: &Path, pki: &Pki, cpu: &Cpu, extra: &[&str], dir: &Path) -> Proc {
    let log = dir.join("gpu.log");
    let gpu = Proc(
        Command::new(AGENT_GPU)
            .args(gpu_args(ws, gst, &pki.node("p", Role::Gpu), &cpu.addr))
            .args(extra)
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_agent(gst, &log);
    gpu
}

fn wait_agent(state: &Path, log: &Path) {
    let ok = wait_until(Duration::from_secs(30), || {
        run(&["status"], state).status.success()
    });
    assert!(
        ok,
        "agent-gpu did not start: {}",
        fs::read_to_string(log).unwrap_or_default()
    );
}

/// Waits until the standby's history lists a snapshot of the replica as it is now (the
/// recorder runs just after each commit).
fn wait_snapshots(state: &Path, at_least: usize, cpu: &Cpu) -> Vec<serde_json::Value> {
    let mut list = Vec::new();
    let ok = wait_until(Duration::from_secs(30), || {
        list = ok_json(run(&["versions", "--json"], state))
            .as_array()
            .cloned()
            .unwrap_or_default();
        list.len() >= at_least
    });
    assert!(
        ok,
        "fewer than {at_least} snapshots: {list:?}\n{}\n{}",
        cpu.log_text(),
        String::from_utf8_lossy(
            &Command::new("ls")
                .arg("-laR")
                .arg(cpu.state.join("history"))
                .output()
                .unwrap()
                .stdout
        )
    );
    list
}

#[test]
fn an_rm_rf_and_an_overwritten_checkpoint_come_back_from_the_standby() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let ws = t.path().join("ws");
    let gst = t.path().join("gpu");
    write_good(&ws, seed("history-restore"));
    let before = t.path().join("before");
    copy_tree(&ws, &before);
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let _gpu = start_gpu(&ws, &gst, &pki, &cpu, &["--debounce", "50ms"], t.path());
    assert!(flush(&gst, "30s").status.success());
    let good = wait_snapshots(&gst, 1, &cpu);
    std::thread::sleep(Duration::from_millis(1100));
    let between = unix_ms();
    std::thread::sleep(Duration::from_millis(1100));

    make_mistake(&ws);
    assert!(flush(&gst, "30s").status.success());
    assert!(
        !cpu.workspace.join("ckpt").exists(),
        "the mistake reached the standby"
    );
    let all = wait_snapshots(&gst, good.len() + 1, &cpu);

    // --path: only that path's snapshots, counted below it.
    let with_ckpt = ok_json(run(&["versions", "--json", "--path", "ckpt"], &gst));
    let with_ckpt = with_ckpt.as_array().unwrap();
    assert_eq!(with_ckpt.len(), good.len(), "{with_ckpt:?} of {all:?}");
    assert_eq!(with_ckpt[0]["files"], 2);
    assert_eq!(with_ckpt[0]["bytes"], 8 << 20);

    // Back into the workspace, as of a time before the mistake.
    let at = standby::cli::format_time(between as i64);
    let r = ok_json(run(&["restore", "--at", &at, "--path", "ckpt"], &gst));
    assert_eq!(r["files"], 2, "{r}");
    let r = ok_json(run(&["restore", "--at", &at, "--path", "model.pt"], &gst));
    assert_eq!(r["files"], 1, "{r}");
    assert_same(&before, &ws);
    // The restored files are ordinary writes: they replicate.
    assert!(flush(&gst, "30s").status.success());
    assert_same(&before, &cpu.workspace);

    // A whole snapshot by id into another directory.
    let elsewhere = t.path().join("elsewhere");
    let id = good.last().unwrap()["id"].as_str().unwrap().to_string();
    let to = elsewhere.display().to_string();
    ok_json(run(&["restore", "--snapshot", &id, "--to", &to], &gst));
    assert_same(&before, &elsewhere);

    // agent-cpu verify: through the running agent, then by itself on a damaged store.
    let verify = |cpu_state: &Path| {
        Command::new(AGENT_CPU)
            .args(["verify", "--state-dir"])
            .arg(cpu_state)
            .output()
            .unwrap()
    };
    let v = ok_json(verify(&cpu.state));
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["snapshots"].as_u64().unwrap() >= 2, "{v}");
    let mut cpu = cpu;
    cpu.kill();
    let pack = fs::read_dir(cpu.state.join("history/packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    bytes[100] ^= 0x55;
    fs::write(&pack, bytes).unwrap();
    let out = verify(&cpu.state);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert!(!v["problems"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn bad_restore_requests_are_refused_clearly_and_change_nothing() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let ws = t.path().join("ws");
    let gst = t.path().join("gpu");
    write_good(&ws, seed("history-refusals"));
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let _gpu = start_gpu(&ws, &gst, &pki, &cpu, &[], t.path());
    assert!(flush(&gst, "30s").status.success());
    let id = wait_snapshots(&gst, 1, &cpu)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = t.path().join("before");
    copy_tree(&ws, &before);

    let cases: &[(&[&str], &str)] = &[
        (
            &["restore", "--snapshot", "ffffffffffffffff"],
            "ffffffffffffffff",
        ),
        (&["restore", "--at", "10years"], "no snapshot"),
        (&["restore", "--snapshot", &id, "--path", "../etc"], "path"),
        (
            &["restore", "--snapshot", &id, "--path", "no/such/dir"],
            "no/such/dir",
        ),
        (&["restore", "--at", "not a time"], "RFC 3339"),
        (&["versions", "--path", "/abs/../x"], "path"),
    ];
    for (args, says) in cases {
        let out = run(args, &gst);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert_same(&before, &ws);
    assert_same(&before, &cpu.workspace);
}

#[test]
fn an_operator_lists_and_restores_through_the_coordinator() {
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &[]);
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), "hist", 20);
    let before = t.path().join("before");
    copy_tree(&gpu.workspace, &before);
    let mut list = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        let out = coord.admin(&["versions", "hist", "--json"]);
        out.status.success() && {
            list = serde_json::from_slice(&out.stdout).unwrap();
            !list.as_array().unwrap().is_empty()
        }
    });
    assert!(
        ok,
        "no snapshots through the coordinator: {list} {}",
        coord.log_text()
    );
    let id = list[0]["id"].as_str().unwrap().to_string();

    fs::remove_dir_all(&gpu.workspace).unwrap();
    fs::create_dir(&gpu.workspace).unwrap();
    assert!(flush(&gpu.state, "30s").status.success());
    let to = t.path().join("restored");
    let out = coord.admin(&[
        "restore",
        "hist",
        "--snapshot",
        &id,
        "--to",
        &to.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&before, &to);
    // The workspace's loss reached the standby; its history did not lose it.
    let started = Instant::now();
    while fs::read_dir(&cpu.workspace).unwrap().count() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica never emptied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = coord.admin(&["versions", "no-such-pair"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-pair"));
}

/// The blake3 of a file's bytes, hex.
fn blake3_hex(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

/// The agent path of changed ranges (ARCHITECTURE.md, "History"): a big file edited in place
/// replicates as a patch, the standby's recorder re-chunks it around the ranges the receiver
/// handed over (reading a fraction of it), and both snapshots restore their own bytes exactly.
#[test]
fn an_in_place_edit_is_recorded_from_its_ranges_and_both_versions_restore() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let ws = t.path().join("ws");
    let gst = t.path().join("gpu");
    let big = ws.join("ckpt/big.pt");
    fs::create_dir_all(big.parent().unwrap()).unwrap();
    let mut r = rng(seed("history-ranges"));
    let size = 24usize << 20;
    write_big(&big, &mut r, size);
    let old = blake3_hex(&big);
    let cpu = Cpu::start_with(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
        "127.0.0.1:0",
        &[],
        &[("STANDBY_LOG", "info,standby::agent::snapshots=debug")],
    );
    let _gpu = start_gpu(&ws, &gst, &pki, &cpu, &["--debounce", "50ms"], t.path());
    assert!(flush(&gst, "30s").status.success());
    let first = wait_snapshots(&gst, 1, &cpu);

    // Three 64 KiB pieces overwritten in place: same file, same size.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(&big).unwrap();
        for at in [1u64 << 20, 9 << 20, (20 << 20) + 4097] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&bytes(&mut r, 64 << 10)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let new = blake3_hex(&big);
    assert_ne!(old, new);
    assert!(flush(&gst, "30s").status.success());
    assert_eq!(blake3_hex(&cpu.workspace.join("ckpt/big.pt")), new);
    let all = wait_snapshots(&gst, first.len() + 1, &cpu);

    // The record of the edit read the file around the ranges only.
    let recorded = |log: &str| -> Vec<u64> {
        log.lines()
            .filter(|l| l.contains("snapshot recorded"))
            .filter_map(|l| {
                let v = l.split("bytes_read=").nth(1)?;
                v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
            })
            .collect()
    };
    let ok = wait_until(Duration::from_secs(10), || {
        recorded(&cpu.log_text()).len() >= all.len()
    });
    let reads = recorded(&cpu.log_text());
    assert!(ok, "no record lines: {}", cpu.log_text());
    let last = *reads.last().unwrap();
    assert!(
        last > 0 && last < (size / 4) as u64,
        "the edit's record read {last} of {size} bytes ({reads:?})"
    );

    // Each snapshot restores its own bytes, exactly.
    let restore = |id: &str, to: &Path| {
        let to = to.display().to_string();
        ok_json(run(
            &["restore", "--snapshot", id, "--path", "ckpt", "--to", &to],
            &gst,
        ));
    };
    let id_new = all.last().unwrap()["id"].as_str().unwrap().to_string();
    let id_old = first.last().unwrap()["id"].as_str().unwrap().to_string();
    restore(&id_new, &t.path().join("new"));
    restore(&id_old, &t.path().join("old"));
    assert_eq!(blake3_hex(&t.path().join("new/ckpt/big.pt")), new);
    assert_eq!(blake3_hex(&t.path().join("old/ckpt/big.pt")), old);
}
