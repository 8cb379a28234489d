//! The receiving end of replication: `agent-cpu` (and a new `agent-gpu` during a restore).
//!
//! A session is driven by the paired sender and commits generations one at a time
//! (ARCHITECTURE.md, "Replication"). Invariants this module keeps:
//! - **Confinement** (7): paths are parsed into `RelPath`s, every parent must be a directory in
//!   the resulting manifest, and the workspace is only touched through `fsx::Root`.
//! - **Consistency** (1): content is staged beside the workspace on the same filesystem and
//!   verified; the generation's record is appended durably (the commit point) before anything
//!   in the workspace changes, and rolled forward at start-up if the process died while
//!   applying it. The replica is always exactly one committed generation.
//! - **Durability before ack** (2): staged data is synced before the record, the workspace
//!   after applying it; only then is the generation acknowledged.
//! - **Fencing** (3): a session must carry exactly the durable epoch, which only the coordinator
//!   (or a static pair's own first epoch) sets; a hello never raises it (`admission`). Before
//!   every commit, under the replica lock, the session is checked again: still accepting, the
//!   same expected sender and epoch, the sender not revoked, the durable epoch unchanged.
//! - **Verification** (4): every file's blake3 is checked before it can be committed; a
//!   mismatch is answered with a retry (the sender sends it whole), never committed.
//! - **One generation at a time**: one session at a time holds the replica; a newer session
//!   from the same peer preempts an older one (a sender that reconnected after a network cut),
//!   discarding what the old one staged but never committed.
//! - **Bounded resources** (8): chunks are at most a few MiB; bases are mapped, not read; the
//!   number of files streaming, of bases awaiting their delta and of staging batches in flight
//!   is capped.
//!
//! The pieces, in the order a generation meets them: `startup` (opening the replica),
//! `service` (the gRPC entry points), `admission` (who may send, at which epoch), `session`
//! (hello, epoch, the message loop), `validate`
//! (the pure checks of incoming ops), `generation` (staging one generation), `batch` and
//! `stream` (writing content into the stage), `signature` (delta bases), `commit` (journal,
//! apply, acknowledge), [`apply`] (the roll-forward) and `stage` (the staged file sinks).

mod admission;
pub mod apply;
mod batch;
mod commit;
pub mod edits;
mod generation;
pub mod handoff;
mod refusal;
mod service;
mod session;
mod signature;
pub(crate) mod stage;
mod startup;
mod stream;
mod validate;

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::disk::epoch::EpochStore;
use crate::disk::fsx::Root;
use crate::proto::replica_server::ReplicaServer;
use crate::proto::state::Record;
use crate::replication::catalog::Catalog;
use crate::replication::manifest::Manifest;
use crate::trust::revocation::DenyList;
use crate::trust::tls::Expect;
use crate::types::{Epoch, Generation};
use apply::{Policy, SetIdBits};
pub use handoff::{Handover, Update};

pub use admission::Expected;
pub use service::ReplicaService;

/// Name of the catalog (`<state-dir>/replica.{snap,log}`) holding an agent's replica state.
pub const CATALOG: &str = "replica";

/// Version of the replication protocol spoken here.
pub const PROTOCOL: u32 = 1;
/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest inline file.
pub const MAX_INLINE: usize = 4 << 20;

pub struct ReceiverOptions {
    pub workspace: PathBuf,
    pub state_dir: PathBuf,
    /// The peer seat: who may read the replica's status, and who may replicate in until told
    /// otherwise (see [`Receiver::expect`]).
    pub sender: Expect,
    /// Revoked certificates: a session whose sender is on it ends (see [`Receiver::end_revoked`]).
    pub deny: DenyList,
    /// On a first start (no catalog yet), take what is already in the workspace as generation 0,
    /// so a sender can reuse it as delta bases (a CPU standby seeded by hand). An agent that will
    /// send first does not need it.
    pub adopt: bool,
    /// Accept sessions from the start (a standby) or only once told to (see `set_accepting`).
    pub accepting: bool,
    /// Give replica files the sender's setuid and setgid bits (`--keep-setuid`); masked when
    /// false, the default ([`apply::SetIdBits`]).
    pub keep_setuid: bool,
}

