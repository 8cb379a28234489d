//! `coordinator demo` runs to the end: a pair on loopback, the GPU agent killed, recovery onto a
//! new local machine, the timeline and an identical blake3 comparison; it cleans up after itself.

use std::process::Command;

const COORDINATOR: &str = env!("CARGO_BIN_EXE_coordinator");

#[test]
fn the_demo_runs_to_the_end_and_cleans_up() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("demo");
    let out = Command::new(COORDINATOR)
        .args(["demo", "--dataset-mib", "16", "--dir"])
        .arg(&dir)
        .env_remove("STANDBY_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for want in [
        "SIGKILL to the GPU agent",
        "Timeline (from the SIGKILL, t = 0)",
        "FailedOver",
        "Provisioning",
        "Restoring",
        "CuttingOver",
        "new GPU == CPU replica: identical",
        "file written during failover: present",
        "demo passed",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    assert!(!dir.exists(), "the demo left {} behind", dir.display());
    // Nothing it started is still running.
    let ps = Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output();
    if let Ok(ps) = ps {
        assert!(
            String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
            "processes left: {}",
            String::from_utf8_lossy(&ps.stdout)
        );
    }
}
