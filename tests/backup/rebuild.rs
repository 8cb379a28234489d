//! `coordinator recover P --from-backup`: a pair whose two machines are both gone is rebuilt
//! from its off-site backup alone. The `local` provider makes a new CPU standby, which seeds its
//! empty replica from the bucket; then a new GPU is restored from it and becomes the primary.
//! The new GPU's workspace equals the last backed-up generation; both old machines are revoked.

use std::fs;
use std::time::Duration;

use super::common::*;
use super::server;
use standby::trust::seal::{BackupKey, KEY_FILE};

const PAIR: &str = "rb";

/// The bucket's snapshots of the pair (sealed with the pair's key).
async fn backed_up(s3: &server::S3, coord: &Coord) -> usize {
    let key = BackupKey::load(&coord.dir.join(KEY_FILE))
        .unwrap()
        .for_pair(PAIR);
    let bucket = s3.bucket(&format!("s3://standby-backup/fleet/{PAIR}"));
    standby::backup::snapshots(&bucket, &key)
        .await
        .map(|l| l.snapshots.len())
        .unwrap_or(0)
}

/// Every snapshot the standby keeps, the one of its newest generation included, is in the
/// bucket.
fn wait_backed_up(s3: &server::S3, coord: &Coord, generation: u64) {
    let rt = tokio::runtime::Handle::current();
    let mut seen = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(90), || {
        let p = coord.pair(PAIR).unwrap_or_default();
        seen = p["history"].clone();
        let kept = seen["snapshots"].as_u64().unwrap_or(0);
        let n = tokio::task::block_in_place(|| rt.block_on(backed_up(s3, coord)));
        seen["newest_snapshot_generation"].as_u64() >= Some(generation)
            && kept > 0
            && n as u64 == kept
    });
    assert!(
        ok,
        "the newest generation never reached the bucket: {seen}\n{}",
        coord.log_text()
    );
}

/// `agent-gpu flush`: the generation everything written before it is durable in.
fn flushed(state: &std::path::Path) -> u64 {
    let out = flush(state, "30s");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    said.trim()
        .strip_prefix("durable: generation ")
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("flush printed {said:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_that_lost_both_machines_is_rebuilt_from_its_backup() {
    let Some(s3) = server::start("a_pair_that_lost_both_machines_is_rebuilt_from_its_backup")
    else {
        return;
    };
    s3.create_bucket("standby-backup").await;
    let t = tempfile::tempdir().unwrap();
    let _reaper = MachineReaper(t.path().join("coord/machines"));
    let config = t.path().join("coordinator.toml");
    fs::write(
        &config,
        format!(
            "[backup]\nurl = \"s3://standby-backup/fleet\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n",
            s3.endpoint()
        ),
    )
    .unwrap();
    let bins = bin_dir();
    let coord = Coord::start_env(
        &t.path().join("coord"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--provider",
            "local",
            "--agent-bin-dir",
            &bins,
            "--boot-timeout",
            "60s",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
    );
    let (mut cpu, mut gpu) = hand_joined_pair(&coord, t.path(), PAIR, 40);
    let ws = gpu.workspace.clone();
    fs::create_dir_all(ws.join("ckpt")).unwrap();
    fs::write(ws.join("ckpt/step-2.pt"), vec![5u8; 3 << 20]).unwrap();
    assert!(flush(&gpu.state, "30s").status.success());
    // A few generations more, so that a numbering started again from 1 would show.
    let mut generation = 0;
    for i in 0..5 {
        fs::write(ws.join("log.txt"), format!("step {i}\n")).unwrap();
        generation = flushed(&gpu.state);
    }
    wait_backed_up(&s3, &coord, generation);
    let expected = t.path().join("expected");
    copy_tree(&ws, &expected);

    // While its agents live, a rebuild is refused and changes nothing.
    let out = coord.admin(&["recover", PAIR, "--from-backup"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && said.contains("heard from"),
        "{said}"
    );
    assert_eq!(coord.pair(PAIR).unwrap()["epoch"], 1);
    let out = coord.admin(&["recover", PAIR, "--from-backup", "--snapshot", "../etc"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("16 hex digits"));

    // Both machines are lost, their disks with them.
    gpu.proc.kill();
    cpu.proc.kill();
    for d in [&ws, &gpu.state, &cpu.workspace, &cpu.state] {
        fs::remove_dir_all(d).unwrap();
    }
    let ok = wait_until(Duration::from_secs(20), || {
        let out = coord.admin(&["recover", PAIR, "--from-backup"]);
        out.status.success()
    });
    assert!(ok, "{}", coord.log_text());
    assert_eq!(state(&coord, PAIR), ("Rebuilding".into(), 2));

    // A new standby is seeded from the bucket, a new GPU restored from it: epoch 3 at cutover.
    wait_state(&coord, PAIR, "Syncing", 3, 240, &[]);
    let label = gpu_machine(&coord, PAIR);
    assert!(label.contains(&format!("-{PAIR}-gpu-")), "{label}");
    let new_ws = machine_ws(&coord, &label);
    assert_same(&expected, &new_ws);
    let owned = machines(&coord);
    assert_eq!(owned.len(), 2, "one new CPU and one new GPU: {owned:?}");
    assert!(owned.iter().any(|m| m.contains(&format!("-{PAIR}-cpu-"))));
    let events = coord.admin(&["events"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("holds backup snapshot"), "{events}");

    // Replication runs again from the new GPU, and the pair's numbering went on from the
    // backup's generation (the seed is that generation; it once started again at 1).
    fs::write(new_ws.join("after-rebuild.txt"), b"alive\n").unwrap();
    let now = flushed(&machine_state(&coord, &label));
    println!("generation {generation} backed up, {now} after the rebuild");
    assert!(
        now > generation + 1,
        "generation {now} after the rebuild, {generation} backed up"
    );
}
