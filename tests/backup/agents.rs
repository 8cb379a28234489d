//! The agents back up on their own: a CPU standby given a bucket uploads each snapshot it
//! records; after both machines' directories are gone, `agent-cpu restore-backup` rebuilds the
//! workspace from the bucket alone, equal by blake3 to the last backed-up generation. The bucket
//! holds ciphertext only: no file name and no file content appears in any object.

use std::fs;
use std::time::Duration;

use super::common::*;
use super::{raw_objects, server};
use standby::trust::identity::Role;
use standby::trust::seal::{BackupKey, KEY_FILE};

const URL: &str = "s3://standby-backup/pairs/agents";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_lost_whole_is_rebuilt_from_the_bucket_alone() {
    let test = "a_pair_lost_whole_is_rebuilt_from_the_bucket_alone";
    let Some(s3) = server::start(test) else {
        return;
    };
    s3.create_bucket("standby-backup").await;
    let t = tempfile::tempdir().unwrap();
    let keys = t.path().join("coordinator");
    fs::create_dir_all(&keys).unwrap();
    let key = BackupKey::load_or_create(&keys).unwrap();
    let key_file = keys.join(KEY_FILE);
    let pki = Pki::new();
    let endpoint = s3.endpoint();
    let cpu = Cpu::start_with(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
        "127.0.0.1:0",
        &[
            "--backup-url",
            URL,
            "--backup-endpoint",
            &endpoint,
            "--backup-region",
            "us-east-1",
            "--backup-key-file",
            key_file.to_str().unwrap(),
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
    );

    // Three generations: a tree, a checkpoint rewritten, a file removed.
    let ws = t.path().join("ws");
    let (gst, gtls) = (t.path().join("gpu"), pki.node("p", Role::Gpu));
    let mut r = rng(seed(test));
    make_tree(&ws, &mut r, 40, &[3 << 20]);
    once(&ws, &gst, &gtls, &cpu.addr);
    write_big(&ws.join("ckpt-secret-name.pt"), &mut r, 2 << 20);
    once(&ws, &gst, &gtls, &cpu.addr);
    fs::write(
        ws.join("notes-plaintext.txt"),
        b"the-plaintext-marker 0123456789",
    )
    .unwrap();
    once(&ws, &gst, &gtls, &cpu.addr);

    let bucket = s3.bucket(URL);
    let local = cpu.state.join("history/snapshots");
    let ok = wait_until(Duration::from_secs(60), || {
        let want = fs::read_dir(&local).map(|d| d.count()).unwrap_or(0);
        let rt = tokio::runtime::Handle::current();
        let have = tokio::task::block_in_place(|| {
            rt.block_on(standby::backup::snapshots(&bucket, &key))
                .map(|l| l.snapshots.len())
                .unwrap_or(0)
        });
        want >= 3 && have == want
    });
    assert!(ok, "the bucket never caught up: {}", cpu.log_text());

    // Ciphertext only.
    for (name, bytes) in raw_objects(&bucket).await {
        for plain in [
            &b"ckpt-secret-name"[..],
            b"notes-plaintext",
            b"the-plaintext-marker",
        ] {
            assert!(
                !bytes.windows(plain.len()).any(|w| w == plain),
                "{name} holds {:?}",
                String::from_utf8_lossy(plain)
            );
        }
    }

    // Both machines lost.
    let expected = t.path().join("expected");
    copy_tree(&ws, &expected);
    drop(cpu);
    for d in ["ws", "gpu", "replica", "cpu"] {
        fs::remove_dir_all(t.path().join(d)).unwrap();
    }
    let fresh = t.path().join("fresh/workspace");
    let restore = || {
        std::process::Command::new(AGENT_CPU)
            .args(["restore-backup", "--url", URL, "--endpoint", &endpoint])
            .args([
                "--region",
                "us-east-1",
                "--snapshot",
                "latest",
                "--key-file",
            ])
            .arg(&key_file)
            .arg("--to")
            .arg(&fresh)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .unwrap()
    };
    let out = restore();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&expected, &fresh);
    let leftovers: Vec<_> = fs::read_dir(t.path().join("fresh"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "the scratch store is removed: {leftovers:?}"
    );
    // Again into the directory it filled: refused, and what is there stays as it is.
    fs::write(fresh.join("mine.txt"), b"written since").unwrap();
    let out = restore();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("not empty"),
        "{said}"
    );
    fs::remove_file(fresh.join("mine.txt")).unwrap();
    assert_same(&expected, &fresh);
}

/// A coordinator with `[backup]` tells each CPU standby where to back up (its pair's own prefix),
/// with the key and the bucket's access key; the standby has no backup settings of its own and
/// no credentials in its environment. `pairs --json` then shows the newest backed-up snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_hands_its_backup_to_each_standby() {
    let test = "the_coordinator_hands_its_backup_to_each_standby";
    let Some(s3) = server::start(test) else {
        return;
    };
    s3.create_bucket("standby-backup").await;
    let t = tempfile::tempdir().unwrap();
    let config = t.path().join("coordinator.toml");
    fs::write(
        &config,
        format!(
            "[backup]\nurl = \"s3://standby-backup/fleet\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n",
            s3.endpoint()
        ),
    )
    .unwrap();
    let coord = Coord::start_env(
        &t.path().join("coord"),
        &["--config", config.to_str().unwrap()],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
    );
    let (cpu, _gpu) = hand_joined_pair(&coord, t.path(), "fleet1", 20);
    let master = BackupKey::load(&coord.dir.join(KEY_FILE)).unwrap();
    let key = master.for_pair("fleet1");
    let bucket = s3.bucket("s3://standby-backup/fleet/fleet1");
    let mut shown = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(60), || {
        let rt = tokio::runtime::Handle::current();
        let n = tokio::task::block_in_place(|| {
            rt.block_on(standby::backup::snapshots(&bucket, &key))
                .map(|l| l.snapshots.len())
                .unwrap_or(0)
        });
        shown = coord.pair("fleet1").unwrap_or_default()["history"]["backup"].clone();
        n >= 1 && shown["newest_snapshot"].is_string()
    });
    assert!(
        ok,
        "no backup through the coordinator: {shown}\n{}",
        cpu.log_text()
    );
    // Sealed with the pair's own key: the coordinator's key itself opens nothing there.
    let rt = tokio::runtime::Handle::current();
    let with_master =
        tokio::task::block_in_place(|| rt.block_on(standby::backup::snapshots(&bucket, &master)));
    if let Ok(l) = with_master {
        assert!(
            l.snapshots.is_empty(),
            "the coordinator's own key opened a pair's backup"
        );
    }
}