impl ReceiverOptions {
    /// What the replica applies of the sender's metadata: setuid bits as asked, owner and
    /// privileged attributes when this process is root.
    fn policy(&self) -> Policy {
        Policy::of_process(if self.keep_setuid {
            SetIdBits::Keep
        } else {
            SetIdBits::Mask
        })
    }
}

/// A committed generation, as [`Receiver::committed`] tells it.
#[derive(Clone, Copy, Debug)]
pub struct Committed {
    pub generation: Generation,
    pub at: SystemTime,
}

/// The newest committed manifest, kept for the watcher until it takes it
/// ([`Receiver::take_committed`]). Not in the watch channel itself: a channel keeps its last
/// value, and a copy of a 100k-file manifest is tens of MiB (ARCHITECTURE.md, "Memory").
type Handed = std::sync::Mutex<handoff::Handoff>;

/// Figures for status calls and heartbeats, readable without the replica lock.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub epoch: Epoch,
    pub generation: Generation,
    pub root: [u8; 32],
    pub entries: u64,
    pub bytes: u64,
    pub session_active: bool,
    pub last_data: Option<Instant>,
    pub last_commit: Option<SystemTime>,
}

impl Figures {
    /// Takes the replica's committed figures from its manifest.
    fn set_manifest(&mut self, m: &Manifest) {
        self.generation = m.generation;
        self.root = m.root();
        self.entries = m.len() as u64;
        self.bytes = m.total_bytes();
    }
}

/// An agent's replica state: the manifest both peers agreed on last, durably kept, and the
/// fencing epoch. Shared by the agent's receiver and (while it sends) its sender, which holds
/// the lock for as long as it sends.
pub struct ReplicaState {
    pub manifest: Manifest,
    pub catalog: Catalog,
    pub epoch: EpochStore,
    /// A committed record whose application failed: it must be rolled forward first.
    unapplied: Option<Record>,
}

type State = ReplicaState;

/// What the service, its sessions and their workers share.
struct Inner {
    workspace: PathBuf,
    root: Root,
    stage_path: PathBuf,
    stage: OwnedFd,
    /// The peer seat (status reads).
    sender: Expect,
    /// Who may replicate in now, and at which epoch.
    expected: Mutex<Expected>,
    deny: DenyList,
    state: Arc<tokio::sync::Mutex<State>>,
    /// The session holding (or waiting for) the replica, and how to end it.
    session: Mutex<Option<Slot>>,
    sessions: AtomicU64,
    figures: Mutex<Figures>,
    accepting: AtomicBool,
    /// What becomes of the sender's setuid and setgid bits, owner and extended attributes on
    /// disk.
    setid: Policy,
    /// The newest generation committed here (a snapshot follows each: ARCHITECTURE.md,
    /// "History").
    committed: tokio::sync::watch::Sender<Committed>,
    handed: Handed,
    /// The generation the workspace holds, or is being changed to: set before a committed
    /// record is applied (the history recorder reads it before and after reading files).
    applying: AtomicU64,
}

/// The session holding the replica: its number, how to end it, and its sender's certificate
/// serial (a revocation ends it).
struct Slot {
    id: u64,
    token: CancellationToken,
    serial: String,
}

#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
}

/// Why a seed was not taken into the replica.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(
        "the replica is not empty ({entries} entries at generation {generation}): a seed never overwrites it"
    )]
    NotEmpty { entries: usize, generation: u64 },
    #[error("{0}")]
    Write(String),
    #[error("taking the seeded workspace: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Catalog(#[from] crate::replication::catalog::CatalogError),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Catalog(#[from] crate::replication::catalog::CatalogError),
    #[error(transparent)]
    Epoch(#[from] crate::disk::epoch::EpochError),
}

