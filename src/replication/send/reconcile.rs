//! Bringing the index in line with the receiver when a session opens. A commit we sent but never
//! saw acknowledged is settled by the pending record alone; any other disagreement is resolved
//! by fetching the receiver's manifest and adopting it, with local inode numbers where the file
//! looks the same and a request to re-hash it, so equal content is not sent again.

use std::path::Path;

use rayon::prelude::*;

use super::session::Event;
use super::{Sender, Session, SyncError, index_error, task_error};
use crate::proto::{Entry, ManifestRequest, sync_request};
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::replication::scan::Stat;
use crate::text::hex;
use crate::types::{Generation, RelPath};

impl Sender {
    pub(super) async fn reconcile(&mut self, s: &mut Session) -> Result<(), SyncError> {
        self.settle_pending(s)?;
        if s.receiver_generation == self.st.manifest.generation
            && s.receiver_root == self.st.manifest.root()
        {
            return Ok(());
        }
        tracing::info!(
            receiver_generation = %s.receiver_generation,
            receiver_root = %hex(&s.receiver_root),
            index_generation = %self.st.manifest.generation,
            "index differs from the receiver's manifest: fetching it"
        );
        let mut remote = fetch_manifest(s).await?;
        // The index keeps the pair's newest number even when the receiver is behind it (a new
        // machine): the next generation follows it, also after a crash before that one commits.
        remote.generation = s.after;
        let ws = self.opts.workspace.clone();
        self.st.manifest = tokio::task::spawn_blocking(move || adopt_local(&ws, remote))
            .await
            .map_err(task_error)?;
        let st = &mut *self.st;
        st.catalog.reset(&st.manifest).map_err(index_error)
    }

    /// A commit we sent but never saw acknowledged: if the receiver's hello shows it
    /// committed, the index takes it now. Either way the record is done with.
    fn settle_pending(&mut self, s: &Session) -> Result<(), SyncError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if s.receiver_generation.0 == p.generation && s.receiver_root[..] == p.root[..] {
            tracing::info!(
                generation = p.generation,
                "the receiver committed our last generation before we saw it"
            );
            self.apply_local(&p)?;
        }
        let _ = std::fs::remove_file(&self.pending_path);
        Ok(())
    }
}

/// Fetches the receiver's manifest and checks it against the root its hello announced.
async fn fetch_manifest(s: &mut Session) -> Result<Manifest, SyncError> {
    s.out
        .send(sync_request::Msg::Manifest(ManifestRequest {}))
        .await?;
    let mut remote = Manifest::new();
    loop {
        let Event::Manifest(chunk) = s.event().await? else {
            return Err(SyncError::Refused("expected the manifest".into()));
        };
        remote.generation = Generation(chunk.generation);
        for it in chunk.items {
            let p = RelPath::new(it.path.to_vec())
                .map_err(|e| SyncError::Refused(format!("manifest path: {e}")))?;
            remote.insert(p, it.entry.unwrap_or_default());
        }
        if chunk.last {
            break;
        }
    }
    if remote.root() != s.receiver_root {
        return Err(SyncError::Refused(
            "manifest does not match its root".into(),
        ));
    }
    Ok(remote)
}

/// The receiver's manifest as our index: local inode numbers where the file looks the same
/// (files are then re-hashed before anything is sent), none elsewhere.
fn adopt_local(ws: &Path, mut remote: Manifest) -> Manifest {
    let paths: Vec<(RelPath, Entry)> = remote.iter().map(|(p, e)| (p.clone(), e.clone())).collect();
    let updates: Vec<(RelPath, Entry)> = paths
        .into_par_iter()
        .map(|(p, mut e)| {
            let local = lstat(ws, &p);
            e.ino = 0;
            e.verify = false;
            e.ctime_ns = 0; // attributes are read again at the next scan
            if let Some(st) = local
                && looks_same(&st, &e)
            {
                e.ino = st.ino;
                e.verify = st.kind == Kind::File;
            }
            (p, e)
        })
        .collect();
    for (p, e) in updates {
        remote.insert(p, e);
    }
    remote
}

/// Gives entries without a local inode (written by a receiver from a pack, or adopted) the inode
/// of the file that still matches them, so the quick-check recognises them.
pub(super) fn refresh_inodes(ws: &Path, m: &mut Manifest) {
    let missing: Vec<(RelPath, Entry)> = m
        .iter()
        .filter(|(_, e)| e.ino == 0)
        .map(|(p, e)| (p.clone(), e.clone()))
        .collect();
    if missing.is_empty() {
        return;
    }
    let found: Vec<(RelPath, u64)> = missing
        .into_par_iter()
        .filter_map(|(p, e)| {
            let st = lstat(ws, &p)?;
            looks_same(&st, &e).then_some((p, st.ino))
        })
        .collect();
    for (p, ino) in found {
        if let Some(e) = m.get_mut(&p) {
            e.ino = ino;
        }
    }
}

fn lstat(ws: &Path, p: &RelPath) -> Option<Stat> {
    std::fs::symlink_metadata(p.to_path(ws))
        .ok()
        .and_then(|md| Stat::from_metadata(&md))
}

/// The quick-check without the inode: kind, size, mtime and mode agree.
fn looks_same(st: &Stat, e: &Entry) -> bool {
    kind_of(e) == Some(st.kind)
        && st.size == e.size
        && st.mtime_ns == e.mtime_ns
        && st.mode == e.mode
}
