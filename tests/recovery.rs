//! Auto-recovery with the `local` provider and real processes: a killed GPU agent is replaced
//! by a new machine, the workspace is restored onto it and verified, the roles flip back at
//! cutover (nothing written on the CPU meanwhile is lost), hibernate and wake, and a coordinator
//! killed in the middle of provisioning resumes without creating a second machine.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

struct Pair {
    gpu: Managed,
    cpu: Managed,
}

fn start_pair(coord: &Coord, t: &Path, name: &str) -> Pair {
    let ws = t.join("gpu-ws");
    let mut rng = rng(seed(name));
    make_tree(&ws, &mut rng, 300, &[3 << 20]);
    fs::create_dir_all(ws.join("ckpt")).unwrap();
    fs::write(ws.join("ckpt/step-100.pt"), vec![7u8; 2 << 20]).unwrap();
    let cpu = Managed::cpu(
        &coord.addr,
        Some(&coord.token(name, "cpu", "10m")),
        &t.join("cpu-ws"),
        &t.join("cpu-state"),
        &[],
    );
    let gpu = Managed::gpu(
        &coord.addr,
        Some(&coord.token(name, "gpu", "10m")),
        &ws,
        &t.join("gpu-state"),
        &["--debounce", "100ms"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Syncing")
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(ok, "{}\n{}", coord.log_text(), gpu.log_text());
    assert_same(&ws, &cpu.workspace);
    Pair { gpu, cpu }
}

/// The pair's last durable generation once everything written on the GPU (its state
/// directory) is durable on the CPU and the coordinator has heard of it.
fn durable_generation(coord: &Coord, name: &str, gpu_state: &Path) -> u64 {
    let out = flush(gpu_state, "30s");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flushed: u64 = said
        .trim()
        .strip_prefix("durable: generation ")
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("flush printed {said:?}"));
    let mut listed = 0;
    let ok = wait_until(Duration::from_secs(15), || {
        listed = coord.pair(name).unwrap()["last_durable_generation"]
            .as_u64()
            .unwrap();
        listed >= flushed
    });
    assert!(
        ok,
        "pairs shows generation {listed}, the GPU flushed {flushed}"
    );
    listed
}

/// The standby's snapshots (through the coordinator): never two different trees under one
/// generation number, and the newest generation (after a flush) among them.
fn no_generation_twice_in_history(coord: &Coord, name: &str, newest: u64) {
    let mut list = Vec::new();
    let ok = wait_until(Duration::from_secs(30), || {
        let out = coord.admin(&["versions", name, "--json"]);
        list = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        list.iter().any(|s| s["generation"] == newest)
    });
    assert!(ok, "no snapshot of generation {newest}: {list:?}");
    let mut roots = std::collections::BTreeMap::new();
    for s in &list {
        let g = s["generation"].as_u64().unwrap();
        let root = s["root"].as_str().unwrap();
        let first = roots.entry(g).or_insert(root);
        assert_eq!(*first, root, "two trees as generation {g}: {list:?}");
    }
}

#[test]
fn full_recovery_after_kill_then_hibernate_and_wake() {
    let t = tempfile::tempdir().unwrap();
    let _reaper = MachineReaper(t.path().join("coord/machines"));
    let coord = local_coord(&t.path().join("coord"));
    let name = "heal";
    let p = start_pair(&coord, t.path(), name);
    let Pair { gpu, cpu } = p;
    let before = durable_generation(&coord, name, &gpu.state);

    // The GPU dies.
    let killed = std::time::Instant::now();
    drop(gpu);
    let ok = wait_until(Duration::from_secs(20), || {
        coord
            .pair(name)
            .is_some_and(|p| p["epoch"] == 2 && p["primary"] == "cpu")
    });
    assert!(ok, "no failover: {}", coord.log_text());
    // While the CPU is the primary, the application writes there.
    fs::write(
        cpu.workspace.join("written-on-cpu.txt"),
        b"during failover\n",
    )
    .unwrap();
    fs::create_dir_all(cpu.workspace.join("ckpt")).unwrap();
    fs::write(cpu.workspace.join("ckpt/step-200.pt"), vec![9u8; 1 << 20]).unwrap();
    fs::remove_file(cpu.workspace.join("ckpt/step-100.pt")).unwrap();

    // A new GPU machine is provisioned, restored, verified, and becomes the primary again.
    wait_state(&coord, name, "Syncing", 3, 120, &[&cpu.log]);
    let healed = killed.elapsed();
    println!(
        "recovery (kill -9 to Syncing on a new GPU): {} ms",
        healed.as_millis()
    );
    let label = gpu_machine(&coord, name);
    assert!(label.contains("-heal-gpu-"), "{label}");
    let new_ws = machine_ws(&coord, &label);
    assert_same(&cpu.workspace, &new_ws);
    assert_eq!(
        fs::read(new_ws.join("written-on-cpu.txt")).unwrap(),
        b"during failover\n"
    );
    assert!(!new_ws.join("ckpt/step-100.pt").exists());
    assert_eq!(coord.pair(name).unwrap()["primary"], "gpu");

    // Replication runs GPU -> CPU again.
    fs::write(new_ws.join("after-cutover.txt"), b"new primary\n").unwrap();
    let out = flush(&machine_state(&coord, &label), "30s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&new_ws, &cpu.workspace);
    // Generations are numbered pair-wide: the new GPU continued from the pair's number (it
    // once started again at 1, so `pairs` showed the generation dropping after each recovery).
    let healed_at = durable_generation(&coord, name, &machine_state(&coord, &label));
    assert!(
        healed_at > before,
        "generation {healed_at} after the recovery, {before} before the failure"
    );
    println!("generation {before} before the failure, {healed_at} after the recovery");
    no_generation_twice_in_history(&coord, name, healed_at);
    assert_eq!(
        machines(&coord),
        vec![label.clone()],
        "exactly the one machine the pair owns"
    );

    // Hibernate: final sync, the GPU machine is destroyed, the CPU keeps everything.
    fs::write(new_ws.join("last-before-sleep.txt"), b"zzz\n").unwrap();
    let out = coord.admin(&["hibernate", name, "--follow"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(&coord, name, "Hibernated", 4, 60, &[&cpu.log]);
    let before_sleep = snapshot(&cpu.workspace);
    assert_eq!(
        fs::read(cpu.workspace.join("last-before-sleep.txt")).unwrap(),
        b"zzz\n"
    );
    assert!(
        wait_until(Duration::from_secs(20), || machines(&coord).is_empty()),
        "the GPU machine was not destroyed: {:?}",
        machines(&coord)
    );

    // Wake: the recovery path, onto yet another machine, with identical data.
    let out = coord.admin(&["wake", name, "--follow"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let follow = String::from_utf8_lossy(&out.stdout);
    assert!(follow.contains("Syncing"), "{follow}");
    assert!(
        !follow.contains('\r'),
        "a progress bar into a pipe: {follow:?}"
    );
    wait_state(&coord, name, "Syncing", 5, 120, &[&cpu.log]);
    let woke = gpu_machine(&coord, name);
    assert_ne!(woke, label);
    let woke_at = durable_generation(&coord, name, &machine_state(&coord, &woke));
    assert!(
        woke_at > healed_at,
        "generation {woke_at} after the wake, {healed_at} before the hibernation"
    );
    println!("generation {woke_at} after the wake");
    let woke_ws = machine_ws(&coord, &woke);
    let after = snapshot(&woke_ws);
    let d = diff(&before_sleep, &after);
    assert!(d.is_empty(), "woken workspace differs: {d}");
    assert_eq!(machines(&coord), vec![woke.clone()]);

    // Manual recover of a healthy pair is refused with a reason.
    let out = coord.admin(&["recover", name]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to recover"));

    // The metrics tell the story.
    let m = http_get(&coord.metrics, "/metrics");
    assert!(m.contains("standby_recovery_seconds_count 2"), "{m}");
    assert!(
        m.contains("standby_provisioning_attempts_total{outcome=\"created\"} 2"),
        "{m}"
    );
    drop(cpu);
}

#[test]
fn coordinator_killed_mid_provisioning_resumes_without_a_duplicate() {
    let t = tempfile::tempdir().unwrap();
    let _reaper = MachineReaper(t.path().join("coord/machines"));
    let mut coord = local_coord(&t.path().join("coord"));
    let name = "again";
    let Pair { gpu, cpu } = start_pair(&coord, t.path(), name);
    drop(gpu);
    let ok = wait_until(Duration::from_secs(30), || !machines(&coord).is_empty());
    assert!(ok, "nothing provisioned: {}", coord.log_text());
    // The machine exists (its agent is starting); the coordinator dies before it learns more.
    coord.kill();
    let during = machines(&coord);
    assert_eq!(during.len(), 1, "{during:?}");
    std::thread::sleep(Duration::from_millis(500));
    coord.restart();
    wait_state(&coord, name, "Syncing", 3, 120, &[&cpu.log]);
    // Either the machine was adopted by its label, or (killed before its agent was started)
    // it was destroyed and replaced: never two, and exactly the pair's one at the end.
    let now = machines(&coord);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(gpu_machine(&coord, name), now[0]);
    println!(
        "{}",
        if now == during {
            "adopted the machine created before the kill"
        } else {
            "the interrupted machine was destroyed and replaced"
        }
    );
    assert_same(&cpu.workspace, &machine_ws(&coord, &now[0]));
}

#[test]
fn an_orphaned_machine_is_swept() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("coord");
    let mut coord = local_coord(&dir);
    // A machine carrying our label prefix that no pair owns (e.g. a create that succeeded
    // after it was given up) appears under the provider.
    let fp = fs::read_dir(&dir).unwrap().count(); // the CA exists
    assert!(fp > 0);
    let prefix = coord_prefix(&coord);
    let orphan = dir.join("machines").join(format!("{prefix}-ghost-gpu-1"));
    fs::create_dir_all(orphan.join("workspace")).unwrap();
    // And one that is not ours (another coordinator's prefix) must be left alone.
    let foreign = dir.join("machines").join("sb-00000000-other-gpu-1");
    fs::create_dir_all(&foreign).unwrap();
    coord.kill();
    coord.args_push(&["--sweep-interval", "1s"]);
    coord.restart();
    let ok = wait_until(Duration::from_secs(20), || !orphan.exists());
    assert!(ok, "orphan not destroyed: {}", coord.log_text());
    assert!(foreign.exists());
    let out = coord.admin(&["events", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no pair owns it"));
}

fn coord_prefix(coord: &Coord) -> String {
    let ca = standby::trust::pki::Ca::load(&coord.dir).unwrap();
    format!("sb-{}", &ca.fingerprint()[..8])
}
