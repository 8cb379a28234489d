//! The sending end of replication: `agent-gpu` (and `agent-cpu` during a restore).
//!
//! The sender keeps an index: its view of the receiver's manifest, plus local inode numbers for
//! the quick-check. A generation is planned by [`crate::replication::scan`], its content is read, hashed and
//! streamed (whole for small and new files, rsync deltas against the receiver's copy for the
//! rest), and committed with the manifest root the sender expects; the index is updated only
//! once the receiver acknowledged it durable. So nothing is lost across a crash of either side:
//! anything not acknowledged is still a difference between the tree and the index.
//!
//! Hazards handled here:
//! - A file that changes while it is read (size, mtime or inode differ from the scan afterwards)
//!   is dropped from the generation and waits for the next one.
//! - Files are read with `read`, never mapped, so a concurrent truncation cannot fault us, and
//!   never held whole in memory beyond [`SenderOptions::inline_max`].
//! - A crash between "commit sent" and "acknowledged" is recognised on reconnect by the pending
//!   record, without re-verifying the whole tree; any other disagreement with the receiver is
//!   resolved by fetching its manifest and re-hashing what looks unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use rayon::prelude::*;
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

use crate::disk::crashsafe::{self, kind};
use crate::proto::replica_client::ReplicaClient;
use crate::proto::state::{Change, Pending, Record};
use crate::proto::{
    Begin, Chunk, Commit, CommitResult, Entry, FileEnd, Hello, ManifestChunk, ManifestRequest, Op,
    Ops, SigRequest, SyncRequest, Upsert, chunk, op, sync_request, sync_response, upsert,
};
use crate::replication::delta;
use crate::replication::manifest::{Kind, Manifest, kind_of, wire_entry};
use crate::replication::receive::{MAX_MESSAGE, PROTOCOL, ReplicaState};
use crate::replication::scan::{self, Action, Exclude, RACY_WINDOW_NS, Scope, Stat};
use crate::text::{error_chain, hex};
use crate::types::{Epoch, Generation, RelPath};

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

/// What one generation did (the `--once` output).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub generation: u64,
    pub files_total: u64,
    pub files_changed: u64,
    pub bytes_total: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub root: String,
    /// Files left for the next generation because they changed while being read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub still_changing: Vec<String>,
    /// Files left for the next generation because this one's budget was spent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<String>,
}

/// Figures the agent reports (RPO measurement).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SenderFigures {
    pub epoch: u64,
    pub last_durable_generation: u64,
    pub last_durable_unix_ms: u64,
    /// Unix ms of the oldest change not yet durable on the receiver (None: nothing pending).
    pub oldest_pending_unix_ms: Option<u64>,
    pub pending_bytes: u64,
    pub connected: bool,
    pub last_error: Option<String>,
    pub fenced: bool,
    pub generations: u64,
    pub bytes_sent_total: u64,
    pub last_sync_ms: u64,
    /// Manifest root (hex) both sides agreed on last.
    pub root: String,
    /// Bytes of the workspace as of the last scan (agreed plus still to send).
    pub workspace_bytes: u64,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub struct Sender {
    opts: SenderOptions,
    exclude: Exclude,
    /// The replica state shared with this agent's receiver, held for as long as it sends.
    st: OwnedMutexGuard<ReplicaState>,
    pending: Option<Record>,
    pending_path: PathBuf,
    pub figures: Arc<Mutex<SenderFigures>>,
}

/// Why a session ended, as first seen by the response reader.
type Failure = Arc<Mutex<Option<SyncError>>>;

