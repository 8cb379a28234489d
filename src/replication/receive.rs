//! The receiving end of replication: `agent-cpu` (and a new `agent-gpu` during a restore).
//!
//! A session is driven by the paired sender and commits generations one at a time. Invariants:
//! - **Consistency** (1): content is staged beside the workspace on the same filesystem and
//!   verified; the generation's record is appended durably (the commit point) before anything
//!   in the workspace changes, and rolled forward at start-up if the process died while
//!   applying it. The replica is always exactly one committed generation.
//! - **Durability** (2): staged data is synced before the record, the workspace after applying
//!   it; only then is the generation acknowledged.
//! - **Fencing** (3): a session carrying an older epoch than the durable one is refused.
//! - **Verification** (4): every file's blake3 is checked before it can be committed; a
//!   mismatch is answered with a retry (the sender sends it whole), never committed.
//! - **Confinement** (7): paths are parsed into `RelPath`s, every parent must be a directory in
//!   the resulting manifest, and the workspace is only touched through `fsx::Root`.
//! - **Bounded resources** (8): chunks are at most a few MiB; bases are mapped, not read.
//!
//! One session at a time holds the replica; a newer session from the same peer preempts an
//! older one (a sender that reconnected after a network cut), discarding what the old one
//! staged but never committed.

pub mod apply;
pub mod stage;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rayon::prelude::*;
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::disk::epoch::EpochStore;
use crate::disk::fsx::{self, Root};
use crate::proto::replica_server::{Replica, ReplicaServer};
use crate::proto::state::{Change, Record};
use crate::proto::{
    CommitResult, Entry, HelloReply, ManifestChunk, ManifestItem, ReplicaStatus, Signature,
    StatusRequest, SyncRequest, SyncResponse, chunk, op, sync_request, sync_response, upsert,
};
use crate::replication::catalog::Catalog;
use crate::replication::delta;
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::replication::receive::apply::{
    apply_record, clear_stage, set_file_meta, sync_applied, sync_staged,
};
use crate::replication::receive::stage::{Base, Direct, Patch};
use crate::replication::scan::STAGE_DIR_NAME;
use crate::text::hex;
use crate::trust::identity::Identity;
use crate::trust::tls;
use crate::types::{Epoch, Generation, RelPath};

/// Name of the catalog (`<state-dir>/replica.{snap,log}`) holding an agent's replica state.
pub const CATALOG: &str = "replica";

/// Version of the replication protocol spoken here.
pub const PROTOCOL: u32 = 1;
/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest inline file.
pub const MAX_INLINE: usize = 4 << 20;
const SIG_PIECE: usize = 1 << 20;
/// Suffix of a streamed file's full staged copy, once its in-place patch grew too big.
const FULL: &str = ".full";

pub struct ReceiverOptions {
    pub workspace: PathBuf,
    pub state_dir: PathBuf,
    /// The only identity allowed to replicate into this receiver.
    pub sender: Identity,
    /// On a first start (no catalog yet), take what is already in the workspace as generation 0,
    /// so a sender can reuse it as delta bases (a CPU standby seeded by hand). An agent that will
    /// send first does not need it.
    pub adopt: bool,
    /// Accept sessions from the start (a standby) or only once told to (see `set_accepting`).
    pub accepting: bool,
}

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

struct Inner {
    workspace: PathBuf,
    root: Root,
    stage_path: PathBuf,
    stage: OwnedFd,
    sender: Identity,
    state: Arc<tokio::sync::Mutex<State>>,
    session: Mutex<Option<(u64, CancellationToken)>>,
    sessions: AtomicU64,
    figures: Mutex<Figures>,
    accepting: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
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

fn same_device(a: &Path, b: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(a)?.dev() == std::fs::metadata(b)?.dev())
}

