//! `coordinator machines stop-all`: the machines the `local` provider started outlive the
//! coordinator (by design); once it is stopped, this verb stops every one of their agents,
//! keeps their directories (or deletes them with `--remove`), and touches nothing else.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The pid of a local machine's agent while it runs.
fn running_pid(coord: &Coord, label: &str) -> Option<i32> {
    let pid: i32 = fs::read_to_string(coord.dir.join("machines").join(label).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_running(pid).then_some(pid)
}

/// Whether `pid` is a live process (a zombie is not).
fn is_running(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn stop_all(coord: &Coord, extra: &[&str]) -> String {
    let out = Command::new(COORDINATOR)
        .args(["machines", "stop-all", "--dir"])
        .arg(&coord.dir)
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn stop_all_stops_the_local_machines_left_by_a_stopped_coordinator() {
    let t = tempfile::tempdir().unwrap();
    let _reaper = MachineReaper(t.path().join("coord/machines"));
    let mut coord = local_coord(&t.path().join("coord"));
    let name = "leftover";
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), name, 50);
    // The GPU dies: the local provider starts a replacement machine (an agent process), which
    // joins, is restored and takes the primary role back.
    drop(gpu);
    wait_state(&coord, name, "Syncing", 3, 120, &[&cpu.log]);
    let label = gpu_machine(&coord, name);
    assert_eq!(machines(&coord), std::slice::from_ref(&label));
    let pid = running_pid(&coord, &label).expect("the machine's agent runs");
    coord.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert!(is_running(pid), "the machine outlives the coordinator");

    let text = stop_all(&coord, &["--grace", "5s"]);
    assert!(
        text.contains(&format!("{label}: stopped its agent (pid {pid})")),
        "{text}"
    );
    assert!(
        !is_running(pid),
        "agent {pid} still runs after stop-all: {text}"
    );
    assert!(
        machine_state(&coord, &label).exists(),
        "kept without --remove"
    );
    // The agent joined by hand is not a local machine: untouched.
    assert!(
        is_running(cpu.pid()),
        "stop-all stopped an agent it did not start"
    );
    assert!(fs::read_dir(&cpu.workspace).unwrap().count() > 0);

    let text = stop_all(&coord, &["--remove"]);
    assert!(
        text.contains(&format!(
            "{label}: its agent was not running; directory deleted"
        )),
        "{text}"
    );
    assert!(machines(&coord).is_empty(), "{:?}", machines(&coord));
}