/// The reason a session failed: the receiver's own error when it gave one (it may arrive a
/// moment after our side of the stream noticed).
fn failure_of(f: &Failure) -> SyncError {
    for _ in 0..20 {
        if let Some(e) = f.lock().expect("failure").clone() {
            return e;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    SyncError::Connection("session closed".into())
}

/// Messages out, counting the bytes put on the connection.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<SyncRequest>,
    sent: Arc<AtomicU64>,
    failure: Failure,
}

impl Out {
    fn wrap(msg: sync_request::Msg) -> SyncRequest {
        SyncRequest { msg: Some(msg) }
    }
    async fn send(&self, msg: sync_request::Msg) -> Result<(), SyncError> {
        let m = Self::wrap(msg);
        self.sent
            .fetch_add(m.encoded_len() as u64, Ordering::Relaxed);
        if self.tx.send(m).await.is_err() {
            let f = self.failure.clone();
            return Err(tokio::task::spawn_blocking(move || failure_of(&f))
                .await
                .unwrap_or_else(|_| SyncError::Connection("session closed".into())));
        }
        Ok(())
    }
    fn send_blocking(&self, msg: sync_request::Msg) -> Result<(), SyncError> {
        let m = Self::wrap(msg);
        self.sent
            .fetch_add(m.encoded_len() as u64, Ordering::Relaxed);
        self.tx
            .blocking_send(m)
            .map_err(|_| failure_of(&self.failure))
    }
}

type SigResult = Result<Option<(Vec<u8>, u64)>, SyncError>;

enum Event {
    Commit(CommitResult),
    Manifest(ManifestChunk),
}

/// A live replication session with a receiver.
pub struct Session {
    out: Out,
    sigs: Arc<Mutex<HashMap<u32, oneshot::Sender<SigResult>>>>,
    events: mpsc::Receiver<Result<Event, SyncError>>,
    reader: tokio::task::JoinHandle<()>,
    pub receiver_generation: Generation,
    pub receiver_root: [u8; 32],
    pub epoch: Epoch,
    next_file: u32,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    async fn event(&mut self) -> Result<Event, SyncError> {
        match self.events.recv().await {
            Some(r) => r,
            None => Err(self
                .out
                .failure
                .lock()
                .expect("failure")
                .clone()
                .unwrap_or_else(|| SyncError::Connection("session closed".into()))),
        }
    }

    /// Resolves when the receiver's side of the session has ended (it died, closed it, or the
    /// connection broke): an idle sender learns at once that it has no standby.
    pub async fn lost(&mut self) -> SyncError {
        if !self.reader.is_finished() {
            let _ = (&mut self.reader).await;
        }
        self.out
            .failure
            .lock()
            .expect("failure")
            .clone()
            .unwrap_or_else(|| SyncError::Connection("session closed".into()))
    }

    pub fn bytes_sent(&self) -> u64 {
        self.out.sent.load(Ordering::Relaxed)
    }

    /// Ends the session cleanly: closes our side and waits (briefly) for the receiver's.
    pub async fn close(mut self) {
        let (closed, _) = mpsc::channel(1);
        self.out.tx = closed; // drops the live sender: the request stream ends
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.reader).await;
    }
}

/// Reads responses: signatures go to the file waiting for them, everything else to `events`.
async fn read_responses(
    mut inbound: tonic::Streaming<crate::proto::SyncResponse>,
    sigs: Arc<Mutex<HashMap<u32, oneshot::Sender<SigResult>>>>,
    events: mpsc::Sender<Result<Event, SyncError>>,
    failure: Failure,
) {
    let mut partial: HashMap<u32, Vec<u8>> = HashMap::new();
    let fail = |e: SyncError, sigs: &Arc<Mutex<HashMap<u32, oneshot::Sender<SigResult>>>>| {
        failure
            .lock()
            .expect("failure")
            .get_or_insert_with(|| e.clone());
        for (_, w) in sigs.lock().expect("sigs").drain() {
            let _ = w.send(Err(e.clone()));
        }
        e
    };
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                let e = fail(
                    SyncError::Connection("receiver closed the session".into()),
                    &sigs,
                );
                let _ = events.send(Err(e)).await;
                return;
            }
            Err(s) => {
                let e = fail(SyncError::from_status(&s), &sigs);
                let _ = events.send(Err(e)).await;
                return;
            }
        };
        match msg.msg {
            Some(sync_response::Msg::Signature(s)) => {
                if s.missing {
                    if let Some(w) = sigs.lock().expect("sigs").remove(&s.file) {
                        let _ = w.send(Ok(None));
                    }
                    continue;
                }
                let buf = partial.entry(s.file).or_default();
                if buf.len() + s.data.len() > 256 << 20 {
                    let e = fail(
                        SyncError::Refused("signature larger than 256 MiB".into()),
                        &sigs,
                    );
                    let _ = events.send(Err(e)).await;
                    return;
                }
                buf.extend_from_slice(&s.data);
                if s.last {
                    let data = partial.remove(&s.file).unwrap_or_default();
                    if let Some(w) = sigs.lock().expect("sigs").remove(&s.file) {
                        let _ = w.send(Ok(Some((data, s.base_size))));
                    }
                }
            }
            Some(sync_response::Msg::Commit(c)) => {
                if events.send(Ok(Event::Commit(c))).await.is_err() {
                    return;
                }
            }
            Some(sync_response::Msg::Manifest(m)) => {
                if events.send(Ok(Event::Manifest(m))).await.is_err() {
                    return;
                }
            }
            Some(sync_response::Msg::Hello(_)) | None => {
                let e = fail(
                    SyncError::Refused("unexpected message from receiver".into()),
                    &sigs,
                );
                let _ = events.send(Err(e)).await;
                return;
            }
        }
    }
}

/// One file's content to send.
#[derive(Clone, Debug)]
struct Job {
    path: RelPath,
    stat: Stat,
    /// The receiver holds a file at this path: a delta base.
    base: Option<Entry>,
}

