//! The standby's history over the network (ARCHITECTURE.md, "History"): the `History` gRPC
//! service a CPU agent serves beside replication (which snapshots it keeps, and the files of
//! one), and the client side an agent-gpu uses for `versions` and `restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::history::{
    HistoryError, Piece, RestoreSummary, Selector, SnapshotInfo, Store, Unpacker,
};
use crate::proto::history_client::HistoryClient;
use crate::proto::history_server::{History, HistoryServer};
use crate::proto::{
    FetchEnd, FetchEntry, FetchItem, FetchRequest, SnapshotSelector, SnapshotSummary,
    VersionsReply, VersionsRequest, fetch_item,
};
use crate::replication::receive::{MAX_MESSAGE, Receiver};
use crate::trust::tls;
use crate::types::RelPath;

/// Content goes out in pieces of at most this many bytes.
const PIECE: usize = 1 << 20;

/// The service: reads of the store, for whoever may read the replica.
pub struct HistoryService {
    store: Arc<Store>,
    receiver: Receiver,
}

/// The `History` service over `store`, with the replica's readers.
pub fn service(store: Arc<Store>, receiver: Receiver) -> HistoryServer<HistoryService> {
    HistoryServer::new(HistoryService { store, receiver })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

impl HistoryService {
    /// The GPU the coordinator named, the coordinator and admins, with certificates not
    /// revoked.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let peer = tls::peer_of(req)?;
        if self.receiver.is_revoked(&peer.serial) {
            return Err(Status::permission_denied(format!(
                "the certificate of {} (serial {}) is revoked",
                peer.identity, peer.serial
            )));
        }
        if !may_read_history(&self.receiver, &peer.identity) {
            return Err(Status::permission_denied(format!(
                "{} may not read this standby's history",
                peer.identity
            )));
        }
        Ok(())
    }
}

/// The sender the coordinator named (any machine of the peer seat in a static pair), the
/// coordinator and admins: narrower than the replica's status, since history is the data.
fn may_read_history(receiver: &Receiver, id: &crate::trust::identity::Identity) -> bool {
    use crate::trust::identity::Identity;
    matches!(id, Identity::Admin { .. } | Identity::Coordinator)
        || receiver.expected().sender.accepts(id)
}

#[tonic::async_trait]
impl History for HistoryService {
    async fn versions(
        &self,
        req: Request<VersionsRequest>,
    ) -> Result<Response<VersionsReply>, Status> {
        self.admit(&req)?;
        let prefix = prefix_of(&req.get_ref().path)?;
        let store = self.store.clone();
        let snapshots = tokio::task::spawn_blocking(move || list(&store, prefix.as_ref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(VersionsReply { snapshots }))
    }

    type FetchStream = ReceiverStream<Result<FetchItem, Status>>;

    async fn fetch(
        &self,
        req: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        self.admit(&req)?;
        let r = req.into_inner();
        let prefix = prefix_of(&r.path)?;
        let sel = r.snapshot.unwrap_or_default();
        let selector = selector(sel.id, sel.at_unix_ms);
        let store = self.store.clone();
        let info = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.find(&selector))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(status)?
        };
        let (tx, rx) = mpsc::channel(8);
        tokio::task::spawn_blocking(move || {
            if let Err(st) = stream(&store, &info, prefix.as_ref(), &tx) {
                let _ = tx.blocking_send(Err(st));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Snapshots (as [`summary_json`] gives them) as a table for people.
pub fn table(list: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<16}  {:<24}  {:>10}  {:>8}  {:>14}  {:>14}\n",
        "ID", "TIME", "GENERATION", "FILES", "BYTES", "NEW BYTES"
    );
    for s in list {
        out += &format!(
            "{:<16}  {:<24}  {:>10}  {:>8}  {:>14}  {:>14}\n",
            s["id"].as_str().unwrap_or(""),
            s["time"].as_str().unwrap_or(""),
            s["generation"],
            s["files"],
            s["bytes"],
            s["new_bytes"]
        );
    }
    out
}

/// The snapshots, oldest first; with a prefix, those holding it, counted below it.
fn list(store: &Store, prefix: Option<&RelPath>) -> Result<Vec<SnapshotSummary>, Status> {
    let mut out = Vec::new();
    for info in store.list() {
        let mut s = summary(&info);
        if let Some(p) = prefix {
            let entries = store.entries(info.id, Some(p)).map_err(status)?;
            if entries.is_empty() {
                continue;
            }
            s.files = entries.iter().filter(|(_, e)| is_file(e)).count() as u64;
            s.bytes = entries.iter().map(|(_, e)| e.size).sum();
        }
        out.push(s);
    }
    Ok(out)
}

/// Sends the snapshot, then every entry below the prefix with each file's content, then the
/// end marker with the counts. The store is not locked while a piece waits to be sent
/// (`Store::stream_snapshot`).
fn stream(
    store: &Store,
    info: &SnapshotInfo,
    prefix: Option<&RelPath>,
    tx: &mpsc::Sender<Result<FetchItem, Status>>,
) -> Result<(), Status> {
    let send = |item: fetch_item::Item| {
        tx.blocking_send(Ok(FetchItem { item: Some(item) }))
            .map_err(|_| std::io::Error::other("the client went away"))
    };
    send(fetch_item::Item::Snapshot(summary(info)))
        .map_err(|e| Status::cancelled(e.to_string()))?;
    let sent = store
        .stream_snapshot(info.id, prefix, |piece| match piece {
            Piece::Entry(path, entry) => send(fetch_item::Item::Entry(FetchEntry {
                path: path.to_string(),
                entry: Some(entry.clone()),
            })),
            Piece::Data(buf) => buf
                .chunks(PIECE)
                .try_for_each(|p| send(fetch_item::Item::Data(p.to_vec().into()))),
        })
        .map_err(status)?;
    if sent.entries == 0 {
        return Err(Status::not_found(format!(
            "snapshot {} holds nothing at {}",
            info.id,
            prefix.map(|p| p.to_string()).unwrap_or_default()
        )));
    }
    send(fetch_item::Item::End(FetchEnd {
        entries: sent.entries,
        bytes: sent.bytes,
    }))
    .map_err(|e| Status::cancelled(e.to_string()))
}

fn summary(i: &SnapshotInfo) -> SnapshotSummary {
    SnapshotSummary {
        id: i.id.to_string(),
        time_unix_ms: i.time_ms as i64,
        generation: i.generation.0,
        root: i.root.to_vec(),
        files: i.files,
        bytes: i.bytes,
        new_bytes: i.new_bytes,
    }
}

fn is_file(e: &crate::proto::Entry) -> bool {
    crate::replication::manifest::kind_of(e) == Some(crate::replication::manifest::Kind::File)
}

fn prefix_of(path: &str) -> Result<Option<RelPath>, Status> {
    let p = path.trim_matches('/');
    if p.is_empty() || p == "." {
        return Ok(None);
    }
    RelPath::new(p)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("path {p:?}: {e}")))
}

