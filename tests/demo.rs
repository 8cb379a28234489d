//! `coordinator demo` runs to the end: a pair on loopback, the GPU agent killed, recovery onto a
//! new local machine, the timeline and an identical blake3 comparison; it cleans up after itself.
//! `coordinator drill` fails a live pair over on purpose and measures each phase against targets.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

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

#[test]
fn a_drill_measures_each_phase_against_targets() {
    let t = tempfile::tempdir().unwrap();
    let cdir = t.path().join("coord");
    std::fs::create_dir_all(&cdir).unwrap();
    let bins = Path::new(AGENT_GPU).parent().unwrap().display().to_string();
    let coord = Coord::start(
        &cdir,
        &[
            "--provider",
            "local",
            "--agent-bin-dir",
            &bins,
            "--boot-timeout",
            "60s",
        ],
    );
    let _reaper = MachineReaper(cdir.join("machines"));
    let name = "drilled";
    // A drill needs a healthy pair.
    let out = coord.admin(&["drill", "nosuch", "--json"]);
    assert!(!out.status.success());
    let (_cpu, _gpu) = hand_joined_pair(&coord, t.path(), name, 100);
    // The restore target is impossible (1 ms): the drill runs to the end and reports it missed.
    let out = coord.admin(&[
        "drill",
        name,
        "--json",
        "--target-restore",
        "1ms",
        "--limit",
        "3m",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(3),
        "a missed target must fail the drill (exit 3):\n{stdout}\n{}",
        coord.log_text()
    );
    println!("{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missed a target"));
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{}", coord.log_text()));
    assert_eq!(report["passed"], false);
    assert_eq!(
        report["epoch_after"],
        report["epoch_before"].as_u64().unwrap() + 2
    );
    let phases: Vec<(String, bool)> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["phase"].as_str().unwrap().to_string(),
                p["met"].as_bool().unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = phases.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        names,
        ["failover", "provisioning", "restore", "cutover", "total"]
    );
    for (p, met) in &phases {
        assert_eq!(*met, p != "restore", "{report}");
    }
    assert_eq!(coord.pair(name).unwrap()["state"], "Syncing");
}
