//! The sending end of replication: `agent-gpu` (and `agent-cpu` during a restore).
//!
//! **What the sender keeps.** An index: its view of the receiver's manifest, plus local inode
//! numbers for the quick-check, held in the [`ReplicaState`] it shares with this agent's
//! receiver; and a pending record, the last commit it sent without seeing it acknowledged.
//!
//! **A session** ([`Session`]) is one `Sync` stream to a receiver: a hello that settles whose
//! epoch is newer, a reconciliation that brings the index in line with the receiver's manifest,
//! then any number of generations. A generation is planned by [`crate::replication::scan`], its
//! content is read, hashed and streamed (whole for small and new files, rsync deltas against the
//! receiver's copy for the rest), and committed with the manifest root the sender expects.
//!
//! **Invariant.** The index is updated only once the receiver acknowledged a generation
//! durable. So nothing is lost across a crash of either side: anything not acknowledged is
//! still a difference between the tree and the index (ARCHITECTURE.md, "the life of one write").
//!
//! Hazards handled here:
//! - A file that changes while it is read (size, mtime or inode differ from the scan afterwards)
//!   is dropped from the generation and waits for the next one.
//! - Files are read with `read`, never mapped, so a concurrent truncation cannot fault us, and
//!   never held whole in memory beyond [`SenderOptions::inline_max`].
//! - A crash between "commit sent" and "acknowledged" is recognised on reconnect by the pending
//!   record, without re-verifying the whole tree; any other disagreement with the receiver is
//!   resolved by fetching its manifest and re-hashing what looks unchanged.
//!
//! The parts, in the order a session uses them: `session` (opening one, the hello, the
//! outgoing side) and `reader` (the receiver's side); `reconcile` (the pending record and the
//! receiver's manifest); `generation` (one generation, top to bottom) with `ops` (the wire
//! operations it sends) and `restore` (order and budget when restoring); `content` (which file
//! goes how) with `inline` (small files in batches), `stream` (big files in windows: copies
//! of the receiver's chunks, or deltas against a signature) and `read` (reading a file that may
//! change under us); `commit` (commit, retries, the pending record, the chunk maps kept);
//! `figures` (what the agent reports).

mod commit;
mod content;
mod figures;
mod generation;
mod inline;
mod ops;
mod read;
mod reader;
mod reconcile;
mod restore;
mod session;
mod stream;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Display;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use tonic::Status;

use crate::proto::state::Record;
use crate::replication::chunkmap::{ChunkMap, MapStore};
use crate::replication::manifest::Manifest;
use crate::replication::receive::ReplicaState;
use crate::replication::scan::{Exclude, Scope};
use crate::types::{Epoch, Generation, RelPath};

pub use figures::{Report, SenderFigures, unix_ms};
pub use session::{Session, connect};

#[derive(Clone, Debug)]
pub struct SenderOptions {
    pub workspace: PathBuf,
    pub state_dir: PathBuf,
    /// Free text identifying this machine in the receiver's logs.
    pub machine: String,
    /// zstd level for literal data and deltas; 0 turns compression off.
    pub compress_level: i32,
    /// Files up to this size are sent whole inside batches.
    pub inline_max: u64,
    /// Largest amount of file content one generation carries (None: no limit). A restore sets
    /// it so that small and recently changed files become durable first, generation by
    /// generation, instead of everything at the very end.
    pub generation_budget: Option<u64>,
    /// Bytes per second the replication stream may carry (`--bwlimit`; None: no limit).
    pub bandwidth: Option<std::sync::Arc<crate::rate::RateLimit>>,
}