impl Receiver {
    /// Opens the replica: takes the catalog, rolls forward a generation that was committed but
    /// not fully applied, clears leftovers of uncommitted ones, and adopts an existing workspace
    /// on first start. Blocking; call before serving.
    pub fn open(opts: ReceiverOptions) -> Result<Receiver, OpenError> {
        std::fs::create_dir_all(&opts.workspace)?;
        std::fs::create_dir_all(&opts.state_dir)?;
        std::fs::set_permissions(&opts.state_dir, std::fs::Permissions::from_mode(0o700))?;
        let stage_path = if same_device(&opts.workspace, &opts.state_dir)? {
            opts.state_dir.join("stage")
        } else {
            opts.workspace.join(STAGE_DIR_NAME)
        };
        std::fs::create_dir_all(&stage_path)?;
        std::fs::set_permissions(&stage_path, std::fs::Permissions::from_mode(0o700))?;
        let root = Root::open(&opts.workspace)?;
        let stage = fsx::open_dir_path(&stage_path)?;
        crate::replication::receive::apply::prepare_stage(stage.as_fd())?;
        let fresh = opts.adopt
            && !opts.state_dir.join(format!("{CATALOG}.log")).exists()
            && !opts.state_dir.join(format!("{CATALOG}.snap")).exists();
        let loaded = Catalog::open(&opts.state_dir, CATALOG)?;
        let mut manifest = loaded.manifest;
        let mut catalog = loaded.catalog;
        if let Some(rec) = loaded.unapplied {
            tracing::info!(
                generation = rec.generation,
                "rolling forward a committed generation"
            );
            apply_record(&root, stage.as_fd(), &rec, &manifest)?;
            sync_applied(&root, &rec, &manifest)?;
            catalog.mark_applied(Generation(rec.generation))?;
            catalog.sync()?;
        }
        let cleared = clear_stage(stage.as_fd())?;
        if cleared > 0 {
            tracing::info!(
                cleared,
                "discarded staged files of a generation that never committed"
            );
        }
        if fresh {
            manifest = adopt(&opts.workspace, &stage_path)?;
            if !manifest.is_empty() {
                tracing::info!(
                    entries = manifest.len(),
                    bytes = manifest.total_bytes(),
                    "adopted the existing workspace as generation 0"
                );
            }
            catalog.reset(&manifest)?;
        }
        let epoch = EpochStore::open(&opts.state_dir)?;
        let figures = Figures {
            epoch: epoch.get(),
            generation: manifest.generation,
            root: manifest.root(),
            entries: manifest.len() as u64,
            bytes: manifest.total_bytes(),
            ..Default::default()
        };
        Ok(Receiver {
            inner: Arc::new(Inner {
                workspace: opts.workspace,
                root,
                stage_path,
                stage,
                sender: opts.sender,
                state: Arc::new(tokio::sync::Mutex::new(State {
                    manifest,
                    catalog,
                    epoch,
                    unapplied: None,
                })),
                session: Mutex::new(None),
                sessions: AtomicU64::new(0),
                figures: Mutex::new(figures),
                accepting: std::sync::atomic::AtomicBool::new(opts.accepting),
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

    /// Refreshes the figures from the state (after a sender used it).
    pub async fn refresh_figures(&self) {
        let st = self.inner.state.lock().await;
        let mut f = self.inner.figures.lock().expect("figures");
        f.epoch = st.epoch.get();
        f.generation = st.manifest.generation;
        f.root = st.manifest.root();
        f.entries = st.manifest.len() as u64;
        f.bytes = st.manifest.total_bytes();
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
        ReplicaServer::new(ReplicaService {
            inner: self.inner.clone(),
        })
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

    fn preempt(&self) {
        if let Some((_, tok)) = self.inner.session.lock().expect("session lock").take() {
            tok.cancel();
        }
    }
}

/// Builds generation 0 from what is already in the workspace (hashing every file), so a sender
/// can reuse it as delta bases instead of sending everything again.
fn adopt(workspace: &Path, stage_path: &Path) -> io::Result<Manifest> {
    use crate::replication::scan::{Exclude, Scope, walk};
    let ex = Exclude::new(workspace, stage_path);
    let (w, _) = walk(workspace, &Scope::Full, &ex);
    let hashed: Vec<(RelPath, Entry)> = w
        .entries
        .par_iter()
        .filter_map(|(p, st)| {
            let mut e = st.entry();
            if st.kind == Kind::File {
                let mut h = blake3::Hasher::new();
                match h.update_mmap(p.to_path(workspace)) {
                    Ok(_) => e.blake3 = h.finalize().as_bytes().to_vec().into(),
                    Err(err) => {
                        tracing::warn!(path = %p, error = %err, "cannot read while adopting; leaving it out");
                        return None;
                    }
                }
            }
            Some((p.clone(), e))
        })
        .collect();
    let mut m = Manifest::new();
    for (p, e) in hashed {
        m.insert(p, e);
    }
    Ok(m)
}

pub struct ReplicaService {
    inner: Arc<Inner>,
}

fn status_io(what: &str, e: io::Error) -> Status {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        Status::resource_exhausted(format!(
            "receiver disk full while {what}: {e}; the generation is not committed and the previous one is intact"
        ))
    } else {
        Status::internal(format!("receiver i/o error while {what}: {e}"))
    }
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    type SyncStream = ReceiverStream<Result<SyncResponse, Status>>;

    async fn sync(
        &self,
        req: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let peer = tls::peer_of(&req)?;
        if peer.identity != self.inner.sender {
            tracing::warn!(peer = %peer.identity, addr = ?peer.addr, "replication refused: not the paired sender");
            return Err(Status::permission_denied(format!(
                "replication is accepted only from {}; you are {}",
                self.inner.sender, peer.identity
            )));
        }
        if !self.inner.accepting.load(Ordering::SeqCst) {
            let epoch = self.inner.figures.lock().expect("figures").epoch;
            return Err(Status::unavailable(format!(
                "this agent does not accept replication now (it is a primary, or idle) at epoch {epoch}"
            )));
        }
        let stream = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let inner = self.inner.clone();
        let id = inner.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!("session", id, peer = ?peer.addr);
        tokio::spawn(
            async move {
                let out = tx.clone();
                match run_session(inner.clone(), id, stream, tx).await {
                    Ok(()) => tracing::info!("session closed by the sender"),
                    Err(st) => {
                        match st.code() {
                            tonic::Code::Cancelled => tracing::info!(why = st.message(), "session ended"),
                            tonic::Code::Unknown | tonic::Code::Unavailable => {
                                tracing::info!(error = st.message(), "sender disconnected")
                            }
                            _ => tracing::warn!(code = ?st.code(), error = st.message(), "session refused"),
                        }
                        let _ = out.send(Err(st)).await;
                    }
                }
                let mut cur = inner.session.lock().expect("session lock");
                if cur.as_ref().is_some_and(|(i, _)| *i == id) {
                    *cur = None;
                    inner.figures.lock().expect("figures").session_active = false;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<ReplicaStatus>, Status> {
        let peer = tls::peer_of(&req)?;
        let allowed = peer.identity == self.inner.sender
            || matches!(
                peer.identity,
                Identity::Admin { .. } | Identity::Coordinator
            )
            || peer.identity.pair() == self.inner.sender.pair();
        if !allowed {
            return Err(Status::permission_denied(format!(
                "{} may not read this replica's status",
                peer.identity
            )));
        }
        let f = self.inner.figures.lock().expect("figures").clone();
        Ok(Response::new(ReplicaStatus {
            epoch: f.epoch.0,
            generation: f.generation.0,
            root: f.root.to_vec().into(),
            entries: f.entries,
            bytes: f.bytes,
            session_active: f.session_active,
            last_data_age_ms: f
                .last_data
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0),
            last_commit_unix_ms: f
                .last_commit
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PState {
    Ready,
    /// In a staging batch that has not landed yet.
    Staging,
    Streaming,
    Rejected,
}

struct Pending {
    change: Change,
    state: PState,
}

/// Where a streamed file's bytes go (see `stage`).
enum Sink {
    Direct(Direct),
    Patch(Patch),
    /// Transient, while a patch turns into a full copy.
    Switching,
}

struct OpenStream {
    path: RelPath,
    /// Location inside the stage (a bucket file, or the final name in a staged directory).
    name: Vec<u8>,
    placed: bool,
    sink: Sink,
    entry: Entry,
    hasher: blake3::Hasher,
    written: u64,
    base: Option<Arc<Base>>,
    /// Inode of the replica's file being patched in place.
    base_ino: u64,
    corrupt: Option<String>,
}

/// One generation being received.
struct Gen {
    generation: Generation,
    changes: BTreeMap<RelPath, Pending>,
    /// Files being streamed, each written by its own worker.
    streams: HashMap<u32, StreamHandle>,
    /// Streams closed by the sender whose workers are finishing them.
    finishing: Vec<(RelPath, oneshot::Receiver<Result<Finished, Status>>)>,
    /// Staging batches running beside the session.
    batches: std::collections::VecDeque<tokio::task::JoinHandle<BatchOut>>,
    bases: Arc<Mutex<HashMap<u32, Arc<Base>>>>,
    seq: u64,
    /// Directories new in this generation, built whole in the stage (path inside it).
    new_dirs: HashMap<RelPath, Vec<u8>>,
    /// Every top-level item this generation created in the stage.
    created: Vec<String>,
}

impl Gen {
    /// Where `p` goes inside the stage when its parent is a new directory staged whole.
    fn placed_loc(&self, p: &RelPath) -> Option<Vec<u8>> {
        let loc = self.new_dirs.get(&p.parent()?)?;
        let mut v = loc.clone();
        v.push(b'/');
        v.extend_from_slice(p.name());
        Some(v)
    }

    fn stage_name(&mut self) -> String {
        self.seq += 1;
        let name = format!(
            "{:02x}/g{}-{}",
            self.seq % crate::replication::receive::apply::STAGE_BUCKETS,
            self.generation.0,
            self.seq
        );
        self.created.push(name.clone());
        name
    }

    /// Removes everything this generation staged, once nothing of it is still being written.
    /// A stream worker drains the chunks it was handed before it sees its channel close, and a
    /// staging batch cannot be stopped once it runs: either could otherwise create a file after
    /// the removal (left behind), or after the replica's lock went to the next session, whose
    /// stage names are the same.
    async fn abandon(mut self, stage: &OwnedFd) {
        for (_, h) in std::mem::take(&mut self.streams) {
            drop(h.tx);
            let _ = h.done.await;
        }
        for (_, done) in std::mem::take(&mut self.finishing) {
            let _ = done.await;
        }
        while let Some(b) = self.batches.pop_front() {
            let _ = b.await;
        }
        self.discard(stage);
    }

    /// Removes everything this generation staged (no worker of it may still be running: see
    /// `abandon`). A streamed patch that became a full copy is staged as `<name>.full`.
    fn discard(self, stage: &OwnedFd) {
        for b in &self.batches {
            b.abort();
        }
        for name in self.created {
            let _ = fsx::remove_tree_at(stage.as_fd(), name.as_bytes());
            let _ = fsx::remove_tree_at(stage.as_fd(), format!("{name}{FULL}").as_bytes());
        }
    }
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn rel(path: &[u8]) -> Result<RelPath, Status> {
    let p = RelPath::new(path.to_vec()).map_err(|e| {
        bad(format!(
            "refused path {:?}: {e}",
            String::from_utf8_lossy(path)
        ))
    })?;
    if p.starts_with(&RelPath::new(STAGE_DIR_NAME).expect("valid")) {
        return Err(bad(format!("refused path {p}: reserved name")));
    }
    Ok(p)
}

async fn run_session(
    inner: Arc<Inner>,
    id: u64,
    mut stream: Streaming<SyncRequest>,
    tx: mpsc::Sender<Result<SyncResponse, Status>>,
) -> Result<(), Status> {
    let first = match stream.next().await {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Err(e),
        None => return Ok(()),
    };
    let Some(sync_request::Msg::Hello(hello)) = first.msg else {
        return Err(bad("the first message of a session must be hello"));
    };
    if hello.protocol != PROTOCOL {
        return Err(Status::failed_precondition(format!(
            "protocol {} not supported (this receiver speaks {PROTOCOL})",
            hello.protocol
        )));
    }
    // Take over from an older session of the same sender.
    let token = CancellationToken::new();
    if let Some((_, old)) = inner
        .session
        .lock()
        .expect("session lock")
        .replace((id, token.clone()))
    {
        old.cancel();
    }
    let mut guard = tokio::select! {
        g = inner.state.clone().lock_owned() => g,
        _ = token.cancelled() => return Err(Status::cancelled("superseded by a newer session")),
        _ = tokio::time::sleep(Duration::from_secs(60)) => return Err(Status::unavailable("replica busy")),
    };
    // Roll forward a commit whose application failed earlier, before anything else.
    if let Some(rec) = guard.unapplied.take() {
        let (g, r) = blocking(guard, {
            let inner = inner.clone();
            move |st: &mut State| retry_apply(&inner, st, rec)
        })
        .await?;
        guard = g;
        r?;
    }
    let epoch = guard.epoch.get();
    let hello_epoch = Epoch(hello.epoch);
    if hello_epoch < epoch {
        return Err(Status::failed_precondition(format!(
            "fenced: stale epoch {hello_epoch} < {epoch}; this replica no longer accepts data from that epoch"
        )));
    }
    if hello_epoch > epoch {
        guard
            .epoch
            .raise(hello_epoch)
            .map_err(|e| Status::internal(format!("persisting epoch: {e}")))?;
        inner.figures.lock().expect("figures").epoch = hello_epoch;
    }
    inner.figures.lock().expect("figures").session_active = true;
    tracing::info!(sender = %hello.sender, epoch = %hello_epoch, generation = %guard.manifest.generation, "session started");
    send(
        &tx,
        sync_response::Msg::Hello(HelloReply {
            protocol: PROTOCOL,
            epoch: hello_epoch.0,
            generation: guard.manifest.generation.0,
            root: guard.manifest.root().to_vec().into(),
            entries: guard.manifest.len() as u64,
        }),
    )
    .await?;

    let (sig_tx, sig_rx) = mpsc::channel::<SigJob>(64);
    let sig_worker = tokio::spawn(sig_worker(inner.clone(), sig_rx, tx.clone()));
    let mut cur: Option<Gen> = None;
    let result = async {
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = token.cancelled() => return Err(Status::cancelled("superseded by a newer session")),
            };
            let msg = match msg {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            };
            inner.figures.lock().expect("figures").last_data = Some(Instant::now());
            let Some(msg) = msg.msg else {
                return Err(bad("empty message"));
            };
            guard = handle(&inner, guard, hello_epoch, &mut cur, msg, &tx, &sig_tx).await?;
        }
    }
    .await;
    sig_worker.abort();
    if let Some(g) = cur.take() {
        g.abandon(&inner.stage).await;
    }
    result
}

async fn send(
    tx: &mpsc::Sender<Result<SyncResponse, Status>>,
    msg: sync_response::Msg,
) -> Result<(), Status> {
    tx.send(Ok(SyncResponse { msg: Some(msg) }))
        .await
        .map_err(|_| Status::cancelled("sender went away"))
}

/// Runs `f` on the blocking pool with the replica state, and hands the state back.
async fn blocking<T: Send + 'static>(
    mut guard: OwnedMutexGuard<State>,
    f: impl FnOnce(&mut State) -> T + Send + 'static,
) -> Result<(OwnedMutexGuard<State>, T), Status> {
    tokio::task::spawn_blocking(move || {
        let r = f(&mut guard);
        (guard, r)
    })
    .await
    .map_err(|e| Status::internal(format!("worker failed: {e}")))
}

fn retry_apply(inner: &Inner, st: &mut State, rec: Record) -> Result<(), Status> {
    let r = apply_record(&inner.root, inner.stage.as_fd(), &rec, &st.manifest)
        .and_then(|_| sync_applied(&inner.root, &rec, &st.manifest));
    match r {
        Ok(()) => {
            let _ = st.catalog.mark_applied(Generation(rec.generation));
            let _ = clear_stage(inner.stage.as_fd());
            Ok(())
        }
        Err(e) => {
            st.unapplied = Some(rec);
            Err(status_io(
                "rolling forward the last committed generation",
                e,
            ))
        }
    }
}

struct SigJob {
    file: u32,
    path: RelPath,
    block_size: u32,
    expect: Option<Entry>,
    bases: Arc<Mutex<HashMap<u32, Arc<Base>>>>,
}

/// Computes signatures one at a time, in order, beside the session (so literal data keeps
/// flowing while a big base is being read).
async fn sig_worker(
    inner: Arc<Inner>,
    mut rx: mpsc::Receiver<SigJob>,
    tx: mpsc::Sender<Result<SyncResponse, Status>>,
) {
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

/// How many bases (files whose signature was sent, mapped until their delta arrives) one
/// generation may hold open. The agent's sender asks at most 8 ahead; past this a request gets
/// "missing" (send it whole) instead of another open file.
const MAX_BASES: usize = 64;

fn compute_sig(inner: &Inner, job: SigJob) -> io::Result<Vec<Signature>> {
    let Some(expect) = job.expect else {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no committed file"));
    };
    if job.bases.lock().expect("bases").len() >= MAX_BASES {
        return Err(io::Error::other(format!(
            "{MAX_BASES} files already await their delta in this generation"
        )));
    }
    let (dir, name) = inner.root.open_parent(&job.path)?;
    let f = fsx::openat_file(dir.as_fd(), name)?;
    let md = f.metadata()?;
    if !md.is_file() || md.len() != expect.size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "replica file differs from the manifest",
        ));
    }
    let base = Arc::new(Base::new(f)?);
    let sig = delta::signature(base.bytes(), job.block_size);
    job.bases
        .lock()
        .expect("bases")
        .insert(job.file, base.clone());
    let pieces: Vec<&[u8]> = if sig.is_empty() {
        vec![&[]]
    } else {
        sig.chunks(SIG_PIECE).collect()
    };
    let n = pieces.len();
    Ok(pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| Signature {
            file: job.file,
            base_size: md.len(),
            data: Bytes::copy_from_slice(p),
            last: i + 1 == n,
            missing: false,
        })
        .collect())
}

async fn handle(
    inner: &Arc<Inner>,
    mut guard: OwnedMutexGuard<State>,
    epoch: Epoch,
    cur: &mut Option<Gen>,
    msg: sync_request::Msg,
    tx: &mpsc::Sender<Result<SyncResponse, Status>>,
    sig_tx: &mpsc::Sender<SigJob>,
) -> Result<OwnedMutexGuard<State>, Status> {
    use sync_request::Msg;
    match msg {
        Msg::Hello(_) => return Err(bad("hello sent twice")),
        Msg::Manifest(_) => {
            if cur.is_some() {
                return Err(bad("manifest asked for in the middle of a generation"));
            }
            send_manifest(&guard.manifest, tx).await?;
        }
        Msg::Begin(b) => {
            if cur.is_some() {
                return Err(bad("begin inside a generation"));
            }
            let expected = guard.manifest.generation.next();
            if b.generation != expected.0 {
                return Err(Status::failed_precondition(format!(
                    "generation {} cannot follow committed generation {}",
                    b.generation, guard.manifest.generation
                )));
            }
            *cur = Some(Gen {
                generation: expected,
                changes: BTreeMap::new(),
                streams: HashMap::new(),
                bases: Arc::new(Mutex::new(HashMap::new())),
                seq: 0,
                new_dirs: HashMap::new(),
                created: Vec::new(),
                finishing: Vec::new(),
                batches: Default::default(),
            });
        }
        Msg::Ops(ops) => {
            let g = cur
                .as_mut()
                .ok_or_else(|| bad("ops outside a generation"))?;
            handle_ops(inner, &guard.manifest, g, ops.ops).await?;
        }
        Msg::Sig(s) => {
            let g = cur
                .as_mut()
                .ok_or_else(|| bad("signature request outside a generation"))?;
            delta::check_block_size(s.block_size).map_err(|e| bad(e.to_string()))?;
            let path = rel(&s.path)?;
            let expect = guard
                .manifest
                .get(&path)
                .filter(|e| kind_of(e) == Some(Kind::File))
                .cloned();
            sig_tx
                .send(SigJob {
                    file: s.file,
                    path,
                    block_size: s.block_size,
                    expect,
                    bases: g.bases.clone(),
                })
                .await
                .map_err(|_| Status::internal("signature worker stopped"))?;
        }
        Msg::Chunk(c) => {
            let g = cur
                .as_mut()
                .ok_or_else(|| bad("chunk outside a generation"))?;
            let h = g
                .streams
                .get(&c.file)
                .ok_or_else(|| bad(format!("chunk for unknown file {}", c.file)))?;
            h.tx.send(StreamMsg::Chunk(c))
                .await
                .map_err(|_| Status::internal("stream writer stopped"))?;
        }
        Msg::End(end) => {
            let g = cur
                .as_mut()
                .ok_or_else(|| bad("file end outside a generation"))?;
            let h = g
                .streams
                .remove(&end.file)
                .ok_or_else(|| bad(format!("end of unknown file {}", end.file)))?;
            h.tx.send(StreamMsg::End(end))
                .await
                .map_err(|_| Status::internal("stream writer stopped"))?;
            g.finishing.push((h.path, h.done));
        }
        Msg::Commit(c) => {
            let mut g = cur
                .take()
                .ok_or_else(|| bad("commit outside a generation"))?;
            if c.generation != g.generation.0 {
                let e = bad(format!(
                    "commit of generation {} inside generation {}",
                    c.generation, g.generation
                ));
                g.abandon(&inner.stage).await;
                return Err(e);
            }
            if let Err(e) = settle(&mut g).await {
                g.abandon(&inner.stage).await;
                return Err(e);
            }
            let retry: Vec<Bytes> = g
                .changes
                .iter()
                .filter(|(_, p)| p.state == PState::Rejected)
                .map(|(k, _)| Bytes::from(k.as_bytes().to_vec()))
                .collect();
            if !retry.is_empty() {
                let generation = g.generation;
                *cur = Some(g);
                send(
                    tx,
                    sync_response::Msg::Commit(CommitResult {
                        generation: generation.0,
                        committed: false,
                        retry,
                        ..Default::default()
                    }),
                )
                .await?;
                return Ok(guard);
            }
            let started = Instant::now();
            let inner2 = inner.clone();
            let want = c.root.to_vec();
            let (g2, r) = blocking(guard, move |st| commit(&inner2, st, g, epoch, &want)).await?;
            guard = g2;
            let (generation, root) = r?;
            let commit_ms = started.elapsed().as_millis() as u64;
            {
                let mut f = inner.figures.lock().expect("figures");
                f.generation = generation;
                f.root = root;
                f.entries = guard.manifest.len() as u64;
                f.bytes = guard.manifest.total_bytes();
                f.last_commit = Some(SystemTime::now());
            }
            tracing::debug!(%generation, commit_ms, "generation committed");
            send(
                tx,
                sync_response::Msg::Commit(CommitResult {
                    generation: generation.0,
                    committed: true,
                    root: root.to_vec().into(),
                    retry: vec![],
                    commit_ms,
                }),
            )
            .await?;
        }
    }
    Ok(guard)
}

async fn send_manifest(
    m: &Manifest,
    tx: &mpsc::Sender<Result<SyncResponse, Status>>,
) -> Result<(), Status> {
    let root = Bytes::from(m.root().to_vec());
    let mut items = Vec::new();
    let mut size = 0usize;
    let mut iter = m.iter().peekable();
    while let Some((p, e)) = iter.next() {
        size += p.as_bytes().len() + 64 + e.target.len();
        items.push(ManifestItem {
            path: p.as_bytes().to_vec().into(),
            entry: Some(e.clone()),
        });
        if size > (1 << 20) || iter.peek().is_none() {
            let last = iter.peek().is_none();
            send(
                tx,
                sync_response::Msg::Manifest(ManifestChunk {
                    generation: m.generation.0,
                    root: root.clone(),
                    items: std::mem::take(&mut items),
                    last,
                }),
            )
            .await?;
            size = 0;
        }
    }
    if m.is_empty() {
        send(
            tx,
            sync_response::Msg::Manifest(ManifestChunk {
                generation: m.generation.0,
                root,
                items: vec![],
                last: true,
            }),
        )
        .await?;
    }
    Ok(())
}

/// An inline file to verify and pack.
struct InlineJob {
    path: RelPath,
    entry: Entry,
    data: Bytes,
    zstd: bool,
}

fn check_entry(p: &RelPath, e: &Entry) -> Result<Kind, Status> {
    let k = kind_of(e).ok_or_else(|| bad(format!("{p}: entry without a valid kind")))?;
    if e.mode & !0o7777 != 0 {
        return Err(bad(format!("{p}: invalid mode {:#o}", e.mode)));
    }
    match k {
        Kind::Symlink => {
            if e.target.is_empty()
                || e.target.len() > crate::types::MAX_PATH
                || e.target.contains(&0)
            {
                return Err(bad(format!("{p}: invalid symlink target")));
            }
        }
        Kind::File => {
            if !e.target.is_empty() {
                return Err(bad(format!("{p}: file with a link target")));
            }
        }
        Kind::Dir => {}
    }
    Ok(k)
}

async fn handle_ops(
    inner: &Arc<Inner>,
    manifest: &Manifest,
    g: &mut Gen,
    ops: Vec<crate::proto::Op>,
) -> Result<(), Status> {
    let mut inline = Vec::new();
    let mut placed_inline: Vec<(InlineJob, Vec<u8>)> = Vec::new();
    let mut links: Vec<(RelPath, RelPath, Entry, String)> = Vec::new();
    let mut symlinks: Vec<(RelPath, Entry, Vec<u8>)> = Vec::new();
    for o in ops {
        let path = rel(&o.path)?;
        if let Some(prev) = g.changes.get(&path)
            && prev.state != PState::Rejected
        {
            return Err(bad(format!("second change to {path} in one generation")));
        }
        let old = manifest.get(&path);
        let old_kind = old.and_then(kind_of);
        match o
            .change
            .ok_or_else(|| bad(format!("{path}: op without a change")))?
        {
            op::Change::Delete(k) => {
                let k =
                    Kind::from_proto(k).ok_or_else(|| bad(format!("{path}: delete of no kind")))?;
                match old_kind {
                    None => continue, // already absent
                    Some(ok) if ok != k => {
                        return Err(bad(format!(
                            "delete of {path} as a {k:?}, but the replica holds a {ok:?}"
                        )));
                    }
                    Some(_) => {}
                }
                g.changes.insert(
                    path.clone(),
                    Pending {
                        change: Change {
                            path: path.into_bytes().into(),
                            entry: None,
                            old_kind: k.to_proto(),
                            ..Default::default()
                        },
                        state: PState::Ready,
                    },
                );
            }
            op::Change::Upsert(u) => {
                let mut entry = u
                    .entry
                    .ok_or_else(|| bad(format!("{path}: upsert without entry")))?;
                entry.ino = 0;
                entry.verify = false;
                let kind = check_entry(&path, &entry)?;
                let old_kind_field = match old_kind {
                    Some(ok) if ok != kind => ok.to_proto(),
                    _ => 0,
                };
                let mut change = Change {
                    path: path.as_bytes().to_vec().into(),
                    entry: Some(entry.clone()),
                    old_kind: old_kind_field,
                    ..Default::default()
                };
                let content = u.content.unwrap_or(upsert::Content::Keep(true));
                let mut state = PState::Ready;
                let placed = g.placed_loc(&path);
                match (kind, content) {
                    (Kind::Dir, upsert::Content::Keep(_)) if old_kind != Some(Kind::Dir) => {
                        // A new directory: built whole in the stage, renamed into place at
                        // commit with everything written inside it.
                        let loc = match placed {
                            Some(loc) => {
                                change.placed = true;
                                loc
                            }
                            None => {
                                let name = g.stage_name();
                                change.stage = name.clone();
                                name.into_bytes()
                            }
                        };
                        fsx::mkdirat(inner.stage.as_fd(), &loc, 0o700)
                            .map_err(|e| status_io("staging", e))?;
                        g.new_dirs.insert(path.clone(), loc);
                    }
                    (Kind::Dir, upsert::Content::Keep(_)) => {}
                    (Kind::Symlink, upsert::Content::Keep(_)) => {
                        let loc = match placed {
                            Some(loc) => {
                                change.placed = true;
                                loc
                            }
                            None => {
                                let name = g.stage_name();
                                change.stage = name.clone();
                                name.into_bytes()
                            }
                        };
                        symlinks.push((path.clone(), entry.clone(), loc));
                    }
                    (Kind::File, upsert::Content::Keep(_)) => {
                        let same = old.is_some_and(|o| {
                            kind_of(o) == Some(Kind::File)
                                && o.blake3 == entry.blake3
                                && o.size == entry.size
                        });
                        if !same {
                            return Err(bad(format!(
                                "{path}: metadata-only change, but the replica's content differs"
                            )));
                        }
                        entry.ino = old.map(|o| o.ino).unwrap_or(0);
                        change.entry = Some(entry);
                        change.set_meta = true;
                    }
                    (Kind::File, upsert::Content::Inline(data)) => {
                        if entry.size as usize > MAX_INLINE || data.len() > MAX_INLINE {
                            return Err(bad(format!("{path}: inline file too large")));
                        }
                        let job = InlineJob {
                            path: path.clone(),
                            entry,
                            data,
                            zstd: u.zstd,
                        };
                        match placed {
                            Some(loc) => {
                                change.placed = true;
                                placed_inline.push((job, loc));
                            }
                            None => inline.push(job),
                        }
                        state = PState::Staging;
                    }
                    (Kind::File, upsert::Content::CopyFrom(src)) => {
                        let src = rel(&src)?;
                        let name = g.stage_name();
                        change.stage = name.clone();
                        change.set_meta = true;
                        links.push((path.clone(), src, entry, name));
                    }
                    (Kind::File, upsert::Content::Stream(id)) => {
                        if g.streams.contains_key(&id) {
                            return Err(bad(format!("file id {id} already streaming")));
                        }
                        if g.streams.len() >= MAX_STREAMS {
                            return Err(bad(format!(
                                "{path}: more than {MAX_STREAMS} files streaming at once"
                            )));
                        }
                        let base = if u.delta {
                            Some(g.bases.lock().expect("bases").remove(&id).ok_or_else(|| {
                                bad(format!("{path}: delta without a signature request"))
                            })?)
                        } else {
                            None
                        };
                        let is_placed = placed.is_some();
                        let name = placed.unwrap_or_else(|| g.stage_name().into_bytes());
                        let sink = match &base {
                            Some(b) if !b.bytes().is_empty() && !is_placed => {
                                Patch::create(inner.stage.as_fd(), &name).map(Sink::Patch)
                            }
                            _ => Direct::create(inner.stage.as_fd(), &name).map(Sink::Direct),
                        }
                        .map_err(|e| status_io("staging", e))?;
                        let worker = spawn_stream(
                            inner.clone(),
                            OpenStream {
                                path: path.clone(),
                                name,
                                placed: is_placed,
                                sink,
                                entry,
                                hasher: blake3::Hasher::new(),
                                written: 0,
                                base,
                                base_ino: old.map(|o| o.ino).unwrap_or(0),
                                corrupt: None,
                            },
                        );
                        g.streams.insert(id, worker);
                        state = PState::Streaming;
                    }
                    (k, _) => {
                        return Err(bad(format!("{path}: a {k:?} cannot carry file content")));
                    }
                }
                g.changes.insert(path, Pending { change, state });
            }
        }
    }

    // Stage the batch off the async threads.
    let stage_inner = inner.clone();
    let manifest_links: Vec<(RelPath, RelPath, Entry, String, Option<Entry>)> = links
        .into_iter()
        .map(|(p, s, e, n)| {
            let src = manifest.get(&s).cloned();
            (p, s, e, n, src)
        })
        .collect();
    let pack = (!inline.is_empty()).then(|| g.stage_name());
    let batch = tokio::task::spawn_blocking(move || {
        let inner = stage_inner;
        let mut out = BatchOut {
            results: Vec::new(),
            packed: HashMap::new(),
            pack: pack.clone(),
            error: None,
        };
        if let Some(name) = &pack {
            match stage_pack(&inner, name, inline) {
                Ok(r) => {
                    for (p, e) in r {
                        if let Some((_, off)) = &e {
                            out.packed.insert(p.clone(), *off);
                        }
                        out.results.push((p, Ok(e.map(|(e, _)| e))));
                    }
                }
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        let placed: Vec<(RelPath, Result<Option<Entry>, io::Error>)> = placed_inline
            .into_par_iter()
            .map(|(j, loc)| {
                let p = j.path.clone();
                (p, stage_placed(&inner, j, &loc))
            })
            .collect();
        out.results.extend(placed);
        for (p, e, n) in symlinks {
            let r = fsx::symlinkat(&e.target, inner.stage.as_fd(), &n)
                .and_then(|_| fsx::set_mtime_at(inner.stage.as_fd(), &n, e.mtime_ns))
                .map(|_| Some(e));
            out.results.push((p, r));
        }
        for (p, src, e, n, src_entry) in manifest_links {
            out.results
                .push((p, stage_link(&inner, &src, e, &n, src_entry)));
        }
        out
    });
    g.batches.push_back(batch);
    // Bounded: a slow disk slows the sender down instead of piling up work here.
    while g.batches.len() > MAX_BATCHES {
        let b = g.batches.pop_front().expect("non-empty");
        let out = b.await.map_err(|e| Status::internal(e.to_string()))?;
        apply_batch(g, out)?;
    }
    Ok(())
}

/// Staging batches in flight beside a session.
const MAX_BATCHES: usize = 3;
/// Files a generation may have streaming at once (the sender streams one at a time). Each holds
/// a thread of the blocking pool until its end: unbounded, a sender could take them all, and
/// the session would wait forever on a writer that never gets a thread, holding the replica.
const MAX_STREAMS: usize = 64;

/// What a staging batch did.
struct BatchOut {
    results: Vec<(RelPath, Result<Option<Entry>, io::Error>)>,
    packed: HashMap<RelPath, u64>,
    pack: Option<String>,
    error: Option<io::Error>,
}

fn apply_batch(g: &mut Gen, out: BatchOut) -> Result<(), Status> {
    if let Some(e) = out.error {
        return Err(status_io("staging", e));
    }
    for (p, r) in out.results {
        let pending = g.changes.get_mut(&p).expect("staged change is pending");
        match r {
            Ok(Some(entry)) => {
                pending.change.entry = Some(entry);
                pending.state = PState::Ready;
                if let (Some(name), Some(off)) = (&out.pack, out.packed.get(&p)) {
                    pending.change.pack = name.clone();
                    pending.change.pack_offset = *off;
                }
            }
            Ok(None) => {
                tracing::warn!(path = %p, "content failed verification; asking for it whole");
                pending.state = PState::Rejected;
                pending.change.stage.clear();
                pending.change.placed = false;
            }
            Err(e) => return Err(status_io("staging", e)),
        }
    }
    Ok(())
}

/// Waits for every staging batch and stream of the generation, and records their outcomes.
async fn settle(g: &mut Gen) -> Result<(), Status> {
    if !g.streams.is_empty() {
        return Err(bad("commit with files still streaming"));
    }
    while let Some(b) = g.batches.pop_front() {
        let out = b.await.map_err(|e| Status::internal(e.to_string()))?;
        apply_batch(g, out)?;
    }
    for (path, rx) in std::mem::take(&mut g.finishing) {
        let f = rx
            .await
            .map_err(|_| Status::internal("stream writer stopped"))??;
        let Some(p) = g.changes.get_mut(&path) else {
            return Err(Status::internal("stream without a change"));
        };
        match f.outcome {
            StreamOutcome::Aborted => {
                g.changes.remove(&path);
            }
            StreamOutcome::Rejected(why) => {
                tracing::warn!(path = %path, why, "file failed verification; asking for it whole");
                p.state = PState::Rejected;
                p.change.stage.clear();
                p.change.placed = false;
            }
            StreamOutcome::Verified { entry, patch } => {
                p.change.entry = Some(entry);
                let name = String::from_utf8_lossy(&f.name).into_owned();
                match patch {
                    None if f.placed => p.change.placed = true,
                    None => p.change.stage = name,
                    Some(extents) => {
                        p.change.patch = name;
                        p.change.extents = extents;
                        p.change.set_meta = true;
                    }
                }
                p.state = PState::Ready;
            }
        }
    }
    Ok(())
}

enum StreamMsg {
    Chunk(crate::proto::Chunk),
    End(crate::proto::FileEnd),
}

/// The session's side of a stream worker.
struct StreamHandle {
    path: RelPath,
    tx: mpsc::Sender<StreamMsg>,
    done: oneshot::Receiver<Result<Finished, Status>>,
}

/// A stream the worker has finished.
struct Finished {
    name: Vec<u8>,
    placed: bool,
    outcome: StreamOutcome,
}

/// Writes one streamed file on a blocking thread, chunk by chunk, in order.
fn spawn_stream(inner: Arc<Inner>, mut s: OpenStream) -> StreamHandle {
    let (tx, mut rx) = mpsc::channel::<StreamMsg>(4);
    let (done_tx, done) = oneshot::channel();
    let path = s.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut failed: Option<Status> = None;
        while let Some(m) = rx.blocking_recv() {
            match m {
                StreamMsg::Chunk(c) => {
                    if failed.is_none()
                        && let Err(e) = write_chunk(inner.stage.as_fd(), &mut s, c)
                    {
                        failed = Some(e);
                    }
                }
                StreamMsg::End(end) => {
                    let r = match failed.take() {
                        Some(e) => {
                            let _ = fsx::unlinkat(inner.stage.as_fd(), &s.name, false);
                            Err(e)
                        }
                        None => finish_stream(&inner, &mut s, &end).map(|outcome| Finished {
                            name: s.name.clone(),
                            placed: s.placed,
                            outcome,
                        }),
                    };
                    let _ = done_tx.send(r);
                    return;
                }
            }
        }
    });
    StreamHandle { path, tx, done }
}

/// Verifies a small file and writes it at its final name inside a staged directory.
fn stage_placed(inner: &Inner, j: InlineJob, loc: &[u8]) -> io::Result<Option<Entry>> {
    let Some(data) = verify_inline(&j) else {
        return Ok(None);
    };
    let mut f = fsx::create_excl(inner.stage.as_fd(), loc)?;
    f.write_all(&data)?;
    set_file_meta(&f, &j.entry)?;
    let mut e = j.entry;
    e.ino = f.metadata()?.ino();
    Ok(Some(e))
}

/// The content of an inline file when it matches its declared size and hash.
fn verify_inline(j: &InlineJob) -> Option<Vec<u8>> {
    let data = if j.zstd {
        crate::replication::compress::decompress(&j.data, j.entry.size as usize).ok()
    } else {
        Some(j.data.to_vec())
    };
    data.filter(|d| {
        d.len() as u64 == j.entry.size && blake3::hash(d).as_bytes()[..] == j.entry.blake3[..]
    })
}

/// Verifies small files (in parallel) and writes those that match their hash, one after the
/// other, into one staged pack. Returns each file's entry and offset in the pack, or `None`
/// when its content does not match its hash.
type Packed = Vec<(RelPath, Option<(Entry, u64)>)>;

fn stage_pack(inner: &Inner, name: &str, jobs: Vec<InlineJob>) -> io::Result<Packed> {
    let verified: Vec<(RelPath, Entry, Option<Vec<u8>>)> = jobs
        .into_par_iter()
        .map(|j| {
            let ok = verify_inline(&j);
            (j.path, j.entry, ok)
        })
        .collect();
    let total: usize = verified
        .iter()
        .map(|(_, _, d)| d.as_ref().map_or(0, Vec::len))
        .sum();
    let mut buf = Vec::with_capacity(total);
    let mut out = Vec::with_capacity(verified.len());
    for (p, mut e, data) in verified {
        match data {
            Some(d) => {
                let off = buf.len() as u64;
                buf.extend_from_slice(&d);
                e.ino = 0; // known once written in place
                out.push((p, Some((e, off))));
            }
            None => out.push((p, None)),
        }
    }
    let mut f = fsx::create_excl(inner.stage.as_fd(), name.as_bytes())?;
    f.write_all(&buf)?;
    Ok(out)
}

/// Stages a rename: a hard link to the committed source, if it holds the declared content.
fn stage_link(
    inner: &Inner,
    src: &RelPath,
    e: Entry,
    name: &str,
    src_entry: Option<Entry>,
) -> io::Result<Option<Entry>> {
    let Some(s) = src_entry
        .filter(|s| kind_of(s) == Some(Kind::File) && s.blake3 == e.blake3 && s.size == e.size)
    else {
        return Ok(None);
    };
    let (dir, sname) = match inner.root.open_parent(src) {
        Ok(x) => x,
        Err(_) => return Ok(None),
    };
    match fsx::linkat(dir.as_fd(), sname, inner.stage.as_fd(), name.as_bytes()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => return Err(err),
        Err(_) => return Ok(None),
    }
    let st = fsx::lstat_at(inner.stage.as_fd(), name.as_bytes())?;
    match st {
        Some(st) if st.st_size as u64 == s.size => Ok(Some(Entry {
            ino: st.st_ino,
            ..e
        })),
        _ => {
            let _ = fsx::unlinkat(inner.stage.as_fd(), name.as_bytes(), false);
            Ok(None)
        }
    }
}

fn write_chunk(
    stage_fd: std::os::fd::BorrowedFd<'_>,
    s: &mut OpenStream,
    c: crate::proto::Chunk,
) -> Result<(), Status> {
    if s.corrupt.is_some() {
        return Ok(());
    }
    let len = c.len as usize;
    if len > delta::MAX_CHUNK {
        return Err(bad(format!(
            "{}: chunk of {len} bytes exceeds the limit",
            s.path
        )));
    }
    let data: Result<Bytes, String> = match c.data {
        Some(chunk::Data::Literal(b)) => {
            if b.len() != len {
                Err(format!("literal of {} bytes declared as {len}", b.len()))
            } else {
                Ok(b)
            }
        }
        Some(chunk::Data::LiteralZstd(b)) => crate::replication::compress::decompress(&b, len)
            .map_err(|e| format!("undecodable compressed literal: {e}"))
            .and_then(|d| {
                if d.len() == len {
                    Ok(d.into())
                } else {
                    Err(format!("literal of {} bytes declared as {len}", d.len()))
                }
            }),
        Some(chunk::Data::Delta(d)) => apply(s, &d, len).map(Bytes::from),
        Some(chunk::Data::DeltaZstd(d)) => {
            crate::replication::compress::decompress(&d, 2 * len + (1 << 20))
                .map_err(|e| format!("undecodable compressed delta: {e}"))
                .and_then(|d| apply(s, &d, len).map(Bytes::from))
        }
        None => Err("chunk without data".into()),
    };
    let data = match data {
        Ok(d) => d,
        Err(why) => {
            s.corrupt = Some(why);
            return Ok(());
        }
    };
    s.hasher.update(&data);
    let pos = s.written;
    s.written += len as u64;
    let io = |e| status_io("writing staged data", e);
    match &mut s.sink {
        Sink::Direct(w) => w.write(&data).map_err(io)?,
        Sink::Patch(p) => {
            let base = s.base.as_ref().map(|b| b.bytes()).unwrap_or(&[]);
            p.add(base, pos, &data).map_err(io)?;
            if p.too_big(s.written) {
                // Most of the file changed: a full copy is cheaper than patching in place.
                let Sink::Patch(p) = std::mem::replace(&mut s.sink, Sink::Switching) else {
                    unreachable!()
                };
                let mut full = s.name.clone();
                full.extend_from_slice(FULL.as_bytes());
                let w = Direct::create(stage_fd, &full).map_err(io)?;
                let w = p.into_direct(base, s.written, w).map_err(io)?;
                let _ = fsx::unlinkat(stage_fd, &s.name, false);
                s.name = full;
                s.sink = Sink::Direct(w);
            }
        }
        Sink::Switching => return Err(Status::internal("stream in an inconsistent state")),
    }
    Ok(())
}

fn apply(s: &OpenStream, delta: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let Some(base) = &s.base else {
        return Err("delta chunk for a file sent without a base".into());
    };
    delta::apply_window(base.bytes(), delta, len).map_err(|e| e.to_string())
}

enum StreamOutcome {
    Aborted,
    Rejected(String),
    /// Verified; `patch` holds the extents when the file is to be updated in place.
    Verified {
        entry: Entry,
        patch: Option<Vec<crate::proto::state::Extent>>,
    },
}

fn finish_stream(
    inner: &Inner,
    s: &mut OpenStream,
    end: &crate::proto::FileEnd,
) -> Result<StreamOutcome, Status> {
    let sink = std::mem::replace(&mut s.sink, Sink::Switching);
    let unlink = |s: &OpenStream, sink: Sink| {
        drop(sink);
        let _ = fsx::unlinkat(inner.stage.as_fd(), &s.name, false);
    };
    if end.aborted {
        unlink(s, sink);
        return Ok(StreamOutcome::Aborted);
    }
    let why = if let Some(c) = &s.corrupt {
        Some(c.clone())
    } else if s.written != end.size {
        Some(format!(
            "{} bytes received, {} declared",
            s.written, end.size
        ))
    } else if s.hasher.finalize().as_bytes()[..] != end.blake3[..] {
        Some(format!(
            "blake3 mismatch: received {}, declared {}",
            s.hasher.finalize().to_hex(),
            hex(&end.blake3)
        ))
    } else {
        None
    };
    if let Some(why) = why {
        unlink(s, sink);
        return Ok(StreamOutcome::Rejected(why));
    }
    let mut e = s.entry.clone();
    e.size = end.size;
    e.blake3 = end.blake3.clone();
    let io = |er| status_io("staging", er);
    match sink {
        Sink::Direct(w) => {
            let f = w.finish(end.size).map_err(io)?;
            set_file_meta(&f, &e).map_err(io)?;
            e.ino = f.metadata().map_err(io)?.ino();
            Ok(StreamOutcome::Verified {
                entry: e,
                patch: None,
            })
        }
        Sink::Patch(p) => {
            let extents = p.extents.clone();
            p.finish().map_err(io)?;
            e.ino = s.base_ino;
            Ok(StreamOutcome::Verified {
                entry: e,
                patch: Some(extents),
            })
        }
        Sink::Switching => Err(Status::internal("stream in an inconsistent state")),
    }
}

/// Makes a generation durable and applies it. Returns the new generation and root.
fn commit(
    inner: &Inner,
    st: &mut State,
    g: Gen,
    epoch: Epoch,
    want_root: &[u8],
) -> Result<(Generation, [u8; 32]), Status> {
    let generation = g.generation;
    if st.epoch.get() != epoch {
        g.discard(&inner.stage);
        return Err(Status::failed_precondition(format!(
            "fenced: epoch moved to {} during the session",
            st.epoch.get()
        )));
    }
    let changes: Vec<Change> = g.changes.values().map(|p| p.change.clone()).collect();
    // The manifest after this generation, checked before anything is made durable; any refusal
    // puts the committed manifest back as it was.
    let undo = match st.manifest.apply_undoable(&changes) {
        Ok(u) => u,
        Err(e) => {
            g.discard(&inner.stage);
            return Err(bad(format!("generation refused: {e}")));
        }
    };
    let refuse = |st: &mut State, g: Gen, undo, err: Status| {
        st.manifest.undo(undo);
        g.discard(&inner.stage);
        Err(err)
    };
    for c in &changes {
        if c.entry.is_none() {
            continue;
        }
        let p = RelPath::new(c.path.to_vec()).expect("validated");
        if let Some(parent) = p.parent()
            && st.manifest.get(&parent).and_then(kind_of) != Some(Kind::Dir)
        {
            return refuse(
                st,
                g,
                undo,
                bad(format!(
                    "refused {p}: its parent is not a directory in this generation (paths through symlinks or files are refused)"
                )),
            );
        }
    }
    let root = st.manifest.root();
    if root[..] != want_root[..] {
        return refuse(
            st,
            g,
            undo,
            Status::failed_precondition(format!(
                "manifest root mismatch: the sender expects {}, this generation would give {}; nothing committed",
                hex(want_root),
                hex(&root)
            )),
        );
    }
    let rec = Record {
        generation: generation.0,
        epoch: epoch.0,
        root: root.to_vec().into(),
        changes,
        applied: false,
    };
    // Staged data first, then the record (the commit point), then the workspace.
    let t0 = Instant::now();
    if let Err(e) = sync_staged(inner.stage.as_fd(), &rec) {
        return refuse(st, g, undo, status_io("syncing staged data", e));
    }
    let t_staged = t0.elapsed();
    if let Err(e) = st.catalog.append(&rec) {
        return refuse(
            st,
            g,
            undo,
            Status::internal(format!("writing the commit record: {e}")),
        );
    }
    st.manifest.generation = generation;
    if let Err(e) = apply_record(&inner.root, inner.stage.as_fd(), &rec, &st.manifest)
        .and_then(|_| sync_applied(&inner.root, &rec, &st.manifest))
        .and_then(|_| clear_stage(inner.stage.as_fd()).map(drop))
    {
        tracing::error!(error = %e, %generation, "applying a committed generation failed; it will be rolled forward");
        st.unapplied = Some(rec);
        return Err(status_io("applying a committed generation", e));
    }
    tracing::debug!(
        %generation,
        changes = rec.changes.len(),
        sync_staged_ms = t_staged.as_millis() as u64,
        record_apply_sync_ms = (t0.elapsed() - t_staged).as_millis() as u64,
        "commit timings"
    );
    st.catalog
        .mark_applied(generation)
        .and_then(|_| st.catalog.maybe_compact(&st.manifest))
        .map_err(|e| Status::internal(format!("catalog: {e}")))?;
    Ok((generation, root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn an_abandoned_generation_leaves_nothing_staged() {
        let d = tempfile::tempdir().unwrap();
        let stage = fsx::open_dir_path(d.path()).unwrap();
        crate::replication::receive::apply::prepare_stage(stage.as_fd()).unwrap();
        let mut g = Gen {
            generation: Generation(2),
            changes: BTreeMap::new(),
            streams: HashMap::new(),
            finishing: Vec::new(),
            batches: Default::default(),
            bases: Default::default(),
            seq: 0,
            new_dirs: HashMap::new(),
            created: Vec::new(),
        };
        // A streamed file whose patch became a full copy.
        let streamed = g.stage_name();
        std::fs::write(d.path().join(format!("{streamed}{FULL}")), b"full copy").unwrap();
        // A staging batch still writing when the generation is given up.
        let packed = d.path().join(g.stage_name());
        g.batches.push_back(tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::write(packed, b"pack").unwrap();
            BatchOut {
                results: Vec::new(),
                packed: HashMap::new(),
                pack: None,
                error: None,
            }
        }));
        g.abandon(&stage).await;
        assert_eq!(
            crate::replication::receive::apply::clear_stage(stage.as_fd()).unwrap(),
            0
        );
    }
}
