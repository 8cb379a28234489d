//! Setuid programs and a FIFO in the GPU workspace.

use super::*;

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Sets a path's mtime an hour back, so no entry is "racily clean" (re-hashed next time).
fn age_an_hour(p: &Path) {
    let t = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::open(p)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// `agent-gpu --once`, failing the test (rather than hanging it) should it never end.
fn once_within_a_minute(src: &Path, state: &Path, tls: &Path, peer: &str) -> serde_json::Value {
    let (tx, rx) = std::sync::mpsc::channel();
    let (src, state, tls, peer) = (
        src.to_owned(),
        state.to_owned(),
        tls.to_owned(),
        peer.to_owned(),
    );
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(|| once(&src, &state, &tls, &peer)));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(report)) => report,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("agent-gpu --once did not finish: stalled on something in the workspace"),
    }
}

/// A setuid and a setgid program and a setgid directory on the GPU reach the replica with their
/// content but without those bits; a FIFO beside them (which would block a reader forever) is
/// skipped and the rest replicates. Sending again sends nothing: the sender's index keeps the
/// sender's modes, so the masked replica never looks out of date.
#[test]
fn setuid_bits_are_masked_on_the_replica_and_a_fifo_does_not_stall_the_sender() {
    let pki = Pki::new();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    let files: [(&str, &[u8], u32); 3] = [
        ("bin/suid", b"#!/bin/sh\nid\n", 0o4755),
        ("bin/sgid", b"#!/bin/sh\nid -g\n", 0o2711),
        ("data.txt", b"plain data", 0o640),
    ];
    for (p, data, mode) in files {
        fs::write(src.join(p), data).unwrap();
        fs::set_permissions(src.join(p), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::set_permissions(src.join("bin"), fs::Permissions::from_mode(0o2775)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("bin/pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    for p in ["bin/suid", "bin/sgid", "data.txt", "bin"] {
        age_an_hour(&src.join(p));
    }
    let replica = t.path().join("replica");
    let cpu = Cpu::start(&replica, &t.path().join("cpu"), &pki.node("p", Role::Cpu));
    let (state, tls) = (t.path().join("gpu"), pki.node("p", Role::Gpu));

    let first = once_within_a_minute(&src, &state, &tls, &cpu.addr);
    assert_eq!(
        first["files_total"], 3,
        "the FIFO is no file to send: {first}"
    );
    for (p, data, mode) in files {
        assert_eq!(fs::read(replica.join(p)).unwrap(), data, "{p}: content");
        assert_eq!(mode_of(&replica.join(p)), mode & !0o6000, "{p}: mode");
    }
    assert_eq!(mode_of(&replica.join("bin")), 0o775, "bin: mode");
    assert!(
        !replica.join("bin/pipe").exists(),
        "a FIFO is not replicated"
    );
    // The sender's own files are untouched.
    assert_eq!(mode_of(&src.join("bin/suid")), 0o4755);

    let again = once_within_a_minute(&src, &state, &tls, &cpu.addr);
    assert_eq!(again["files_changed"], 0, "nothing is sent again: {again}");
    assert_eq!(again["root"], first["root"]);
    assert_eq!(mode_of(&replica.join("bin/suid")), 0o755);
    assert_no_panic(&cpu.log_text());
}

// ---- Hostile agents and admins at the coordinator -------------------------------------------