/// A selector from its parts as they travel: an id, else a time, else the newest.
pub fn selector(id: String, at_unix_ms: i64) -> Selector {
    if !id.is_empty() {
        Selector::Id(id)
    } else if at_unix_ms > 0 {
        let ms = at_unix_ms.min(crate::cli::LAST_MS) as u64;
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        Selector::AtOrBefore(at)
    } else {
        Selector::Latest
    }
}

/// A snapshot as `versions --json` prints it.
pub fn summary_json(s: &SnapshotSummary) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "time": crate::cli::format_time(s.time_unix_ms),
        "time_unix_ms": s.time_unix_ms,
        "generation": s.generation,
        "files": s.files,
        "bytes": s.bytes,
        "new_bytes": s.new_bytes,
        "root": crate::text::hex(&s.root),
    })
}

/// The selector for the wire.
pub fn selector_to_wire(s: &Selector) -> SnapshotSelector {
    match s {
        Selector::Id(id) => SnapshotSelector {
            id: id.clone(),
            at_unix_ms: 0,
        },
        Selector::AtOrBefore(t) => SnapshotSelector {
            id: String::new(),
            at_unix_ms: t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_millis().max(1) as i64),
        },
        Selector::Latest => SnapshotSelector::default(),
    }
}

fn status(e: HistoryError) -> Status {
    match e {
        HistoryError::NoSnapshot(_) | HistoryError::NoPath { .. } => {
            Status::not_found(e.to_string())
        }
        HistoryError::Ambiguous { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The standby's snapshots, asked over `channel`.
pub async fn versions(channel: Channel, path: &str) -> Result<Vec<SnapshotSummary>, Status> {
    let mut c = HistoryClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let req = VersionsRequest {
        path: path.to_string(),
    };
    Ok(c.versions(req).await?.into_inner().snapshots)
}

/// What a restore fetched and wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Fetched {
    pub snapshot: String,
    pub generation: u64,
    pub time_unix_ms: i64,
    pub to: PathBuf,
    #[serde(flatten)]
    pub restored: RestoreSummary,
}

/// Fetches the files below `path` of the snapshot `selector` picks and writes them below `to`,
/// each verified before it replaces anything.
pub async fn fetch_into(
    channel: Channel,
    selector: &Selector,
    path: &str,
    to: &Path,
) -> anyhow::Result<Fetched> {
    let mut c = HistoryClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let req = FetchRequest {
        snapshot: Some(selector_to_wire(selector)),
        path: path.to_string(),
    };
    let items = c.fetch(req).await.map_err(said)?.into_inner();
    unpack_stream(items, to).await
}

/// A status from the standby (or the coordinator relaying it) as an error that says its message.
fn said(st: Status) -> anyhow::Error {
    anyhow::anyhow!("{}", st.message())
}

/// Writes a `Fetch` answer (from the standby, or relayed by the coordinator) below `to`.
pub async fn unpack_stream(
    mut items: tonic::Streaming<FetchItem>,
    to: &Path,
) -> anyhow::Result<Fetched> {
    let first = items.next().await.transpose().map_err(said)?;
    let Some(FetchItem {
        item: Some(fetch_item::Item::Snapshot(snap)),
    }) = first
    else {
        anyhow::bail!("the standby's answer did not begin with the snapshot it chose");
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<fetch_item::Item>(16);
    let to_dir = to.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_items(&to_dir, rx));
    while let Some(item) = items.next().await {
        let Some(item) = item.map_err(said)?.item else {
            continue;
        };
        if tx.send(item).is_err() {
            break;
        }
    }
    drop(tx);
    let restored = writer.await??;
    Ok(Fetched {
        snapshot: snap.id,
        generation: snap.generation,
        time_unix_ms: snap.time_unix_ms,
        to: to.to_path_buf(),
        restored,
    })
}

/// Writes the items as they come; stops at the first error. The answer must close with the end
/// marker, its counts matching what came: an answer cut short is an error, never a partial
/// restore reported as whole (the files written so far stay, each one verified).
fn write_items(
    to: &Path,
    rx: std::sync::mpsc::Receiver<fetch_item::Item>,
) -> anyhow::Result<RestoreSummary> {
    let mut u = Unpacker::new(to)?;
    let mut got = FetchEnd::default();
    for item in rx {
        match item {
            fetch_item::Item::Entry(e) => {
                let path = RelPath::new(e.path.as_bytes())
                    .map_err(|er| anyhow::anyhow!("the standby sent path {:?}: {er}", e.path))?;
                u.entry(path, e.entry.unwrap_or_default())?;
                got.entries += 1;
            }
            fetch_item::Item::Data(d) => {
                u.data(&d)?;
                got.bytes += d.len() as u64;
            }
            fetch_item::Item::Snapshot(_) => anyhow::bail!("a second snapshot in one answer"),
            fetch_item::Item::End(end) => {
                if end != got {
                    anyhow::bail!(
                        "the standby's answer ended saying {} entries and {} bytes, but {} and {} came",
                        end.entries,
                        end.bytes,
                        got.entries,
                        got.bytes
                    );
                }
                return Ok(u.finish()?);
            }
        }
    }
    anyhow::bail!(
        "the standby's answer was cut short after {} entries and {} bytes (no end marker); the files written so far are verified, the rest are missing",
        got.entries,
        got.bytes
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Entry, EntryKind};

    fn file(path: &str, data: &[u8]) -> [fetch_item::Item; 2] {
        let entry = Entry {
            kind: EntryKind::File as i32,
            mode: 0o644,
            size: data.len() as u64,
            blake3: blake3::hash(data).as_bytes().to_vec(),
            ..Default::default()
        };
        [
            fetch_item::Item::Entry(FetchEntry {
                path: path.into(),
                entry: Some(entry),
            }),
            fetch_item::Item::Data(data.to_vec().into()),
        ]
    }

    fn write(items: Vec<fetch_item::Item>) -> (tempfile::TempDir, anyhow::Result<RestoreSummary>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(items.len() + 1);
        for i in items {
            tx.send(i).unwrap();
        }
        drop(tx);
        let to = tempfile::tempdir().unwrap();
        let r = write_items(to.path(), rx);
        (to, r)
    }

    #[test]
    fn an_answer_is_whole_only_with_its_end_marker_and_matching_counts() {
        let mut items: Vec<_> = file("a", b"one").into_iter().collect();
        items.extend(file("b", b"two!"));
        let end = |entries, bytes| fetch_item::Item::End(FetchEnd { entries, bytes });

        let (to, r) = write([items.clone(), vec![end(2, 7)]].concat());
        assert_eq!(r.unwrap().files, 2);
        assert_eq!(std::fs::read(to.path().join("b")).unwrap(), b"two!");

        // Cut short in the second file: an error; the first file is there, verified, and no
        // trace of the second.
        let (to, r) = write(items[..3].to_vec());
        let e = r.unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
        assert_eq!(std::fs::read(to.path().join("a")).unwrap(), b"one");
        assert_eq!(std::fs::read_dir(to.path()).unwrap().count(), 1);

        // An end marker that does not match what came.
        let (_to, r) = write([items, vec![end(3, 7)]].concat());
        assert!(r.unwrap_err().to_string().contains("3 entries"));
    }
}