impl Receiver {
    /// Opens the replica: takes the catalog, rolls forward a generation that was committed but
    /// not fully applied, clears leftovers of uncommitted ones, and adopts an existing workspace
    /// on first start. Blocking; call before serving.
    pub fn open(opts: ReceiverOptions) -> Result<Receiver, OpenError> {
        let opened = startup::open(&opts)?;
        let setid = opts.policy();
        let mut figures = Figures {
            epoch: opened.epoch.get(),
            ..Default::default()
        };
        figures.set_manifest(&opened.manifest);
        let generation = figures.generation;
        Ok(Receiver {
            inner: Arc::new(Inner {
                workspace: opts.workspace,
                root: opened.root,
                stage_path: opened.stage_path,
                stage: opened.stage,
                expected: Mutex::new(Expected::seat(opts.sender.clone())),
                sender: opts.sender,
                deny: opts.deny,
                state: Arc::new(tokio::sync::Mutex::new(State {
                    manifest: opened.manifest,
                    catalog: opened.catalog,
                    epoch: opened.epoch,
                    unapplied: None,
                })),
                session: Mutex::new(None),
                sessions: AtomicU64::new(0),
                figures: Mutex::new(figures),
                accepting: AtomicBool::new(opts.accepting),
                setid,
                committed: tokio::sync::watch::Sender::new(Committed {
                    generation,
                    at: SystemTime::now(),
                }),
                handed: Handed::default(),
                applying: AtomicU64::new(generation.0),
            }),
        })
    }

    /// The replica state (for a sender to take while this agent sends).
    pub fn state(&self) -> Arc<tokio::sync::Mutex<ReplicaState>> {
        self.inner.state.clone()
    }

    /// Whether replication sessions from the peer are accepted. Turning it off ends the
    /// current session.
    pub fn set_accepting(&self, on: bool) {
        self.inner.accepting.store(on, Ordering::SeqCst);
        if !on {
            self.preempt();
        }
    }

    pub fn accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    /// Accepts sessions only from `expected` from now on; a change ends the current session.
    pub fn expect(&self, expected: Expected) {
        let mut cur = self.inner.expected.lock().expect("expected");
        if *cur != expected {
            tracing::info!(sender = %expected.sender, epoch = ?expected.epoch, "expected sender");
            *cur = expected;
            drop(cur);
            self.preempt();
        }
    }

    pub fn expected(&self) -> Expected {
        self.inner.expected.lock().expect("expected").clone()
    }

    /// Ends the current session if its sender's certificate is now revoked; true when it did.
    pub fn end_revoked(&self) -> bool {
        let mut slot = self.inner.session.lock().expect("session lock");
        let revoked = slot
            .as_ref()
            .is_some_and(|s| self.inner.deny.contains(&s.serial));
        if revoked && let Some(s) = slot.take() {
            tracing::warn!(serial = %s.serial, "ending a session: its sender's certificate was revoked");
            s.token.cancel();
        }
        revoked
    }

    /// Refreshes the figures from the state (after a sender used it).
    pub async fn refresh_figures(&self) {
        let st = self.inner.state.lock().await;
        let mut f = self.inner.figures.lock().expect("figures");
        f.epoch = st.epoch.get();
        f.set_manifest(&st.manifest);
    }

    /// The newest generation committed here, changing with every commit; while someone
    /// watches, each commit also hands over its manifest or its changes
    /// ([`Receiver::take_committed`]: the session holds the replica lock, so this is how a
    /// watcher sees what was committed).
    pub fn committed(&self) -> tokio::sync::watch::Receiver<Committed> {
        self.inner.committed.subscribe()
    }

