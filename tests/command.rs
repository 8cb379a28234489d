//! The `command` provider end to end: the coordinator rents machines through the operator's
//! scripts (here `tests/command-cloud/`, a directory-backed cloud whose machines are real agent
//! processes). A killed GPU is replaced through a create that exits 75 after creating (settled
//! by label, not repeated), the workspace is restored and the pair cuts over; an orphan carrying
//! our prefix is swept; afterwards the cloud holds exactly the machine the pair owns.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

#[test]
fn scripts_replace_a_failed_gpu_and_sweep_orphans() {
    let t = tempfile::tempdir().unwrap();
    let cloud = t.path().join("cloud");
    fs::create_dir_all(&cloud).unwrap();
    let _reaper = MachineReaper(cloud.clone());
    let faults = t.path().join("faults");
    fs::write(&faults, "create-tempfail-once\n").unwrap();
    let cdir = t.path().join("coord");
    let toml = command_cloud_config(&cdir);
    // The scripts' settings reach them through the coordinator's environment.
    let bin_dir = Path::new(AGENT_GPU).parent().unwrap().display().to_string();
    unsafe {
        std::env::set_var("CLOUD_DIR", &cloud);
        std::env::set_var("CLOUD_AGENT_BIN_DIR", &bin_dir);
        std::env::set_var("CLOUD_FAULTS", &faults);
        std::env::set_var("CLOUD_AGENT_ARGS", "--heartbeat-interval 200ms");
    }
    let coord = Coord::start(
        &cdir,
        &[
            "--provider",
            "command",
            "--boot-timeout",
            "60s",
            "--backoff-base",
            "200ms",
            "--sweep-interval",
            "1s",
            "--config",
            toml.to_str().unwrap(),
        ],
    );
    let name = "cmd";
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), name, 200);

    // An orphan with our prefix (a machine no pair owns) and a foreign machine.
    let prefix = format!(
        "sb-{}",
        &standby::trust::pki::Ca::load(&cdir).unwrap().fingerprint()[..8]
    );
    let orphan = format!("{prefix}-gone-gpu-9");
    for m in [orphan.as_str(), "someone-elses-vm"] {
        fs::create_dir_all(cloud.join(m)).unwrap();
        fs::write(cloud.join(m).join("id"), format!("{m}\n")).unwrap();
    }

    drop(gpu);
    // Failover, then a new GPU from the scripts, restored, cut over: epoch 3.
    let ok = wait_until(Duration::from_secs(120), || {
        coord
            .pair(name)
            .is_some_and(|p| p["state"] == "Syncing" && p["epoch"] == 3)
    });
    let mlogs: String = cloud_machines(&cloud)
        .iter()
        .map(|m| {
            format!(
                "\n--- {m}\n{}",
                fs::read_to_string(cloud.join(m).join("agent.log")).unwrap_or_default()
            )
        })
        .collect();
    assert!(
        ok,
        "not recovered: {:?}\n{}{mlogs}",
        coord.pair(name),
        coord.log_text()
    );
    let label = coord.pair(name).unwrap()["gpu"]["machine"]
        .as_str()
        .unwrap()
        .to_string();
    assert_same(&cpu.workspace, &cloud.join(&label).join("workspace"));
    assert!(
        fs::read_to_string(&faults).unwrap().trim().is_empty(),
        "the injected exit 75 was used"
    );
    // The orphan is swept, the foreign machine left alone, nothing else exists.
    let ok = wait_until(Duration::from_secs(30), || {
        cloud_machines(&cloud) == vec![label.clone(), "someone-elses-vm".to_string()]
    });
    assert!(
        ok,
        "machines: {:?}\n{}",
        cloud_machines(&cloud),
        coord.log_text()
    );
    let events = String::from_utf8_lossy(&coord.admin(&["events", "--json"]).stdout).to_string();
    assert!(events.contains(&orphan), "{events}");
    // The ambiguous create was settled by label: one attempt, one machine.
    assert!(label.ends_with("-gpu-1"), "{label}");
    // The join token never shows in any process's command line or in the coordinator log.
    let pid = fs::read_to_string(cloud.join(&label).join("pid")).unwrap();
    let cmdline = fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("join-token"));
    assert!(!coord.log_text().contains("\"join_token\""));
    println!("recovered on {label}");
}
