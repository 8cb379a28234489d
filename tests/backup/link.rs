//! Upload throughput through a shaped link: the client in one network namespace, moto in
//! another, the client's outgoing traffic limited by `tc tbf`. Needs root (skips without it,
//! fails under CI=true). Reports the figure; the target is 90 % of the link.

use std::os::fd::AsRawFd;
use std::time::Instant;

use standby::backup::{Mirror, UploadOptions};
use standby::trust::seal::BackupKey;

use crate::common;
use crate::server;
use crate::store::{self, Store};

/// Link rate in bits per second, as `tc` takes it.
const RATE_MBIT: u64 = 40;

#[test]
fn upload_fills_a_shaped_link() {
    let test = "upload_fills_a_shaped_link";
    if !common::privileged(test) {
        return;
    }
    let Some(program) = server::program(test) else {
        return;
    };
    let mut net = common::netns::Net::new();
    net.host("cli");
    net.host("s3");
    let link = net.link("cli", "s3", 73);
    link.shape(&format!("{RATE_MBIT}mbit"));
    let mut cmd = net.cmd("s3", program.to_str().unwrap());
    cmd.env("PYTHONUNBUFFERED", "1");
    let s3 = server::spawn(test, cmd, &link.ip_b, 9000);

    // Six 8 MiB packs and a snapshot: 48 MiB, about 10 s at 40 Mbit/s.
    let mut st = Store::new();
    let packs: Vec<String> = (40..46)
        .map(|i| st.add_pack(&store::content(i, 8 << 20)))
        .collect();
    st.add_snapshot(1, &packs.iter().collect::<Vec<_>>());
    let state = tempfile::tempdir().unwrap();
    let netns = format!("/run/netns/{}", net.ns("cli"));

    // The client runs on a thread moved into the client's namespace, with a runtime of its own
    // (threads it starts inherit the namespace).
    let (bytes, secs) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = std::fs::File::open(&netns).unwrap();
                // SAFETY: setns(2) on this thread only, with a namespace file we opened.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                s3.wait_up();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    s3.create_bucket("standby-backup").await;
                    // The default request timeout: three 8 MiB bodies share the link.
                    let bucket = s3.bucket_with_timeout(
                        "s3://standby-backup/link",
                        standby::backup::BucketConfig::new("s3://x").timeout,
                    );
                    let mut m = Mirror::open(
                        bucket,
                        BackupKey::generate(),
                        st.path(),
                        &state.path().join("backup.journal"),
                        UploadOptions {
                            concurrency: 3,
                            ..UploadOptions::default()
                        },
                    )
                    .unwrap();
                    let started = Instant::now();
                    let f = m.pass().await.unwrap();
                    assert_eq!(f.failures, 0, "{f:?}");
                    (f.bytes_uploaded, started.elapsed().as_secs_f64())
                })
            })
            .join()
            .unwrap()
    });
    let link_bytes = (RATE_MBIT * 1_000_000 / 8) as f64;
    let achieved = bytes as f64 / secs;
    eprintln!(
        "upload through a {RATE_MBIT} Mbit/s tbf link: {bytes} bytes in {secs:.2} s = {:.1} Mbit/s, {:.0}% of the link",
        achieved * 8.0 / 1e6,
        achieved / link_bytes * 100.0
    );
    // The link is the limit: no upload can beat it (within the tbf burst).
    assert!(
        achieved <= link_bytes * 1.05,
        "{achieved} B/s through a {link_bytes} B/s link"
    );
    drop(s3);
}