impl SenderOptions {
    pub fn new(workspace: PathBuf, state_dir: PathBuf) -> SenderOptions {
        SenderOptions {
            workspace,
            state_dir,
            machine: crate::host::name(),
            compress_level: 1,
            inline_max: 128 << 10,
            generation_budget: None,
            bandwidth: None,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum SyncError {
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("receiver refused: {0}")]
    Refused(String),
    #[error("connection to the receiver failed: {0}")]
    Connection(String),
    #[error("{0}")]
    Local(String),
}

impl SyncError {
    fn from_status(s: &Status) -> SyncError {
        let msg = s.message().to_string();
        if msg.starts_with("fenced:") {
            return SyncError::Fenced(msg);
        }
        match s.code() {
            tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted => SyncError::Connection(if msg.is_empty() {
                format!("{:?}", s.code())
            } else {
                msg
            }),
            _ => SyncError::Refused(msg),
        }
    }

    /// Whether retrying later can help (as opposed to being fenced).
    pub fn is_fenced(&self) -> bool {
        matches!(self, SyncError::Fenced(_))
    }
}

fn local(what: &str) -> impl FnOnce(io::Error) -> SyncError + '_ {
    move |e| SyncError::Local(format!("{what}: {e}"))
}

/// The index (manifest or catalog) could not take a change.
fn index_error(e: impl Display) -> SyncError {
    SyncError::Local(format!("index: {e}"))
}

/// A blocking task that did not finish (it panicked or was cancelled).
fn task_error(e: tokio::task::JoinError) -> SyncError {
    SyncError::Local(e.to_string())
}

pub struct Sender {
    opts: SenderOptions,
    exclude: Exclude,
    /// The replica state shared with this agent's receiver, held for as long as it sends.
    st: OwnedMutexGuard<ReplicaState>,
    /// The last commit sent and not seen acknowledged (also on disk at `pending_path`).
    pending: Option<Record>,
    pending_path: PathBuf,
    /// The chunk maps of big files' content, by its blake3 (`<state>/chunkmaps`).
    maps: MapStore,
    /// Maps of content streamed in the generation under way, kept once it is committed.
    fresh_maps: Mutex<HashMap<Vec<u8>, ChunkMap>>,
    pub figures: Arc<Mutex<SenderFigures>>,
}

impl Sender {
    /// A sender over the agent's replica state (taken from its receiver), with the figures the
    /// agent reports. Entries without a local inode (written by a receiver) get one where the
    /// file still matches, so they are not sent again.
    pub fn new(
        opts: SenderOptions,
        mut st: OwnedMutexGuard<ReplicaState>,
        figures: Arc<Mutex<SenderFigures>>,
    ) -> Result<Sender, SyncError> {
        std::fs::create_dir_all(&opts.workspace).map_err(local("creating workspace"))?;
        let pending_path = opts.state_dir.join("pending");
        let pending = commit::read_pending(&pending_path);
        let maps = MapStore::open(&opts.state_dir).map_err(local("opening the chunk maps"))?;
        reconcile::refresh_inodes(&opts.workspace, &mut st.manifest);
        let exclude = Exclude::new(&opts.workspace, &opts.state_dir);
        figures
            .lock()
            .expect("figures")
            .index(st.epoch.get(), &st.manifest);
        Ok(Sender {
            opts,
            exclude,
            st,
            pending,
            pending_path,
            maps,
            fresh_maps: Mutex::default(),
            figures,
        })
    }

    pub fn epoch(&self) -> Epoch {
        self.st.epoch.get()
    }

    /// Raises the durable epoch (the coordinator tells us of a newer one).
    pub fn raise_epoch(&mut self, e: Epoch) -> Result<bool, SyncError> {
        let r = self
            .st
            .epoch
            .raise(e)
            .map_err(|e| SyncError::Local(format!("epoch: {e}")))?;
        self.figures.lock().expect("figures").epoch = self.st.epoch.get().0;
        Ok(r)
    }

    pub fn index(&self) -> &Manifest {
        &self.st.manifest
    }

    pub fn workspace(&self) -> &Path {
        &self.opts.workspace
    }

    /// What is never replicated (the state directory when it lies inside the workspace).
    pub fn exclude(&self) -> &Exclude {
        &self.exclude
    }

    /// Takes a generation the receiver acknowledged into the index and its catalog.
    fn apply_local(&mut self, rec: &Record) -> Result<(), SyncError> {
        self.st.manifest.apply(&rec.changes).map_err(index_error)?;
        self.st.manifest.generation = Generation(rec.generation);
        let st = &mut *self.st;
        st.catalog
            .append_applied(rec)
            .and_then(|_| st.catalog.maybe_compact(&st.manifest))
            .map_err(index_error)
    }
}

/// Paths flagged dirty, for partial scans.
pub fn scope_of(paths: BTreeSet<RelPath>, full: bool) -> Scope {
    if full {
        Scope::Full
    } else {
        Scope::Paths(paths)
    }
}