/// The result of reading one file.
enum Read1 {
    /// The file changed while read (or vanished): next generation.
    Changed,
    Done(Entry),
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
        let pending = match crashsafe::read_state(&pending_path, kind::PENDING) {
            Ok(Some(b)) => Pending::decode(&b[..]).ok().and_then(|p| p.record),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable pending record");
                None
            }
        };
        refresh_inodes(&opts.workspace, &mut st.manifest);
        let exclude = Exclude::new(&opts.workspace, &opts.state_dir);
        {
            let mut f = figures.lock().expect("figures");
            f.epoch = st.epoch.get().0;
            f.last_durable_generation = st.manifest.generation.0;
            f.root = hex(&st.manifest.root());
            f.workspace_bytes = st.manifest.total_bytes();
        }
        Ok(Sender {
            opts,
            exclude,
            st,
            pending,
            pending_path,
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

    /// Opens a session and brings the index in line with the receiver's manifest.
    pub async fn open_session(&mut self, channel: Channel) -> Result<Session, SyncError> {
        if self.st.epoch.get() == Epoch(0) {
            self.raise_epoch(Epoch(1))?;
        }
        let mut client = ReplicaClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel::<SyncRequest>(16);
        let failure: Failure = Arc::new(Mutex::new(None));
        let out = Out {
            tx,
            sent: Arc::new(AtomicU64::new(0)),
            failure: failure.clone(),
        };
        out.send(sync_request::Msg::Hello(Hello {
            protocol: PROTOCOL,
            epoch: self.st.epoch.get().0,
            sender: self.opts.machine.clone(),
        }))
        .await?;
        let resp = client
            .sync(ReceiverStream::new(rx))
            .await
            .map_err(|s| SyncError::from_status(&s))?;
        let mut inbound = resp.into_inner();
        let hello = match inbound.message().await {
            Ok(Some(crate::proto::SyncResponse {
                msg: Some(sync_response::Msg::Hello(h)),
            })) => h,
            Ok(_) => return Err(SyncError::Refused("receiver did not answer hello".into())),
            Err(s) => return Err(SyncError::from_status(&s)),
        };
        if hello.epoch > self.st.epoch.get().0 {
            // The receiver has seen a newer epoch than ours: we are not the primary any more.
            return Err(SyncError::Fenced(format!(
                "receiver is at epoch {}, this sender at {}",
                hello.epoch,
                self.st.epoch.get()
            )));
        }
        let sigs = Arc::new(Mutex::new(HashMap::new()));
        let (etx, erx) = mpsc::channel(16);
        let reader = tokio::spawn(read_responses(inbound, sigs.clone(), etx, failure));
        let mut root = [0u8; 32];
        if hello.root.len() == 32 {
            root.copy_from_slice(&hello.root);
        }
        let mut session = Session {
            out,
            sigs,
            events: erx,
            reader,
            receiver_generation: Generation(hello.generation),
            receiver_root: root,
            epoch: self.st.epoch.get(),
            next_file: 0,
        };
        self.reconcile(&mut session).await?;
        let mut f = self.figures.lock().expect("figures");
        f.connected = true;
        f.last_error = None;
        Ok(session)
    }

    async fn reconcile(&mut self, s: &mut Session) -> Result<(), SyncError> {
        // A commit we sent but never saw acknowledged.
        if let Some(p) = self.pending.take() {
            if s.receiver_generation.0 == p.generation && s.receiver_root[..] == p.root[..] {
                tracing::info!(
                    generation = p.generation,
                    "the receiver committed our last generation before we saw it"
                );
                self.apply_local(&p)?;
            }
            let _ = std::fs::remove_file(&self.pending_path);
        }
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
        // Take local inode numbers where the file looks the same, and ask for a re-hash of it:
        // equal content is then not sent again.
        let ws = self.opts.workspace.clone();
        let adopted = tokio::task::spawn_blocking(move || {
            let paths: Vec<(RelPath, Entry)> =
                remote.iter().map(|(p, e)| (p.clone(), e.clone())).collect();
            let updates: Vec<(RelPath, Entry)> = paths
                .into_par_iter()
                .map(|(p, mut e)| {
                    let local = std::fs::symlink_metadata(p.to_path(&ws))
                        .ok()
                        .and_then(|m| Stat::from_metadata(&m));
                    e.ino = 0;
                    e.verify = false;
                    if let Some(st) = local
                        && kind_of(&e) == Some(st.kind)
                        && st.size == e.size
                        && st.mtime_ns == e.mtime_ns
                        && st.mode == e.mode
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
        })
        .await
        .map_err(|e| SyncError::Local(e.to_string()))?;
        self.st.manifest = adopted;
        let st = &mut *self.st;
        st.catalog
            .reset(&st.manifest)
            .map_err(|e| SyncError::Local(format!("index: {e}")))?;
        Ok(())
    }

    fn apply_local(&mut self, rec: &Record) -> Result<(), SyncError> {
        self.st
            .manifest
            .apply(&rec.changes)
            .map_err(|e| SyncError::Local(format!("index: {e}")))?;
        self.st.manifest.generation = Generation(rec.generation);
        let st = &mut *self.st;
        st.catalog
            .append_applied(rec)
            .and_then(|_| st.catalog.maybe_compact(&st.manifest))
            .map_err(|e| SyncError::Local(format!("index: {e}")))
    }

    /// Scans `scope`, sends what changed as the next generation and waits until it is durable
    /// on the receiver. With nothing to send, returns `None` unless `force` (which commits an
    /// empty generation: a barrier that also checks the roots agree).
    pub async fn sync_generation(
        &mut self,
        s: &mut Session,
        scope: Scope,
        force: bool,
    ) -> Result<Option<Report>, SyncError> {
        let started = Instant::now();
        let sent0 = s.bytes_sent();
        let scan_start_ns = now_ns();
        let index = std::mem::take(&mut self.st.manifest);
        let ws = self.opts.workspace.clone();
        let exclude = self.exclude.clone();
        let (index, plan) = tokio::task::spawn_blocking(move || {
            let (w, roots) = scan::walk(&ws, &scope, &exclude);
            let p = scan::plan(&index, &w, &roots);
            (index, p)
        })
        .await
        .map_err(|e| SyncError::Local(e.to_string()))?;
        self.st.manifest = index;
        let scanned = started.elapsed();
        if plan.is_empty() && !force {
            return Ok(None);
        }
        let pending_bytes: u64 = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Content { stat, .. } => Some(stat.size),
                _ => None,
            })
            .sum();
        {
            let mut f = self.figures.lock().expect("figures");
            f.pending_bytes = pending_bytes;
            if !plan.is_empty() && f.oldest_pending_unix_ms.is_none() {
                f.oldest_pending_unix_ms = Some((scan_start_ns / 1_000_000) as u64);
            }
        }

        let generation = s.receiver_generation.next();
        s.out
            .send(sync_request::Msg::Begin(Begin {
                generation: generation.0,
            }))
            .await?;

        let mut changes: BTreeMap<RelPath, Change> = BTreeMap::new();
        let mut still_changing: Vec<RelPath> = Vec::new();
        let mut contents: Vec<Job> = Vec::new();
        let mut hash_first: Vec<(Job, Option<(RelPath, Entry)>)> = Vec::new();
        let mut meta_ops: Vec<Op> = Vec::new();
        // Changes of local fields only (inode, re-verification): nothing on the replica moves.
        let mut local_only = 0usize;

        for a in plan.actions {
            match a {
                Action::Delete { path, old } => {
                    meta_ops.push(Op {
                        path: path.as_bytes().to_vec().into(),
                        change: Some(op::Change::Delete(old.to_proto())),
                    });
                    changes.insert(
                        path.clone(),
                        Change {
                            path: path.into_bytes().into(),
                            entry: None,
                            old_kind: old.to_proto(),
                            ..Default::default()
                        },
                    );
                }
                Action::Node { path, stat } => {
                    let e = stat.entry();
                    meta_ops.push(upsert_op(&path, &e, upsert::Content::Keep(true)));
                    changes.insert(path.clone(), change(&path, e));
                }
                Action::Meta { path, stat, old } => {
                    let e = Entry {
                        mode: stat.mode,
                        mtime_ns: stat.mtime_ns,
                        ino: stat.ino,
                        ..old
                    };
                    meta_ops.push(upsert_op(&path, &e, upsert::Content::Keep(true)));
                    changes.insert(path.clone(), change(&path, e));
                }
                Action::Content {
                    path,
                    stat,
                    base,
                    renamed_from,
                    verify_only,
                } => {
                    let job = Job { path, stat, base };
                    if verify_only || renamed_from.is_some() {
                        hash_first.push((job, renamed_from));
                    } else {
                        contents.push(job);
                    }
                }
            }
        }
        for batch in batches(meta_ops) {
            s.out
                .send(sync_request::Msg::Ops(Ops { ops: batch }))
                .await?;
        }

        // Files that may not need their bytes sent: re-verified ones and renames.
        if !hash_first.is_empty() {
            let ws = self.opts.workspace.clone();
            let hashed = tokio::task::spawn_blocking(move || {
                hash_first
                    .into_par_iter()
                    .map(|(job, from)| {
                        let r = hash_file(&ws, &job.path, &job.stat);
                        (job, from, r)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?;
            let mut link_ops = Vec::new();
            for (job, from, r) in hashed {
                match r {
                    Read1::Changed => still_changing.push(job.path),
                    Read1::Done(entry) => {
                        if let Some((src, src_entry)) = &from
                            && src_entry.blake3 == entry.blake3
                        {
                            link_ops.push(upsert_op(
                                &job.path,
                                &entry,
                                upsert::Content::CopyFrom(src.as_bytes().to_vec().into()),
                            ));
                            changes.insert(job.path.clone(), change(&job.path, entry));
                        } else if from.is_none()
                            && job.base.as_ref().is_some_and(|b| b.blake3 == entry.blake3)
                        {
                            // Verified unchanged: only the local entry moves (inode, flag).
                            let b = job.base.clone().expect("checked");
                            if b.mode != entry.mode || b.mtime_ns != entry.mtime_ns {
                                link_ops.push(upsert_op(
                                    &job.path,
                                    &entry,
                                    upsert::Content::Keep(true),
                                ));
                            } else {
                                local_only += 1;
                            }
                            changes.insert(job.path.clone(), change(&job.path, entry));
                        } else {
                            contents.push(job);
                        }
                    }
                }
            }
            for batch in batches(link_ops) {
                s.out
                    .send(sync_request::Msg::Ops(Ops { ops: batch }))
                    .await?;
            }
        }

        let mut deferred: Vec<RelPath> = Vec::new();
        let mut deferred_bytes = 0u64;
        if let Some(budget) = self.opts.generation_budget {
            order_for_restore(&mut contents);
            let mut used = 0u64;
            let mut keep = Vec::with_capacity(contents.len());
            for j in contents {
                if used > 0 && used + j.stat.size > budget {
                    deferred_bytes += j.stat.size;
                    deferred.push(j.path);
                } else {
                    used += j.stat.size;
                    keep.push(j);
                }
            }
            contents = keep;
        }
        let (small, big): (Vec<Job>, Vec<Job>) = contents
            .into_iter()
            .partition(|j| j.stat.size <= self.opts.inline_max);
        let (n_small, n_big) = (small.len(), big.len());
        let t_content = Instant::now();
        let sent = self.send_contents(s, small, big).await?;
        let content = t_content.elapsed();
        let t_commit = Instant::now();
        for (p, r) in sent {
            match r {
                Read1::Changed => still_changing.push(p),
                Read1::Done(e) => {
                    changes.insert(p.clone(), change(&p, e));
                }
            }
        }

        // Commit; files the receiver could not verify are sent again whole.
        let mut rounds = 0;
        let result = loop {
            let list: Vec<Change> = changes.values().cloned().collect();
            let undo = self
                .st
                .manifest
                .apply_undoable(&list)
                .map_err(|e| SyncError::Local(format!("index: {e}")))?;
            let root = self.st.manifest.root();
            let rec = Record {
                generation: generation.0,
                epoch: s.epoch.0,
                root: root.to_vec().into(),
                changes: list,
                applied: false,
            };
            let pending = Pending {
                record: Some(rec.clone()),
            }
            .encode_to_vec();
            if let Err(e) = crashsafe::write_state(&self.pending_path, kind::PENDING, &pending) {
                self.st.manifest.undo(undo);
                return Err(local("writing the pending record")(e));
            }
            let outcome = async {
                s.out
                    .send(sync_request::Msg::Commit(Commit {
                        generation: generation.0,
                        root: root.to_vec().into(),
                    }))
                    .await?;
                loop {
                    match s.event().await? {
                        Event::Commit(c) => return Ok(c),
                        Event::Manifest(_) => continue,
                    }
                }
            }
            .await;
            let c = match outcome {
                Ok(c) => c,
                Err(e) => {
                    self.st.manifest.undo(undo);
                    // Keep the pending record: the receiver may have committed it.
                    self.pending = Some(rec);
                    return Err(e);
                }
            };
            if c.committed {
                if c.root[..] != root[..] || c.generation != generation.0 {
                    self.st.manifest.undo(undo);
                    return Err(SyncError::Refused(format!(
                        "receiver committed generation {} with root {}, expected {generation} with {}",
                        c.generation,
                        hex(&c.root),
                        hex(&root)
                    )));
                }
                self.st.manifest.undo(undo);
                let t = Instant::now();
                self.apply_local(&rec)?;
                let _ = std::fs::remove_file(&self.pending_path);
                tracing::debug!(ms = t.elapsed().as_millis() as u64, "index updated");
                break root;
            }
            self.st.manifest.undo(undo);
            let _ = std::fs::remove_file(&self.pending_path);
            rounds += 1;
            if rounds > 2 {
                return Err(SyncError::Refused(format!(
                    "{} file(s) still fail verification on the receiver after {rounds} attempts",
                    c.retry.len()
                )));
            }
            let mut again = Vec::new();
            for p in c.retry {
                let p = RelPath::new(p.to_vec())
                    .map_err(|e| SyncError::Refused(format!("retry path: {e}")))?;
                tracing::warn!(path = %p, "receiver could not verify a file; sending it whole");
                let Some(ch) = changes.remove(&p) else {
                    return Err(SyncError::Refused(format!(
                        "receiver asked to retry {p}, which we did not send"
                    )));
                };
                let st = ch
                    .entry
                    .as_ref()
                    .map(|e| Stat {
                        kind: Kind::File,
                        mode: e.mode,
                        mtime_ns: e.mtime_ns,
                        size: e.size,
                        ino: e.ino,
                        target: vec![],
                    })
                    .ok_or_else(|| SyncError::Refused(format!("retry of deleted {p}")))?;
                again.push(Job {
                    path: p,
                    stat: st,
                    base: None,
                });
            }
            let sent = self.send_contents(s, vec![], again).await?;
            for (p, r) in sent {
                match r {
                    Read1::Changed => still_changing.push(p),
                    Read1::Done(e) => {
                        changes.insert(p.clone(), change(&p, e));
                    }
                }
            }
        };
        tracing::debug!(
            %generation,
            scan_ms = scanned.as_millis() as u64,
            small = n_small,
            big = n_big,
            content_ms = content.as_millis() as u64,
            commit_ms = t_commit.elapsed().as_millis() as u64,
            "generation timings"
        );
        s.receiver_generation = generation;
        s.receiver_root = result;
        let replica_changes = changes.len() - local_only;
        let bytes_sent = s.bytes_sent() - sent0;
        let report = Report {
            generation: generation.0,
            files_total: self.st.manifest.file_count() as u64,
            files_changed: replica_changes as u64,
            bytes_total: self.st.manifest.total_bytes(),
            bytes_sent,
            duration_ms: started.elapsed().as_millis() as u64,
            root: hex(&result),
            still_changing: still_changing.iter().map(|p| p.display()).collect(),
            deferred: deferred.iter().map(|p| p.display()).collect(),
        };
        {
            let mut f = self.figures.lock().expect("figures");
            f.root = report.root.clone();
            f.workspace_bytes = report.bytes_total + deferred_bytes;
            f.last_durable_generation = generation.0;
            f.last_durable_unix_ms = unix_ms(SystemTime::now());
            f.generations += 1;
            f.bytes_sent_total += bytes_sent;
            f.last_sync_ms = report.duration_ms;
            if still_changing.is_empty() && deferred.is_empty() {
                f.pending_bytes = 0;
            } else {
                f.pending_bytes = deferred_bytes;
            }
        }
        Ok(Some(report))
    }

    /// Sends small files inline (in parallel batches) and big ones streamed (deltas where the
    /// receiver has a base).
    async fn send_contents(
        &mut self,
        s: &mut Session,
        small: Vec<Job>,
        big: Vec<Job>,
    ) -> Result<Vec<(RelPath, Read1)>, SyncError> {
        let mut results = Vec::new();
        let level = self.opts.compress_level;
        if !small.is_empty() {
            let t = Instant::now();
            let n = small.len();
            let ws = self.opts.workspace.clone();
            let out = s.out.clone();
            let r = tokio::task::spawn_blocking(move || send_small(&ws, small, level, &out))
                .await
                .map_err(|e| SyncError::Local(e.to_string()))??;
            results.extend(r);
            tracing::debug!(
                files = n,
                ms = t.elapsed().as_millis() as u64,
                "small files sent"
            );
        }
        if big.is_empty() {
            return Ok(results);
        }
        // Ask for signatures ahead of need (bounded, so their memory is bounded too).
        const AHEAD: usize = 8;
        let mut waiting: HashMap<usize, (u32, oneshot::Receiver<SigResult>)> = HashMap::new();
        let mut asked = 0;
        for i in 0..big.len() {
            while asked < big.len() && asked < i + AHEAD {
                let j = &big[asked];
                if j.base.is_some() {
                    s.next_file += 1;
                    let id = s.next_file;
                    let (tx, rx) = oneshot::channel();
                    s.sigs.lock().expect("sigs").insert(id, tx);
                    s.out
                        .send(sync_request::Msg::Sig(SigRequest {
                            file: id,
                            path: j.path.as_bytes().to_vec().into(),
                            block_size: delta::block_size_for(
                                j.base.as_ref().map(|b| b.size).unwrap_or(0),
                            ),
                        }))
                        .await?;
                    waiting.insert(asked, (id, rx));
                }
                asked += 1;
            }
            let job = big[i].clone();
            let (id, sig) = match waiting.remove(&i) {
                Some((id, rx)) => {
                    let r = match rx.await {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(s.event().await.err().unwrap_or_else(|| {
                                SyncError::Connection("session closed".into())
                            }));
                        }
                    };
                    let block =
                        delta::block_size_for(job.base.as_ref().map(|b| b.size).unwrap_or(0));
                    let sig = match r {
                        None => None,
                        Some((bytes, base_size)) => Some(
                            delta::check_signature(bytes, block, base_size)
                                .map_err(|e| SyncError::Refused(e.to_string()))?,
                        ),
                    };
                    (id, sig)
                }
                None => {
                    s.next_file += 1;
                    (s.next_file, None)
                }
            };
            let ws = self.opts.workspace.clone();
            let out = s.out.clone();
            let path = job.path.clone();
            let r =
                tokio::task::spawn_blocking(move || stream_file(&ws, &job, id, sig, level, &out))
                    .await
                    .map_err(|e| SyncError::Local(e.to_string()))??;
            results.push((path, r));
        }
        Ok(results)
    }
}

fn change(p: &RelPath, e: Entry) -> Change {
    Change {
        path: p.as_bytes().to_vec().into(),
        entry: Some(e),
        ..Default::default()
    }
}

fn upsert_op(p: &RelPath, e: &Entry, content: upsert::Content) -> Op {
    Op {
        path: p.as_bytes().to_vec().into(),
        change: Some(op::Change::Upsert(Upsert {
            entry: Some(wire_entry(e)),
            content: Some(content),
            zstd: false,
            delta: false,
        })),
    }
}

/// Splits ops into messages of at most ~1 MiB.
fn batches(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for o in ops {
        size += o.encoded_len();
        cur.push(o);
        if size >= 1 << 20 || cur.len() >= 4096 {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn open_checked(ws: &Path, p: &RelPath, st: &Stat) -> io::Result<Option<File>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p.to_path(ws))
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !unchanged(&f, st)? {
        return Ok(None);
    }
    Ok(Some(f))
}

fn unchanged(f: &File, st: &Stat) -> io::Result<bool> {
    let m = f.metadata()?;
    Ok(m.is_file()
        && m.ino() == st.ino
        && m.size() == st.size
        && m.mtime() * 1_000_000_000 + m.mtime_nsec() == st.mtime_ns)
}

/// The index entry of a file just read: racily clean when modified close to the read.
fn entry_for(st: &Stat, hash: blake3::Hash, read_start_ns: i64) -> Entry {
    let mut e = st.entry();
    e.blake3 = hash.as_bytes().to_vec().into();
    e.verify = st.mtime_ns >= read_start_ns - RACY_WINDOW_NS;
    e
}

fn hash_file(ws: &Path, p: &RelPath, st: &Stat) -> Read1 {
    let t = now_ns();
    let Ok(Some(mut f)) = open_checked(ws, p, st) else {
        return Read1::Changed;
    };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(_) => return Read1::Changed,
        }
    }
    if total != st.size || !unchanged(&f, st).unwrap_or(false) {
        return Read1::Changed;
    }
    Read1::Done(entry_for(st, h.finalize(), t))
}

fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    if level == 0 || data.len() < 512 {
        return None;
    }
    let c = crate::replication::compress::compress(data, level).ok()?;
    (c.len() < data.len() - data.len() / 32).then_some(c)
}

/// A small file read whole: its entry, its bytes, and whether they are zstd-compressed.
type Inline = (Entry, Vec<u8>, bool);

/// Reads, hashes and compresses small files in parallel; sends them in batches of ~1 MiB.
fn send_small(
    ws: &Path,
    jobs: Vec<Job>,
    level: i32,
    out: &Out,
) -> Result<Vec<(RelPath, Read1)>, SyncError> {
    let mut results = Vec::with_capacity(jobs.len());
    for group in jobs.chunks(256) {
        let read: Vec<(RelPath, io::Result<Option<Inline>>)> = group
            .par_iter()
            .map(|j| {
                let r = (|| {
                    let t = now_ns();
                    let Some(mut f) = open_checked(ws, &j.path, &j.stat)? else {
                        return Ok(None);
                    };
                    let mut data = Vec::with_capacity(j.stat.size as usize + 1);
                    (&mut f).take(j.stat.size + 1).read_to_end(&mut data)?;
                    if data.len() as u64 != j.stat.size || !unchanged(&f, &j.stat)? {
                        return Ok(None);
                    }
                    let e = entry_for(&j.stat, blake3::hash(&data), t);
                    Ok(Some(match compress(&data, level) {
                        Some(c) => (e, c, true),
                        None => (e, data, false),
                    }))
                })();
                (j.path.clone(), r)
            })
            .collect();
        let mut ops = Vec::new();
        let mut size = 0;
        for (p, r) in read {
            match r {
                Ok(Some((e, data, z))) => {
                    size += data.len() + 64;
                    ops.push(Op {
                        path: p.as_bytes().to_vec().into(),
                        change: Some(op::Change::Upsert(Upsert {
                            entry: Some(wire_entry(&e)),
                            content: Some(upsert::Content::Inline(data.into())),
                            zstd: z,
                            delta: false,
                        })),
                    });
                    results.push((p, Read1::Done(e)));
                    if size >= 1 << 20 {
                        out.send_blocking(sync_request::Msg::Ops(Ops {
                            ops: std::mem::take(&mut ops),
                        }))?;
                        size = 0;
                    }
                }
                Ok(None) => results.push((p, Read1::Changed)),
                Err(e) => {
                    tracing::warn!(path = %p, error = %e, "cannot read; will retry next generation");
                    results.push((p, Read1::Changed));
                }
            }
        }
        if !ops.is_empty() {
            out.send_blocking(sync_request::Msg::Ops(Ops { ops }))?;
        }
    }
    Ok(results)
}

/// Per-file hints carried from window to window.
struct Hints {
    compressible: bool,
    misses: u32,
}

/// Encodes one window: a delta when it pays, literal (compressed when that pays) otherwise.
/// Returns the chunk data, whether a delta paid off, and whether compression paid off. Takes
/// the window by value so that literal data goes out without another copy.
fn encode_window(
    window: Vec<u8>,
    sig: Option<&fast_rsync::IndexedSignature<'_>>,
    level: i32,
    hints: &Hints,
) -> (chunk::Data, bool, bool) {
    let data = &window[..];
    if let Some(idx) = sig {
        let probe = 64 << 10;
        let skip = hints.misses >= 2 && data.len() > probe && {
            let mut d = Vec::new();
            fast_rsync::diff(idx, &data[..probe], &mut d).is_err() || d.len() > probe * 9 / 10
        };
        if !skip {
            let mut d = Vec::with_capacity(data.len() / 8);
            if fast_rsync::diff(idx, data, &mut d).is_ok() && d.len() < data.len() * 9 / 10 {
                return match compress(&d, if hints.compressible { level } else { 0 }) {
                    Some(c) => (chunk::Data::DeltaZstd(c.into()), true, true),
                    None => (chunk::Data::Delta(d.into()), true, false),
                };
            }
        }
    }
    match compress(data, if hints.compressible { level } else { 0 }) {
        Some(c) => (chunk::Data::LiteralZstd(c.into()), false, true),
        None => (chunk::Data::Literal(Bytes::from(window)), false, false),
    }
}

/// Streams one file: windows read in order, encoded in parallel, sent in order.
fn stream_file(
    ws: &Path,
    job: &Job,
    id: u32,
    sig: Option<fast_rsync::Signature>,
    level: i32,
    out: &Out,
) -> Result<Read1, SyncError> {
    let t = now_ns();
    let mut f = match open_checked(ws, &job.path, &job.stat) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(Read1::Changed),
        Err(e) => {
            tracing::warn!(path = %job.path, error = %e, "cannot read; will retry next generation");
            return Ok(Read1::Changed);
        }
    };
    let entry = job.stat.entry();
    out.send_blocking(sync_request::Msg::Ops(Ops {
        ops: vec![Op {
            path: job.path.as_bytes().to_vec().into(),
            change: Some(op::Change::Upsert(Upsert {
                entry: Some(wire_entry(&entry)),
                content: Some(upsert::Content::Stream(id)),
                zstd: false,
                delta: sig.is_some(),
            })),
        }],
    }))?;
    let idx = sig.as_ref().map(|s| s.index());
    let mut hasher = blake3::Hasher::new();
    let mut hints = Hints {
        compressible: level > 0,
        misses: 0,
    };
    let group = 2 * rayon::current_num_threads().max(1);
    let mut total = 0u64;
    let abort = |out: &Out| -> Result<Read1, SyncError> {
        out.send_blocking(sync_request::Msg::End(FileEnd {
            file: id,
            aborted: true,
            ..Default::default()
        }))?;
        Ok(Read1::Changed)
    };
    loop {
        let mut windows: Vec<Vec<u8>> = Vec::with_capacity(group);
        let mut eof = false;
        for _ in 0..group {
            let mut w = vec![0u8; delta::WINDOW];
            let mut n = 0;
            while n < w.len() {
                match f.read(&mut w[n..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return abort(out),
                }
            }
            w.truncate(n);
            if n > 0 {
                hasher.update(&w);
                total += n as u64;
                windows.push(w);
            }
            if eof {
                break;
            }
        }
        if total > job.stat.size {
            return abort(out); // grew while read
        }
        let lens: Vec<usize> = windows.iter().map(Vec::len).collect();
        let encoded: Vec<(chunk::Data, bool, bool)> = windows
            .into_par_iter()
            .map(|w| encode_window(w, idx.as_ref(), level, &hints))
            .collect();
        for (len, (data, hit, compressed)) in lens.into_iter().zip(encoded) {
            if idx.is_some() {
                hints.misses = if hit { 0 } else { hints.misses + 1 };
            }
            if !compressed && !hit {
                hints.compressible = false;
            }
            out.send_blocking(sync_request::Msg::Chunk(Chunk {
                file: id,
                len: len as u32,
                data: Some(data),
            }))?;
        }
        if eof {
            break;
        }
    }
    if total != job.stat.size || !unchanged(&f, &job.stat).unwrap_or(false) {
        return abort(out);
    }
    let hash = hasher.finalize();
    out.send_blocking(sync_request::Msg::End(FileEnd {
        file: id,
        aborted: false,
        blake3: hash.as_bytes().to_vec().into(),
        size: total,
    }))?;
    Ok(Read1::Done(entry_for(&job.stat, hash, t)))
}

/// Gives entries without a local inode (written by a receiver from a pack, or adopted) the inode
/// of the file that still matches them, so the quick-check recognises them.
fn refresh_inodes(ws: &Path, m: &mut Manifest) {
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
            let st = std::fs::symlink_metadata(p.to_path(ws))
                .ok()
                .and_then(|md| Stat::from_metadata(&md))?;
            (kind_of(&e) == Some(st.kind)
                && st.size == e.size
                && st.mtime_ns == e.mtime_ns
                && st.mode == e.mode)
                .then_some((p, st.ino))
        })
        .collect();
    for (p, ino) in found {
        if let Some(e) = m.get_mut(&p) {
            e.ino = ino;
        }
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

/// Connection helper: retries are the caller's business.
pub async fn connect(
    url: &str,
    tls: &crate::trust::tls::TlsMaterial,
    peer: crate::trust::identity::Identity,
) -> Result<Channel, SyncError> {
    let cfg = tls
        .client_config(crate::trust::tls::Expect::Exactly(peer))
        .map_err(|e| SyncError::Local(e.to_string()))?;
    crate::trust::tls::connect(url, cfg)
        .await
        .map_err(|e| SyncError::Connection(format!("{url}: {}", error_chain(&*e))))
}

/// Restore order: small files first (they are most of what an application needs to start:
/// code, configuration), then the rest; within each, the most recently changed first (the
/// latest checkpoint before older ones).
fn order_for_restore(jobs: &mut [Job]) {
    const SMALL: u64 = 1 << 20;
    jobs.sort_by(|a, b| {
        (a.stat.size > SMALL)
            .cmp(&(b.stat.size > SMALL))
            .then(b.stat.mtime_ns.cmp(&a.stat.mtime_ns))
            .then(a.path.cmp(&b.path))
    });
}
