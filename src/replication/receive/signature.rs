//! Delta bases: signatures of the replica's files, computed beside the session.
//!
//! Each signature maps the replica's committed file as the base its delta will be applied to;
//! the base stays mapped (in the generation's `bases`) until the delta's stream opens.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Inner;
use super::generation::Bases;
use super::session::{Replies, send};
use super::stage::Base;
use crate::disk::fsx;
use crate::proto::{Entry, Signature, sync_response};
use crate::replication::delta;
use crate::types::RelPath;

/// Largest piece of a signature in one message.
const SIG_PIECE: usize = 1 << 20;

/// How many bases (files whose signature was sent, mapped until their delta arrives) one
/// generation may hold open. The agent's sender asks at most 8 ahead; past this a request gets
/// "missing" (send it whole) instead of another open file.
const MAX_BASES: usize = 64;

/// A signature to compute.
pub(super) struct SigJob {
    pub file: u32,
    pub path: RelPath,
    pub block_size: u32,
    /// The committed entry at `path`, when it is a file.
    pub expect: Option<Entry>,
    pub bases: Bases,
}

/// Computes signatures one at a time, in order, beside the session (so literal data keeps
/// flowing while a big base is being read).
pub(super) async fn sig_worker(inner: Arc<Inner>, mut rx: mpsc::Receiver<SigJob>, tx: Replies) {
    while let Some(job) = rx.recv().await {
        let inner2 = inner.clone();
        let file = job.file;
        let r = tokio::task::spawn_blocking(move || compute_sig(&inner2, job)).await;
        let msgs = match r {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "no usable base for a delta; asking for the whole file");
                vec![Signature {
                    file,
                    missing: true,
                    last: true,
                    ..Default::default()
                }]
            }
            Err(_) => return,
        };
        for m in msgs {
            if send(&tx, sync_response::Msg::Signature(m)).await.is_err() {
                return;
            }
        }
    }
}

fn compute_sig(inner: &Inner, job: SigJob) -> io::Result<Vec<Signature>> {
    let Some(expect) = job.expect else {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no committed file"));
    };
    if job.bases.lock().expect("bases").len() >= MAX_BASES {
        return Err(io::Error::other(format!(
            "{MAX_BASES} files already await their delta in this generation"
        )));
    }
    let base = Arc::new(base_at(inner, &job.path, expect.size)?);
    let base_size = expect.size;
    let sig = delta::signature(base.bytes(), job.block_size);
    job.bases
        .lock()
        .expect("bases")
        .insert(job.file, base.clone());
    Ok(pieces(job.file, base_size, &sig))
}

/// Maps the replica's file at `path` (a delta's or copies' base), if it is a file of the size
/// the manifest says.
pub(super) fn base_at(inner: &Inner, path: &RelPath, size: u64) -> io::Result<Base> {
    let (dir, name) = inner.root.open_parent(path)?;
    let f = fsx::openat_file(dir.as_fd(), name)?;
    let md = f.metadata()?;
    if !md.is_file() || md.len() != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "replica file differs from the manifest",
        ));
    }
    Base::new(f)
}

/// A signature cut into messages (one empty piece for an empty signature).
fn pieces(file: u32, base_size: u64, sig: &[u8]) -> Vec<Signature> {
    let pieces: Vec<&[u8]> = if sig.is_empty() {
        vec![&[]]
    } else {
        sig.chunks(SIG_PIECE).collect()
    };
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| Signature {
            file,
            base_size,
            data: Bytes::copy_from_slice(p),
            last: i + 1 == n,
            missing: false,
        })
        .collect()
}
