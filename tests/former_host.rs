//! Issue 13's attack, end to end: a GPU machine fails, the pair recovers onto a new GPU, and the
//! *former* GPU host — it keeps its disk, its key and its certificate — tries to get back in:
//! with the stock agent and a forged durable epoch straight to the CPU, with a raw client
//! claiming a huge epoch, and with a heartbeat to the coordinator under the next machine label.
//! Each is refused, the replica stays exactly as it was, the real GPU keeps replicating, and an
//! event and a metric say who was refused. Also: certificates that live 20 s renew across two
//! minutes of replication without a hiccup, and a retired agent is cut off within a heartbeat.

mod common;
mod raw;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use raw::raw;
use standby::disk::epoch::EpochStore;
use standby::trust::identity::{Identity, Role};
use standby::trust::pki::Ca;
use standby::trust::tls::TlsMaterial;
use standby::types::Epoch;

const PAIR: &str = "heist";

/// The pair's events as JSON objects.
fn events(coord: &Coord) -> Vec<serde_json::Value> {
    let out = coord.admin(&["events", "--json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Whether an event of `kind` mentions `needle`.
fn has_event(coord: &Coord, kind: &str, needle: &str) -> bool {
    events(coord)
        .iter()
        .any(|e| e["kind"] == kind && e["message"].as_str().is_some_and(|m| m.contains(needle)))
}

/// The sum of a counter's samples whose labels contain `labels`.
fn metric(coord: &Coord, name: &str, labels: &str) -> f64 {
    http_get(&coord.metrics, "/metrics")
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn serial(tls: &Path) -> String {
    TlsMaterial::load(tls).unwrap().facts().serial
}

/// The CPU agent's durable epoch, as its state directory holds it.
fn durable_epoch(state: &Path) -> u64 {
    EpochStore::open(state).unwrap().get().0
}

/// The label the coordinator would give the next machine it provisions: one more than `label`'s
/// trailing number (an attacker can guess it just as well).
fn next_label(label: &str) -> String {
    let (stem, n) = label.rsplit_once('-').expect("numbered label");
    format!("{stem}-{}", n.parse::<u64>().expect("number") + 1)
}

/// Runs the stock agent-gpu as the former host for a few seconds against the coordinator,
/// claiming to be `machine`; returns its log.
fn former_heartbeats(coord: &Coord, ws: &Path, state: &Path, machine: &str) -> String {
    let log = state.with_extension("former.log");
    let mut child = Command::new(AGENT_GPU)
        .args(["--workspace", ws.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--coordinator", &coord.addr, "--listen", "127.0.0.1:0"])
        .args(["--machine", machine])
        .env("STANDBY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let _ = child.kill();
    let _ = child.wait();
    fs::read_to_string(&log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_former_gpu_host_cannot_touch_the_replica_after_recovery() {
    let t = tempfile::tempdir().unwrap();
    let _reaper = MachineReaper(t.path().join("coord/machines"));
    let coord = local_coord(&t.path().join("coord"));
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), PAIR, 40);
    let former_state = gpu.state.clone();
    let former_tls = former_state.join("tls");
    let former_serial = serial(&former_tls);

    // The GPU host drops off the marketplace; the pair fails over and recovers onto a new GPU.
    drop(gpu);
    wait_state(&coord, PAIR, "Syncing", 3, 150, &[&cpu.log]);
    let label = gpu_machine(&coord, PAIR);
    let (new_ws, new_state) = (machine_ws(&coord, &label), machine_state(&coord, &label));
    assert_same(&cpu.workspace, &new_ws);
    let cpu_addr = coord.pair(PAIR).unwrap()["cpu"]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let replica = snapshot(&cpu.workspace);
    let cpu_epoch = durable_epoch(&cpu.state);
    assert_eq!(cpu_epoch, 3);

    // The former host comes back with its own key and certificate and a forged durable epoch,
    // and plants a file with the stock agent.
    EpochStore::open(&former_state)
        .unwrap()
        .raise(Epoch(1_000_000))
        .unwrap();
    let evil_ws = t.path().join("evil-ws");
    fs::create_dir_all(&evil_ws).unwrap();
    fs::write(evil_ws.join("planted.txt"), b"owned\n").unwrap();
    let out = once_raw(&evil_ws, &former_state, &former_tls, &cpu_addr);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the former host synced: {stderr}");
    println!(
        "stock agent-gpu --once from the former host: {}",
        stderr.trim()
    );
    assert!(!cpu.workspace.join("planted.txt").exists());
    assert_eq!(diff(&replica, &snapshot(&cpu.workspace)), "");
    assert_eq!(
        durable_epoch(&cpu.state),
        cpu_epoch,
        "the CPU adopted an epoch"
    );

    // A raw client with a valid, never revoked certificate of the GPU seat for another machine
    // (as if the CA had been tricked into one) claims a huge epoch: refused, epoch unchanged.
    let ca = Ca::load(&coord.dir).unwrap();
    let intruder = t.path().join("intruder-tls");
    ca.issue(
        &Identity::node(PAIR, Role::Gpu, "intruder").unwrap(),
        standby::trust::pki::days(1),
        &[],
    )
    .unwrap()
    .write_dir(&intruder)
    .unwrap();
    for epoch in [1_000_000, cpu_epoch, cpu_epoch - 1] {
        let e = raw(&cpu_addr, &intruder, epoch)
            .await
            .err()
            .unwrap_or_else(|| panic!("a session at epoch {epoch} from another machine"));
        println!("raw client, machine intruder, epoch {epoch}: {e}");
        assert_eq!(durable_epoch(&cpu.state), cpu_epoch);
    }
    // The former host's own certificate does not get a TLS session at all: it is revoked.
    let e = raw(&cpu_addr, &former_tls, 1_000_000)
        .await
        .err()
        .expect("revoked");
    println!("raw client with the former host's certificate: {e}");

    // It heartbeats to the coordinator as the next machine label, hoping to be "joined" as the
    // replacement: refused, and the pair is unchanged.
    let guess = next_label(&label);
    let log = former_heartbeats(&coord, &evil_ws, &former_state, &guess);
    assert!(!log.contains("panicked"), "{log}");
    let p = coord.pair(PAIR).unwrap();
    assert_eq!(
        (p["state"].as_str(), p["epoch"].as_u64()),
        (Some("Syncing"), Some(3))
    );
    assert_eq!(gpu_machine(&coord, PAIR), label);

    // The real GPU keeps replicating.
    fs::write(new_ws.join("after-the-attack.txt"), b"still ours\n").unwrap();
    let out = flush(&new_state, "30s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&new_ws, &cpu.workspace);
    assert!(!cpu.workspace.join("planted.txt").exists());

    // An event and a metric say who was refused.
    let ok = wait_until(Duration::from_secs(10), || {
        has_event(&coord, "refused", &former_serial)
            && metric(&coord, "standby_refused_total", "revoked") >= 1.0
    });
    assert!(
        ok,
        "no refusal event or metric for serial {former_serial}: {:#?}\n{}",
        events(&coord),
        http_get(&coord.metrics, "/metrics")
    );
}

/// Certificates that live 20 s, across two minutes of writes, flushes and heartbeats: every
/// flush succeeds, the pair never leaves Syncing, and both agents renewed several times.
#[test]
fn twenty_second_certificates_renew_without_a_hiccup() {
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &["--cert-lifetime", "20s"]);
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), PAIR, 20);
    let tls = |m: &Managed| m.state.join("tls");
    let mut seen = [vec![serial(&tls(&gpu))], vec![serial(&tls(&cpu))]];
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(120) {
        fs::write(gpu.workspace.join(format!("w-{i}.txt")), format!("{i}\n")).unwrap();
        let out = flush(&gpu.state, "20s");
        assert!(
            out.status.success(),
            "flush {i} at {:?}: {}\n{}\n{}",
            start.elapsed(),
            String::from_utf8_lossy(&out.stderr),
            gpu.log_text(),
            cpu.log_text()
        );
        assert_eq!(state(&coord, PAIR), ("Syncing".to_string(), 1));
        for (s, m) in seen.iter_mut().zip([&gpu, &cpu]) {
            let now = serial(&tls(m));
            if s.last() != Some(&now) {
                s.push(now);
            }
        }
        i += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_same(&gpu.workspace, &cpu.workspace);
    for (who, s) in ["gpu", "cpu"].iter().zip(&seen) {
        println!("{who}: {} certificates in two minutes", s.len());
        assert!(s.len() >= 5, "{who} renewed only {} times", s.len() - 1);
    }
    let transitions = events(&coord)
        .into_iter()
        .filter(|e| e["kind"] == "transition" && e["pair"] == PAIR)
        .count();
    assert_eq!(
        transitions,
        1,
        "only Pending -> Syncing: {:#?}",
        events(&coord)
    );
}

/// An operator's failover retires the GPU machine: its certificate is revoked, its heartbeat
/// stream ends within a heartbeat, and nothing it sends reaches the replica any more.
#[test]
fn a_retired_agent_is_cut_off_within_a_heartbeat() {
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &[]);
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), PAIR, 20);
    let gpu_serial = serial(&gpu.state.join("tls"));
    let replica = snapshot(&cpu.workspace);

    let out = coord.admin(&["failover", PAIR]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cut = Instant::now();
    let ok = wait_until(Duration::from_secs(5), || {
        gpu.log_text().to_lowercase().contains("revoked")
    });
    println!("GPU cut off after {:?}", cut.elapsed());
    assert!(ok, "the GPU was not cut off:\n{}", gpu.log_text());
    assert!(
        cut.elapsed() < Duration::from_secs(3),
        "{:?}",
        cut.elapsed()
    );

    // Whatever it writes now never reaches the CPU, and the CPU refuses its certificate.
    fs::write(gpu.workspace.join("after-retirement.txt"), b"late\n").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!cpu.workspace.join("after-retirement.txt").exists());
    assert_eq!(diff(&replica, &snapshot(&cpu.workspace)), "");
    let ok = wait_until(Duration::from_secs(10), || {
        has_event(&coord, "refused", &gpu_serial)
    });
    assert!(ok, "no refusal event: {:#?}", events(&coord));
}
