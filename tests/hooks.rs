//! `--on-promote` on both agents: the CPU standby runs it at a failover, the replacement GPU
//! (rented from the `local` provider) runs it when the pair cuts over to it, at the epoch after
//! the failover, and a pair's first GPU, the primary from the start, never does.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

/// A hook that appends its name and epoch to `marker`.
fn hook(marker: &Path, who: &str) -> String {
    format!("echo {who} $STANDBY_EPOCH >> {}", marker.display())
}

fn marker_lines(marker: &Path) -> Vec<String> {
    fs::read_to_string(marker)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// A directory of agent binaries for the local provider whose agent-gpu adds `--on-promote`
/// (the provider starts agents with its own flags only).
fn hooked_bin_dir(dir: &Path, marker: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    let script = format!(
        "#!/bin/sh\nexec {} \"$@\" --on-promote '{}'\n",
        AGENT_GPU,
        hook(marker, "rented-gpu")
    );
    let gpu = dir.join("agent-gpu");
    fs::write(&gpu, script).unwrap();
    fs::set_permissions(&gpu, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(AGENT_CPU, dir.join("agent-cpu")).unwrap();
    dir.display().to_string()
}

#[test]
fn a_replacement_gpu_runs_on_promote_at_cutover_and_a_first_gpu_never_does() {
    let t = tempfile::tempdir().unwrap();
    let _reaper = MachineReaper(t.path().join("coord/machines"));
    let marker = t.path().join("promoted");
    let bins = hooked_bin_dir(&t.path().join("bin"), &marker);
    let coord = Coord::start(
        &t.path().join("coord"),
        &[
            "--provider",
            "local",
            "--agent-bin-dir",
            &bins,
            "--boot-timeout",
            "60s",
        ],
    );
    let name = "hooked";
    let ws = t.path().join("gpu-ws");
    make_tree(&ws, &mut rng(seed(name)), 40, &[1 << 20]);
    let cpu = Managed::cpu(
        &coord.addr,
        Some(&coord.token(name, "cpu", "10m")),
        &t.path().join("cpu-ws"),
        &t.path().join("cpu-state"),
        &["--on-promote", &hook(&marker, "cpu")],
    );
    let first = Managed::gpu(
        &coord.addr,
        Some(&coord.token(name, "gpu", "10m")),
        &ws,
        &t.path().join("gpu-state"),
        &[
            "--debounce",
            "100ms",
            "--on-promote",
            &hook(&marker, "first-gpu"),
        ],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Syncing")
            && flush(&first.state, "20s").status.success()
    });
    assert!(ok, "{}\n{}", coord.log_text(), first.log_text());
    assert!(
        marker_lines(&marker).is_empty(),
        "{:?}",
        marker_lines(&marker)
    );
    // kill -9 of the first GPU: failover to the CPU at epoch 2, a GPU rented, restored, and
    // the pair cut over to it at epoch 3.
    drop(first);
    wait_state(&coord, name, "Syncing", 3, 120, &[&cpu.log]);
    let want = ["cpu 2", "rented-gpu 3"];
    let ok = wait_until(Duration::from_secs(10), || marker_lines(&marker) == want);
    let gpu = gpu_machine(&coord, name);
    assert!(
        ok,
        "{:?}\n{}",
        marker_lines(&marker),
        fs::read_to_string(coord.dir.join("machines").join(&gpu).join("agent.log"))
            .unwrap_or_default()
    );
    assert_same(&cpu.workspace, &machine_ws(&coord, &gpu));
    // Once per promotion: nothing more runs while the pair stays in sync.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(marker_lines(&marker), want);
}