    /// The newest commit made while someone watched, unless taken already: a copy of its
    /// manifest, or the changes to the last one taken while the taker keeps a copy that follows
    /// them (ARCHITECTURE.md, "The recorder's copy of the manifest").
    pub fn take_committed(&self) -> Option<Handover> {
        self.inner.handed.lock().expect("handed").take()
    }

    /// The watcher no longer keeps a copy of the manifest: the next commit hands one over.
    pub fn unfollow(&self) {
        self.inner.handed.lock().expect("handed").unfollow();
    }

    /// The generation the workspace holds, or is being changed to when a commit is applying:
    /// equal to a manifest's generation before and after reading a file, the file was that
    /// generation's all along.
    pub fn workspace_generation(&self) -> Generation {
        Generation(self.inner.applying.load(Ordering::SeqCst))
    }

    /// Whether `identity` may read what this replica holds (its status, its history): the
    /// peer seat, the coordinator and admins.
    pub fn may_read(&self, identity: &crate::trust::identity::Identity) -> bool {
        service::may_read(&self.inner, identity)
    }

    /// Whether the certificate with this serial is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.inner.deny.contains(serial)
    }

    pub fn figures(&self) -> Figures {
        self.inner.figures.lock().expect("figures lock").clone()
    }

    pub fn workspace(&self) -> &Path {
        &self.inner.workspace
    }

    pub fn stage_path(&self) -> &Path {
        &self.inner.stage_path
    }

    /// The gRPC service, with message limits set.
    pub fn service(&self) -> ReplicaServer<ReplicaService> {
        ReplicaServer::new(ReplicaService::new(self.inner.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Raises the durable epoch (promotion, cutover), ending any session of an older epoch.
    pub async fn raise_epoch(&self, e: Epoch) -> Result<bool, crate::disk::epoch::EpochError> {
        self.preempt();
        let mut st = self.inner.state.lock().await;
        let raised = st.epoch.raise(e)?;
        st.catalog.sync().ok();
        self.inner.figures.lock().expect("figures").epoch = st.epoch.get();
        Ok(raised)
    }

    /// Fills an empty replica: `write` puts files into the workspace (a seed from the off-site
    /// backup) and says which generation they are (the snapshot's); they are taken as that
    /// generation (the next one when it is not newer), so the pair's numbering goes on from the
    /// backup (ARCHITECTURE.md, "Generations"). Durably (the catalog rewritten), all under the
    /// replica lock so no session or sender runs meanwhile. Refused when the replica holds
    /// anything: a seed never overwrites what replication brought.
    pub async fn adopt_seed<F>(&self, write: F) -> Result<Figures, SeedError>
    where
        F: FnOnce(&Path) -> Result<Generation, String> + Send + 'static,
    {
        self.set_accepting(false);
        let mut st = self.inner.state.clone().lock_owned().await;
        if !st.manifest.is_empty() {
            return Err(SeedError::NotEmpty {
                entries: st.manifest.len(),
                generation: st.manifest.generation.0,
            });
        }
        let (ws, stage) = (self.inner.workspace.clone(), self.inner.stage_path.clone());
        let st = tokio::task::spawn_blocking(move || -> Result<_, SeedError> {
            let seeded = write(&ws).map_err(SeedError::Write)?;
            let mut m = startup::adopt(&ws, &stage)?;
            m.generation = st.manifest.generation.next().max(seeded);
            st.catalog.reset(&m)?;
            st.manifest = m;
            Ok(st)
        })
        .await
        .map_err(|e| SeedError::Write(format!("the seed task failed: {e}")))??;
        // A watcher's copy does not know the seed.
        self.inner.handed.lock().expect("handed").lose();
        let mut f = self.inner.figures.lock().expect("figures");
        f.set_manifest(&st.manifest);
        Ok(f.clone())
    }

    fn preempt(&self) {
        if let Some(s) = self.inner.session.lock().expect("session lock").take() {
            s.token.cancel();
        }
    }
}
