//! One upload pass through a shaped link, as `link.rs` and `bench/backup_link.rs` make it: the
//! uploader runs on a thread moved into the client's network namespace, with a runtime of its
//! own (threads it starts inherit the namespace), three objects in flight.

use std::os::fd::AsRawFd;
use std::time::Instant;

use standby::backup::{BucketConfig, Mirror, UploadOptions};
use standby::trust::seal::BackupKey;

use crate::server::S3;
use crate::store::Store;

/// Uploads `store` into `prefix` of bucket `standby-backup` (created first when `create`) from
/// the namespace at `netns`. Returns the sealed bytes uploaded and the pass's seconds.
pub fn upload(s3: &S3, netns: &str, store: &Store, prefix: &str, create: bool) -> (u64, f64) {
    let state = tempfile::tempdir().unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = std::fs::File::open(netns).unwrap();
                // SAFETY: setns(2) on this thread only, with a namespace file we opened.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if create {
                        s3.wait_up();
                        s3.create_bucket("standby-backup").await;
                    }
                    // The default request timeout: three 8 MiB bodies share the link.
                    let bucket = s3.bucket_with_timeout(
                        &format!("s3://standby-backup/{prefix}"),
                        BucketConfig::new("s3://x").timeout,
                    );
                    let mut m = Mirror::open(
                        bucket,
                        BackupKey::generate(),
                        store.path(),
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
    })
}
