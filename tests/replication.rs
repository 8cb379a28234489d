//! End-to-end replication between the real agent binaries over mutual TLS on loopback.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use standby::trust::identity::Role;

fn sent(r: &serde_json::Value) -> u64 {
    r["bytes_sent"].as_u64().unwrap()
}

#[test]
fn roundtrip_of_a_varied_tree() {
    let seed = seed("roundtrip_of_a_varied_tree");
    let mut rng = rng(seed);
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    make_tree(&src, &mut rng, 3000, &[110 << 20, 3 << 20, 0]);
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let gtls = pki.node("p", Role::Gpu);
    let r = once(&src, &t.path().join("gpu"), &gtls, &cpu.addr);
    assert_same(&src, &cpu.workspace);
    for key in [
        "generation",
        "files_total",
        "files_changed",
        "bytes_total",
        "bytes_sent",
        "duration_ms",
        "root",
    ] {
        assert!(r.get(key).is_some(), "report lacks {key}: {r}");
    }
    assert_eq!(r["generation"], 1);
    assert_eq!(r["files_total"], 3003);
    assert_eq!(r["root"].as_str().unwrap().len(), 64);
    // Random data does not compress: what went on the wire is about the data itself.
    let total = r["bytes_total"].as_u64().unwrap();
    assert!(sent(&r) < total + total / 20, "{r}");

    // Nothing changed: an empty generation, almost nothing sent, same root.
    let r2 = once(&src, &t.path().join("gpu"), &gtls, &cpu.addr);
    assert_eq!(r2["generation"], 2);
    assert_eq!(r2["files_changed"], 0, "{r2}");
    assert_eq!(r2["root"], r["root"]);
    assert!(sent(&r2) < 4096, "{r2}");
}

