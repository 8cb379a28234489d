//! The standby's off-site backup (ARCHITECTURE.md, "Off-site backup"): after each snapshot the
//! recorder wakes this task, which mirrors the history store to the bucket (one
//! [`Mirror::pass`]: new packs, then new snapshots, then deletions). A pass that failed (the
//! bucket unreachable, a request timed out) is tried again a minute later; the journal makes
//! every pass continue where the last stopped, so nothing is skipped and nothing sent twice.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::config::BackupSettings;
use crate::agent::snapshots::HistoryFigures;
use crate::backup::{Bucket, BucketConfig, Credentials, Figures, Mirror, UploadOptions};
use crate::proto::BackupTarget;
use crate::trust::seal::BackupKey;

/// The uploader's journal in the state directory.
pub const JOURNAL: &str = "backup.journal";
/// A pass at least this often, whether or not a snapshot came (retries, deletions).
const PASS_EVERY: Duration = Duration::from_secs(60);

/// Opens the bucket and the journal and starts the uploader; it runs a pass when `wake` is
/// notified and every minute.
pub fn start(
    settings: &BackupSettings,
    (store_dir, state_dir): (&Path, &Path),
    wake: Arc<Notify>,
    figures: Arc<Mutex<HistoryFigures>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bucket = match &settings.credentials {
        Some(c) => Bucket::open_with(&settings.bucket, c)?,
        None => Bucket::open(&settings.bucket)?,
    };
    let opts = UploadOptions {
        rate_limit: settings.rate_limit,
        ..UploadOptions::default()
    };
    let mirror = Mirror::open(
        bucket,
        settings.key.clone(),
        store_dir,
        &state_dir.join(JOURNAL),
        opts,
    )?;
    tracing::info!(url = %settings.bucket.url, key = %settings.key.fingerprint(), "backing the history up off-site");
    figures.lock().expect("figures").backup_configured = true;
    tokio::spawn(run(mirror, wake, figures, shutdown));
    Ok(())
}

async fn run(
    mut mirror: Mirror,
    wake: Arc<Notify>,
    figures: Arc<Mutex<HistoryFigures>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(PASS_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tick.tick() => {}
        }
        match mirror.pass().await {
            Ok(f) => account(&figures, &f),
            Err(e) => {
                tracing::warn!(error = %e, "backup pass failed");
                let mut h = figures.lock().expect("figures");
                h.backup_failures += 1;
                h.backup_last_error = Some(e.to_string());
            }
        }
    }
}

/// One pass's figures into the history's.
fn account(figures: &Mutex<HistoryFigures>, f: &Figures) {
    let mut h = figures.lock().expect("figures");
    h.backup_uploaded_bytes += f.bytes_uploaded;
    h.backup_failures += f.failures;
    if let Some(ns) = f.newest_snapshot_ns {
        h.newest_backup_unix_ms = ns / 1_000_000;
    }
    if let Some(e) = f.errors.first() {
        tracing::warn!(failures = f.failures, error = %e, "backup pass: some uploads failed; the next pass tries again");
        h.backup_last_error = Some(e.to_string());
        return;
    }
    h.backup_last_error = None;
    if f.objects_uploaded > 0 || f.objects_deleted > 0 {
        tracing::debug!(
            uploaded = f.objects_uploaded,
            bytes = f.bytes_uploaded,
            deleted = f.objects_deleted,
            "backup pass"
        );
    }
}

/// A coordinator's backup target as this agent's settings; None (said in the log) when it is
/// unusable.
pub fn from_coordinator(t: &BackupTarget) -> Option<BackupSettings> {
    let key = match BackupKey::from_hex(&t.key_hex) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "the coordinator's backup key is unusable; no backup");
            return None;
        }
    };
    let mut bucket = BucketConfig::new(&t.url);
    if let Err(e) = bucket.bucket_and_prefix() {
        tracing::warn!(error = %e, "the coordinator's backup target is unusable; no backup");
        return None;
    }
    bucket.endpoint = Some(t.endpoint.clone()).filter(|e| !e.is_empty());
    bucket.region = Some(t.region.clone()).filter(|r| !r.is_empty());
    bucket.virtual_hosted = t.virtual_hosted;
    Some(BackupSettings {
        bucket,
        key,
        rate_limit: (t.bandwidth > 0).then_some(t.bandwidth),
        credentials: Some(Credentials {
            access_key_id: t.access_key_id.clone(),
            secret_access_key: t.secret_access_key.clone(),
            session_token: Some(t.session_token.clone()).filter(|s| !s.is_empty()),
        }),
    })
}