#[test]
fn incremental_changes_cost_about_their_size() {
    let seed = seed("incremental_changes_cost_about_their_size");
    let mut rng = rng(seed);
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    make_tree(&src, &mut rng, 300, &[64 << 20]);
    let big = src.join("data/big-0.bin");
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let gtls = pki.node("p", Role::Gpu);
    let gst = t.path().join("gpu");
    let sync = || {
        let out = once_raw(&src, &gst, &gtls, &cpu.addr);
        assert!(
            out.status.success(),
            "agent-gpu --once failed: {}\nagent-cpu log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            cpu.log_text()
        );
        assert_same(&src, &cpu.workspace);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    sync();

    // Scattered in-place edits of a 64 MiB file: 8 x 1 KiB.
    {
        let mut f = fs::OpenOptions::new().write(true).open(&big).unwrap();
        for i in 0..8u64 {
            f.seek(SeekFrom::Start(i * (8 << 20) + 12345)).unwrap();
            f.write_all(&bytes(&mut rng, 1024)).unwrap();
        }
    }
    let r = sync();
    assert!(
        sent(&r) < 128 << 10,
        "8 KiB of edits sent {} bytes",
        sent(&r)
    );

    // 100 bytes inserted near the start shift everything after them.
    let mut data = fs::read(&big).unwrap();
    data.splice(4000..4000, std::iter::repeat_n(b'!', 100));
    fs::write(&big, &data).unwrap();
    drop(data);
    let r = sync();
    assert!(
        sent(&r) < 256 << 10,
        "a 100-byte insertion sent {} bytes",
        sent(&r)
    );

    // Append 1 MiB of random data.
    fs::OpenOptions::new()
        .append(true)
        .open(&big)
        .unwrap()
        .write_all(&bytes(&mut rng, 1 << 20))
        .unwrap();
    let r = sync();
    assert!(
        sent(&r) > 1 << 20 && sent(&r) < (1 << 20) + (128 << 10),
        "append sent {}",
        sent(&r)
    );

    // Rename of the big file: no content on the wire.
    fs::rename(&big, src.join("data/renamed.bin")).unwrap();
    let r = sync();
    assert!(sent(&r) < 4096, "rename sent {}", sent(&r));

    // chmod, symlink retarget, delete, a new empty directory, a file replaced by a directory.
    fs::set_permissions(
        src.join("data/renamed.bin"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::remove_file(src.join("models")).unwrap();
    symlink("data", src.join("models")).unwrap();
    fs::remove_dir_all(src.join("deep")).unwrap();
    fs::create_dir(src.join("new empty")).unwrap();
    let victim = fs::read_dir(src.join("src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file())
        .unwrap();
    fs::remove_file(&victim).unwrap();
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("inside"), b"now a directory").unwrap();
    let r = sync();
    assert!(sent(&r) < 16 << 10, "metadata changes sent {}", sent(&r));

    // A whole directory renamed: its files travel as renames.
    fs::rename(src.join("data/train"), src.join("data/train-v2")).unwrap();
    let r = sync();
    assert!(sent(&r) < 64 << 10, "directory rename sent {}", sent(&r));
}

/// The chunk maps the sender keeps in its state directory: the content each maps.
fn chunk_maps(gpu_state: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(gpu_state.join("chunkmaps"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn chunk_maps_outlive_the_sender_and_a_wrong_one_costs_only_a_resend() {
    use standby::replication::chunkmap::{ChunkMap, Cutter, MapStore, chunk_hash};
    let mut rng = rng(seed("chunk_maps_outlive_the_sender"));
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    make_tree(&src, &mut rng, 20, &[8 << 20]);
    let big = src.join("data/big-0.bin");
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let (gtls, gst) = (pki.node("p", Role::Gpu), t.path().join("gpu"));
    let sync = || {
        let out = once_raw(&src, &gst, &gtls, &cpu.addr);
        assert!(out.status.success(), "{}", cpu.log_text());
        assert_same(&src, &cpu.workspace);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let content = || blake3::hash(&fs::read(&big).unwrap()).to_hex().to_string();
    sync();
    // Each `--once` is a new process: the map of the first sync is on disk, and only the
    // committed content's.
    assert_eq!(chunk_maps(&gst), [content()]);

    // 100 bytes inserted: copies of the receiver's chunks, no signature pass.
    let mut data = fs::read(&big).unwrap();
    data.splice(4000..4000, std::iter::repeat_n(b'!', 100));
    fs::write(&big, &data).unwrap();
    let r = sync();
    assert!(
        sent(&r) < 96 << 10,
        "a 100-byte insertion sent {}",
        sent(&r)
    );
    assert_eq!(
        chunk_maps(&gst),
        [content()],
        "the old content's map is dropped"
    );

    // A map that does not describe the receiver's copy (its chunks, in reverse order, so every
    // offset is wrong): the copies it leads to fail the receiver's check, and the file is sent
    // again whole.
    let mut wrong = ChunkMap::default();
    let mut at = 0;
    let mut chunks = Vec::new();
    for len in Cutter::default().cuts(&data, true) {
        chunks.push((len, chunk_hash(&data[at..at + len])));
        at += len;
    }
    for (len, h) in chunks.into_iter().rev() {
        wrong.push(len, h);
    }
    let key = blake3::hash(&data);
    MapStore::open(&gst)
        .unwrap()
        .save(key.as_bytes(), &wrong)
        .unwrap();
    {
        let mut f = fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&bytes(&mut rng, 1024)).unwrap();
    }
    let r = sync();
    assert!(sent(&r) > 8 << 20, "sent {} after a wrong map", sent(&r));
    assert!(cpu.log_text().contains("failed verification"));
    assert_eq!(chunk_maps(&gst), [content()]);

    // A rename keeps the content, so its map still serves; a deletion drops it.
    fs::rename(&big, src.join("data/renamed.bin")).unwrap();
    sync();
    assert_eq!(chunk_maps(&gst).len(), 1);
    fs::remove_file(src.join("data/renamed.bin")).unwrap();
    sync();
    assert!(chunk_maps(&gst).is_empty());
}

#[test]
fn continuous_mode_flush_and_restarts() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let gst = t.path().join("gpu");
    let mut cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let gtls = pki.node("p", Role::Gpu);
    let start_gpu = |peer: &str| {
        let log = fs::File::create(t.path().join("gpu.log")).unwrap();
        Proc(
            Command::new(AGENT_GPU)
                .args(gpu_args(&src, &gst, &gtls, peer))
                .args(["--debounce", "100ms", "--rescan-interval", "30s"])
                .env("STANDBY_LOG", "debug")
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let flush = |timeout: &str| {
        Command::new(AGENT_GPU)
            .args(["flush", "--state-dir"])
            .arg(&gst)
            .args(["--timeout", timeout])
            .output()
            .unwrap()
    };
    let wait_socket = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = Command::new(AGENT_GPU)
                .args(["status", "--state-dir"])
                .arg(&gst)
                .output()
                .unwrap();
            if st.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "agent-gpu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut gpu = start_gpu(&cpu.addr);
    wait_socket();

    // Writes followed at once by a flush are on the CPU when the flush returns.
    for i in 0..50 {
        fs::write(src.join(format!("step-{i}.log")), format!("step {i}\n")).unwrap();
    }
    fs::create_dir(src.join("ckpt")).unwrap();
    fs::write(src.join("ckpt/model.pt"), vec![7u8; 3 << 20]).unwrap();
    let out = flush("60s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&src, &cpu.workspace);

    // Changes without a flush arrive by themselves (inotify + debounce).
    fs::write(src.join("late.txt"), b"arrives by itself").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cpu.workspace.join("late.txt").exists() {
        assert!(
            Instant::now() < deadline,
            "change was not replicated without a flush"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The CPU goes away: a flush cannot succeed, and says why.
    cpu.kill();
    fs::write(src.join("while-cpu-down.txt"), b"x").unwrap();
    let out = flush("2s");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not durable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // It comes back: the sender reconnects by itself and the flush succeeds.
    cpu.restart();
    let out = flush("60s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&src, &cpu.workspace);

    // The GPU agent dies; changes made while it is down are not lost.
    gpu.kill();
    fs::write(src.join("while-gpu-down.txt"), b"y").unwrap();
    fs::remove_file(src.join("step-3.log")).unwrap();
    let mut gpu = start_gpu(&cpu.addr);
    wait_socket();
    let out = flush("60s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&src, &cpu.workspace);

    // Status reports the RPO figures.
    let out = Command::new(AGENT_GPU)
        .args(["status", "--state-dir"])
        .arg(&gst)
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(st["last_durable_generation"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["pending_bytes"], 0, "{st}");
    assert!(st.get("oldest_pending_unix_ms").is_some(), "{st}");
    assert_eq!(st["connected"], true, "{st}");
    gpu.kill();
}

#[test]
fn certificates_and_usage_errors() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("coord");
    let run = |args: &[&str]| Command::new(COORDINATOR).args(args).output().unwrap();
    let out = run(&["init", "--dir", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second init must not replace the CA.
    let out = run(&["init", "--dir", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let o = t.path().join("out");
    let out = run(&[
        "cert",
        "--dir",
        dir.to_str().unwrap(),
        "--pair",
        "p9",
        "--role",
        "cpu",
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "node.pem", "node.key"] {
        let m = fs::metadata(o.join(f)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let m = standby::trust::tls::TlsMaterial::load(&o).unwrap();
    // Without --name, a static certificate names the role as its machine.
    assert_eq!(m.identity.uri(), "standby://pair/p9/cpu/cpu");
    let m = standby::trust::tls::TlsMaterial::load(&dir.join("admin")).unwrap();
    assert_eq!(m.identity.uri(), "standby://admin/admin");

    // `cert --renew`: the admin certificate again, same identity, a new key and serial.
    let old = m.facts();
    let admin = dir.join("admin");
    let d = dir.to_str().unwrap();
    let out = run(&[
        "cert",
        "--dir",
        d,
        "--renew",
        "--out",
        admin.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let renewed = standby::trust::tls::TlsMaterial::load(&admin)
        .unwrap()
        .facts();
    assert_eq!(renewed.identity, old.identity);
    assert_ne!(renewed.serial, old.serial);
    // Renewing needs a certificate to renew; it never picks a role or names.
    let empty = t.path().join("empty");
    let out = run(&[
        "cert",
        "--dir",
        d,
        "--renew",
        "--out",
        empty.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let out = run(&[
        "cert",
        "--dir",
        d,
        "--renew",
        "--role",
        "gpu",
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(!out.status.success());

    // Usage errors exit 64 with a message; a bad pair name is refused.
    let out = run(&[
        "cert",
        "--dir",
        dir.to_str().unwrap(),
        "--pair",
        "../x",
        "--role",
        "gpu",
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let out = Command::new(AGENT_GPU)
        .args(["--workspace", "/tmp"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(AGENT_CPU).args(["--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(AGENT_GPU)
        .args(gpu_args(t.path(), &t.path().join("s"), &o, "127.0.0.1:1"))
        .args(["--debounce", "soon"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // agent-gpu refuses a cpu certificate, with one clear line.
    let out = Command::new(AGENT_GPU)
        .args(gpu_args(t.path(), &t.path().join("s"), &o, "127.0.0.1:1"))
        .arg("--once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a gpu certificate"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn once_fails_cleanly_when_the_cpu_is_unreachable() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), b"x").unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let out = once_raw(
        t.path(),
        &t.path().join("..").join("gst-unreach"),
        &pki.node("p", Role::Gpu),
        &addr,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let _ = fs::remove_dir_all(t.path().join("..").join("gst-unreach"));
}

/// A static pair for the tests below: a CPU agent on `<t>/replica`, and a continuous agent-gpu
/// on `src` (its state in `<t>/gpu`, its log in `<t>/gpu.log`) with `extra` flags.
struct Pair {
    cpu: Cpu,
    gpu: Proc,
    gst: std::path::PathBuf,
    /// Holds the certificates' directory for as long as the agents run.
    _pki: Pki,
}

fn static_pair(t: &std::path::Path, src: &std::path::Path, extra: &[&str]) -> Pair {
    let pki = Pki::new();
    let cpu = Cpu::start(
        &t.join("replica"),
        &t.join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let gst = t.join("gpu");
    let gpu = Proc(
        Command::new(AGENT_GPU)
            .args(gpu_args(src, &gst, &pki.node("p", Role::Gpu), &cpu.addr))
            .args(extra)
            .stderr(fs::File::create(t.join("gpu.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    Pair {
        cpu,
        gpu,
        gst,
        _pki: pki,
    }
}

/// The workspace directory deleted: the sender does not spin; made again, the watch follows
/// it, and a file written there reaches the standby by itself within seconds (before, the watch
/// stayed on the deleted directory until the next periodic rescan).
#[test]
fn a_deleted_and_recreated_workspace_is_watched_again_without_spinning() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("first.txt"), b"1").unwrap();
    let Pair {
        cpu,
        gpu,
        gst,
        _pki,
    } = static_pair(
        t.path(),
        &src,
        &["--debounce", "100ms", "--rescan-interval", "60s"],
    );
    let arrived = |name: &str, secs: u64| {
        wait_until(Duration::from_secs(secs), || {
            cpu.workspace.join(name).exists()
        })
    };
    let log = || fs::read_to_string(t.path().join("gpu.log")).unwrap_or_default();
    assert!(
        arrived("first.txt", 30),
        "the pair never synced:\n{}",
        log()
    );

    fs::remove_dir_all(&src).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_seconds(gpu.0.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(gpu.0.id()) - before;
    assert!(
        used < 1.0,
        "agent-gpu used {used:.2} s of CPU in 3 s without a workspace"
    );

    fs::create_dir(&src).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    fs::write(src.join("second.txt"), b"2").unwrap();
    assert!(
        arrived("second.txt", 5),
        "not replicated within 5 s of the new workspace:\n{}",
        log()
    );

    // Its state directory gone too (the machine's disk wiped under it): still no spinning.
    fs::remove_dir_all(&gst).unwrap();
    fs::remove_dir_all(&src).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_seconds(gpu.0.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(gpu.0.id()) - before;
    assert!(
        used < 1.0,
        "agent-gpu used {used:.2} s of CPU in 3 s without its directories:\n{}",
        log()
    );
}

/// `agent-gpu status` with the standby down: the bytes written since are pending (planned
/// against the last durable generation, not left at 0), the RPO age grows, and the epoch and
/// generation are the replica's; once the standby is back and a flush returns, nothing is.
#[test]
fn status_tells_what_waits_while_the_standby_is_down() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("first.txt"), b"1").unwrap();
    let Pair {
        mut cpu,
        gpu: _gpu,
        gst,
        _pki,
    } = static_pair(t.path(), &src, &["--debounce", "100ms"]);
    let status = || -> serde_json::Value {
        let out = Command::new(AGENT_GPU)
            .args(["status", "--state-dir"])
            .arg(&gst)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(30), || {
        cpu.workspace.join("first.txt").exists()
    }));
    let synced = status();
    assert!(synced["generation"].as_u64() >= Some(1), "{synced}");

    cpu.kill();
    fs::write(src.join("unsynced.bin"), vec![3u8; 1 << 20]).unwrap();
    let mut seen = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        seen = status();
        seen["pending_bytes"].as_u64() >= Some(1 << 20) && seen["rpo_age_ms"].as_u64() > Some(0)
    });
    assert!(ok, "status while the standby is down: {seen}");
    assert_eq!(seen["epoch"], synced["epoch"]);

    cpu.restart();
    let out = flush(&gst, "60s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = status();
    assert_eq!(
        (
            after["pending_bytes"].as_u64(),
            after["rpo_age_ms"].as_u64()
        ),
        (Some(0), Some(0)),
        "{after}"
    );
    assert_same(&src, &cpu.workspace);
}

/// `--bwlimit`: 4 MiB of incompressible data at 1 MB/s takes about 4 s to reach the standby
/// (at least 3 s: the bucket starts with a tenth of a second's burst), and arrives whole.
#[test]
fn bwlimit_paces_the_replication_stream() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let Pair {
        cpu,
        gpu: _gpu,
        gst,
        _pki,
    } = static_pair(t.path(), &src, &["--debounce", "100ms", "--bwlimit", "1MB"]);
    let flush = || flush(&gst, "60s");
    assert!(wait_until(Duration::from_secs(30), || flush()
        .status
        .success()));
    let mut data = vec![0u8; 4 << 20];
    rng(seed("bwlimit")).fill_bytes(&mut data);
    fs::write(src.join("big.bin"), &data).unwrap();
    let started = Instant::now();
    let out = flush();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_secs(3),
        "4 MiB at 1 MB/s took only {took:?}"
    );
    assert_eq!(fs::read(cpu.workspace.join("big.bin")).unwrap(), data);
}

/// `.standbyignore` (gitignore syntax) keeps caches off the standby; taking a pattern out lets
/// its files follow at the next generation, wherever they are.
#[test]
fn standbyignore_keeps_caches_off_the_standby() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("pkg/__pycache__")).unwrap();
    fs::write(src.join(".standbyignore"), "__pycache__/\n*.tmp\n").unwrap();
    fs::write(src.join("pkg/mod.py"), b"x = 1\n").unwrap();
    fs::write(src.join("pkg/__pycache__/mod.pyc"), b"cache").unwrap();
    fs::write(src.join("pkg/scratch.tmp"), b"scratch").unwrap();
    let Pair {
        cpu,
        gpu: _gpu,
        gst,
        _pki,
    } = static_pair(t.path(), &src, &["--debounce", "100ms"]);
    let flush = || flush(&gst, "60s");
    assert!(wait_until(Duration::from_secs(30), || flush()
        .status
        .success()));
    let replica = &cpu.workspace;
    assert_eq!(fs::read(replica.join("pkg/mod.py")).unwrap(), b"x = 1\n");
    assert!(replica.join(".standbyignore").exists());
    assert!(
        !replica.join("pkg/__pycache__").exists(),
        "an ignored directory was sent"
    );
    assert!(
        !replica.join("pkg/scratch.tmp").exists(),
        "an ignored file was sent"
    );

    fs::write(src.join(".standbyignore"), "__pycache__/\n").unwrap();
    assert!(flush().status.success());
    assert_eq!(
        fs::read(replica.join("pkg/scratch.tmp")).unwrap(),
        b"scratch"
    );
    assert!(!replica.join("pkg/__pycache__").exists());
}

/// Sets extended attribute `name` of `path` (never through a symlink).
fn set_xattr(path: &std::path::Path, name: &str, value: &[u8]) {
    use std::os::fd::AsFd;
    let dir = standby::disk::fsx::open_dir_path(path.parent().unwrap()).unwrap();
    let inode =
        standby::disk::xattr::Inode::at(dir.as_fd(), path.file_name().unwrap().as_encoded_bytes())
            .unwrap();
    inode.set(name.as_bytes(), value).unwrap();
}

fn xattr_of(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    standby::disk::xattr::get_path(path, name.as_bytes()).unwrap()
}

fn owner_of(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

/// As `rsync -aX` run as root: numeric owner and group, and extended attributes, reach the
/// standby (a root receiver applies the owner); a change of owner alone, or of an attribute
/// alone (neither moves the mtime), makes a generation of its own; the setuid bit a chown
/// clears is set again after it (`--keep-setuid`).
#[test]
fn ownership_and_extended_attributes_reach_the_standby() {
    let test = "ownership_and_extended_attributes_reach_the_standby";
    if !privileged(test) {
        return;
    }
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("dir/owned.txt"), b"owned").unwrap();
    fs::write(src.join("tool"), b"#!/bin/sh\n").unwrap();
    symlink("dir/owned.txt", src.join("link")).unwrap();
    std::os::unix::fs::lchown(src.join("dir/owned.txt"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(src.join("dir"), Some(1001), Some(1002)).unwrap();
    std::os::unix::fs::lchown(src.join("link"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(src.join("tool"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    set_xattr(&src.join("dir/owned.txt"), "user.standby.test", b"hello");
    set_xattr(&src.join("dir"), "user.standby.dir", b"d");
    set_xattr(&src.join("dir/owned.txt"), "trusted.standby", b"root only");

    let cpu = Cpu::start_with(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
        "127.0.0.1:0",
        &["--keep-setuid"],
        &[],
    );
    let gtls = pki.node("p", Role::Gpu);
    let gst = t.path().join("gpu");
    let r1 = once(&src, &gst, &gtls, &cpu.addr);
    let rep = &cpu.workspace;
    assert_same(&src, rep);
    assert_eq!(owner_of(&rep.join("dir/owned.txt")), (1234, 5678));
    assert_eq!(owner_of(&rep.join("dir")), (1001, 1002));
    assert_eq!(
        owner_of(&rep.join("link")),
        (1234, 5678),
        "the symlink itself"
    );
    assert_eq!(owner_of(&rep.join("tool")), (1234, 5678));
    let mode = fs::metadata(rep.join("tool")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode, 0o4755,
        "setuid set again after the chown that clears it"
    );
    let owned = rep.join("dir/owned.txt");
    assert_eq!(
        xattr_of(&owned, "user.standby.test").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        xattr_of(&owned, "trusted.standby").as_deref(),
        Some(&b"root only"[..])
    );
    assert_eq!(
        xattr_of(&rep.join("dir"), "user.standby.dir").as_deref(),
        Some(&b"d"[..])
    );

    // Nothing changed: nothing sent again (attributes come from the index, not re-read).
    let r2 = once(&src, &gst, &gtls, &cpu.addr);
    assert_eq!(r2["files_changed"], 0, "{r2}");
    assert_eq!(r2["root"], r1["root"]);

    // The owner alone changes (the mtime does not): a generation, the replica follows.
    let mtime = fs::metadata(src.join("dir/owned.txt"))
        .unwrap()
        .modified()
        .unwrap();
    std::os::unix::fs::lchown(src.join("dir/owned.txt"), Some(4321), Some(8765)).unwrap();
    assert_eq!(
        fs::metadata(src.join("dir/owned.txt"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    let r3 = once(&src, &gst, &gtls, &cpu.addr);
    assert_eq!(r3["files_changed"], 1, "{r3}");
    assert_ne!(r3["root"], r1["root"]);
    assert_eq!(owner_of(&owned), (4321, 8765));
    assert_eq!(fs::read(&owned).unwrap(), b"owned");

    // An attribute alone changes, another goes: the replica follows.
    set_xattr(&src.join("dir/owned.txt"), "user.standby.test", b"again");
    let dir = standby::disk::fsx::open_dir_path(&src.join("dir")).unwrap();
    let inode = standby::disk::xattr::Inode::at(std::os::fd::AsFd::as_fd(&dir), b"owned.txt");
    inode.unwrap().remove(b"trusted.standby").unwrap();
    let r4 = once(&src, &gst, &gtls, &cpu.addr);
    assert_eq!(r4["files_changed"], 1, "{r4}");
    assert_eq!(
        xattr_of(&owned, "user.standby.test").as_deref(),
        Some(&b"again"[..])
    );
    assert_eq!(xattr_of(&owned, "trusted.standby"), None);
    assert_eq!(owner_of(&owned), (4321, 8765));

    // The replica as a sender sees it (a promoted standby, a restore's source): sent on to a
    // second receiver, its scan finds the same owners and attributes, to the same root.
    let cpu2 = Cpu::start(
        &t.path().join("replica2"),
        &t.path().join("cpu2"),
        &pki.node("p", Role::Cpu),
    );
    let r5 = once(rep, &t.path().join("hop"), &gtls, &cpu2.addr);
    assert_eq!(
        r5["root"], r4["root"],
        "the replica holds what the source held"
    );
    let owned2 = cpu2.workspace.join("dir/owned.txt");
    assert_eq!(owner_of(&owned2), (4321, 8765));
    assert_eq!(owner_of(&cpu2.workspace.join("link")), (1234, 5678));
    assert_eq!(
        xattr_of(&owned2, "user.standby.test").as_deref(),
        Some(&b"again"[..])
    );
}

/// In continuous mode a chown or setxattr alone (an inotify attribute event, no write) reaches
/// the standby by itself, without waiting for the periodic rescan.
#[test]
fn an_ownership_or_attribute_change_alone_is_replicated_continuously() {
    let test = "an_ownership_or_attribute_change_alone_is_replicated_continuously";
    if !privileged(test) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"f").unwrap();
    let pair = static_pair(
        t.path(),
        &src,
        &["--debounce", "100ms", "--rescan-interval", "1h"],
    );
    assert!(wait_until(Duration::from_secs(30), || flush(
        &pair.gst, "60s"
    )
    .status
    .success()));
    let rep = pair.cpu.workspace.join("f");
    std::os::unix::fs::lchown(src.join("f"), Some(1234), Some(5678)).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || owner_of(&rep) == (1234, 5678)),
        "the owner did not follow: {:?}",
        owner_of(&rep)
    );
    set_xattr(&src.join("f"), "user.standby.test", b"live");
    assert!(
        wait_until(Duration::from_secs(10), || xattr_of(
            &rep,
            "user.standby.test"
        )
        .as_deref()
            == Some(&b"live"[..])),
        "the attribute did not follow"
    );
}
