//! Disaster recovery from the bucket alone: a snapshot and its packs into a fresh store
//! directory (ARCHITECTURE.md, "Off-site backup").
//!
//! Order, and why:
//! 1. The target must be new, empty, or an interrupted restore (it holds `tmp/restoring`):
//!    nothing of a live store is ever overwritten.
//! 2. Every snapshot object's first segment is fetched by range and opened: a wrong key is
//!    refused here, before anything is written.
//! 3. Packs, then the chosen snapshot, each streamed through the AEAD into `tmp/`, checked
//!    (entry head, the object's name bound to the local name, a pack's blake3 against its name,
//!    the length), fsynced and renamed into `packs/` or `snapshots/`. The snapshot goes last, so
//!    a store that holds it holds every pack: a crash leaves `tmp/restoring`, never a snapshot
//!    without its packs. A rerun skips packs already in place (each was verified before its
//!    rename).
//! 4. The directories are fsynced, then `tmp/` is removed: the store is complete.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::StreamExt;

use super::bucket::{Bucket, BucketError};
use super::layout::{self, Head, Kind, Name};
use crate::disk::crashsafe::fsync_dir;
use crate::trust::seal::{BackupKey, HEADER_LEN, Opener, SEALED_SEGMENT, SealError};

/// Which snapshot to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    Latest,
    /// A snapshot id: 16 hex digits.
    Id(String),
}

impl std::str::FromStr for Pick {
    type Err = RestoreError;
    fn from_str(s: &str) -> Result<Pick, RestoreError> {
        if s == "latest" {
            return Ok(Pick::Latest);
        }
        let file = format!("{s}.snap");
        if Kind::Snapshot.of_name(&file) {
            Ok(Pick::Id(s.into()))
        } else {
            Err(RestoreError::BadPick(s.into()))
        }
    }
}

/// A snapshot the bucket holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotObject {
    pub name: Name,
    /// Its time (the local file's mtime when it was uploaded), ns since the epoch.
    pub mtime_ns: i64,
    /// Its name in the bucket.
    pub object: String,
}

impl SnapshotObject {
    pub fn id(&self) -> &str {
        self.name.snapshot_id().unwrap_or_default()
    }
}

/// What a restore wrote.
#[derive(Debug, Clone)]
pub struct Restored {
    pub snapshot: SnapshotObject,
    pub packs: u64,
    /// Plaintext bytes written (packs and snapshot).
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("refusing to restore into {path}: {detail}; give a new or empty directory")]
    Target { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("bucket {url} holds no snapshot")]
    NoSnapshots { url: String },
    #[error("bucket holds no snapshot {id}; it holds: {available}")]
    NoSuchSnapshot { id: String, available: String },
    #[error("object {object}: {detail}")]
    BadObject { object: String, detail: String },
    #[error("--snapshot takes `latest` or a snapshot id (16 hex digits), not {0:?}")]
    BadPick(String),
}

const MARKER: &str = "restoring";

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The snapshots in the bucket.
#[derive(Debug, Default)]
pub struct Listing {
    /// Those that open, oldest first.
    pub snapshots: Vec<SnapshotObject>,
    /// Objects that do not (altered, cut, stored under another name): left out, each with why.
    pub damaged: Vec<RestoreError>,
}

/// Every snapshot in the bucket. Reads one segment of each; writes nothing. A wrong key or an
/// unreadable bucket is an error; a damaged snapshot object is only left out, so one bad object
/// does not stand between an operator and the others.
pub async fn snapshots(bucket: &Bucket, key: &BackupKey) -> Result<Listing, RestoreError> {
    let mut out = Listing::default();
    for (object, size) in bucket.list(Kind::Snapshot).await? {
        match first_head(bucket, key, &object, size).await {
            Ok(head) => out.snapshots.push(SnapshotObject {
                name: head.name,
                mtime_ns: head.mtime_ns,
                object,
            }),
            Err(e @ (RestoreError::Bucket(_) | RestoreError::Seal(SealError::WrongKey { .. }))) => {
                return Err(e);
            }
            Err(RestoreError::Seal(e @ SealError::Version { .. })) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "backup: a damaged snapshot object is left out");
                out.damaged.push(e);
            }
        }
    }
    out.snapshots
        .sort_by(|a, b| (a.mtime_ns, a.id()).cmp(&(b.mtime_ns, b.id())));
    Ok(out)
}

/// The entry head of a snapshot object, from its first segment alone.
async fn first_head(
    bucket: &Bucket,
    key: &BackupKey,
    object: &str,
    size: u64,
) -> Result<Head, RestoreError> {
    let relative = Bucket::relative(Kind::Snapshot, object);
    let end = size.min((HEADER_LEN + SEALED_SEGMENT) as u64);
    let bytes = bucket.get_range(&relative, 0..end).await?;
    let mut o = key.opener(&relative, &bytes)?;
    let rest = bytes[HEADER_LEN..].to_vec();
    let last = size < (HEADER_LEN + SEALED_SEGMENT) as u64;
    let plain = o.open_segment(rest, last)?;
    let bad = |detail: String| RestoreError::BadObject {
        object: relative.clone(),
        detail,
    };
    let (head, _) = Head::decode(&plain)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("its first segment is shorter than its entry head".into()))?;
    check_binding(key, &relative, object, &head, Kind::Snapshot)?;
    Ok(head)
}

/// The object's name must be the keyed hash of the local name sealed inside it.
fn check_binding(
    key: &BackupKey,
    relative: &str,
    object: &str,
    head: &Head,
    kind: Kind,
) -> Result<(), RestoreError> {
    if head.name.kind != kind || key.object_name(&head.name.local()) != object {
        return Err(RestoreError::BadObject {
            object: relative.into(),
            detail: format!(
                "it holds {}, whose object has another name (the bucket was rearranged)",
                head.name.local()
            ),
        });
    }
    Ok(())
}

/// Restores the snapshot `pick` and the packs into the store directory `to`.
pub async fn restore(
    bucket: &Bucket,
    key: &BackupKey,
    pick: &Pick,
    to: &Path,
    concurrency: usize,
) -> Result<Restored, RestoreError> {
    check_target(to)?;
    let all = snapshots(bucket, key).await?;
    let snapshot = choose(all.snapshots, pick, bucket.url())?;
    prepare(to)?;
    let have = already_restored(to, key)?;
    let packs = bucket.list(Kind::Pack).await?;
    let todo: Vec<&String> = packs.keys().filter(|o| !have.contains(*o)).collect();
    // Futures made first, so the restore stays `Send` in a spawned task (see `upload`).
    let fetches: Vec<_> = todo
        .iter()
        .map(|o| fetch(bucket, key, Kind::Pack, o, to))
        .collect();
    let mut done = futures::stream::iter(fetches).buffer_unordered(concurrency.max(1));
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some(r) = done.next().await {
        bytes += r?;
        count += 1;
    }
    drop(done);
    let packs_dir = to.join(Kind::Pack.folder());
    fsync_dir(&packs_dir).map_err(io_at(&packs_dir))?;
    bytes += fetch(bucket, key, Kind::Snapshot, &snapshot.object, to).await?;
    finish(to)?;
    Ok(Restored {
        snapshot,
        packs: count,
        bytes,
    })
}

fn choose(
    all: Vec<SnapshotObject>,
    pick: &Pick,
    url: &str,
) -> Result<SnapshotObject, RestoreError> {
    if all.is_empty() {
        return Err(RestoreError::NoSnapshots { url: url.into() });
    }
    match pick {
        Pick::Latest => Ok(all.last().expect("not empty").clone()),
        Pick::Id(id) => {
            let available = all.iter().map(|s| s.id().to_string()).collect::<Vec<_>>();
            all.into_iter()
                .find(|s| s.id() == id)
                .ok_or_else(|| RestoreError::NoSuchSnapshot {
                    id: id.clone(),
                    available: available.join(", "),
                })
        }
    }
}

/// `to` is new, empty, or an interrupted restore.
fn check_target(to: &Path) -> Result<(), RestoreError> {
    let target = |detail: &str| RestoreError::Target {
        path: to.to_path_buf(),
        detail: detail.into(),
    };
    match fs::read_dir(to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(to)(e)),
        Ok(mut entries) => {
            if entries.next().is_none() || to.join("tmp").join(MARKER).exists() {
                Ok(())
            } else {
                Err(target("it is not empty and holds no interrupted restore"))
            }
        }
    }
}

fn prepare(to: &Path) -> Result<(), RestoreError> {
    for d in ["tmp", Kind::Pack.folder(), Kind::Snapshot.folder()] {
        let p = to.join(d);
        fs::create_dir_all(&p).map_err(io_at(&p))?;
    }
    let marker = to.join("tmp").join(MARKER);
    File::create(&marker)
        .and_then(|f| f.sync_all())
        .map_err(io_at(&marker))?;
    for d in [to.join("tmp"), to.to_path_buf()] {
        fsync_dir(&d).map_err(io_at(&d))?;
    }
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent).map_err(io_at(parent))?;
    }
    Ok(())
}

/// Objects whose files an interrupted restore already put in place.
fn already_restored(to: &Path, key: &BackupKey) -> Result<BTreeSet<String>, RestoreError> {
    let files = layout::scan(to).map_err(io_at(to))?;
    Ok(files
        .iter()
        .filter(|f| f.name.kind == Kind::Pack)
        .map(|f| key.object_name(&f.name.local()))
        .collect())
}

fn finish(to: &Path) -> Result<(), RestoreError> {
    let snaps = to.join(Kind::Snapshot.folder());
    fsync_dir(&snaps).map_err(io_at(&snaps))?;
    let tmp = to.join("tmp");
    fs::remove_dir_all(&tmp).map_err(io_at(&tmp))?;
    fsync_dir(to).map_err(io_at(to))
}

/// Downloads, opens and checks one object into `tmp/`, then renames it into place; returns
/// the plaintext bytes written.
async fn fetch(
    bucket: &Bucket,
    key: &BackupKey,
    kind: Kind,
    object: &str,
    to: &Path,
) -> Result<u64, RestoreError> {
    let relative = Bucket::relative(kind, object);
    let tmp = to.join("tmp").join(format!("{object}.part"));
    let r = fetch_to(bucket, key, kind, object, &relative, &tmp).await;
    let (head, len) = match r {
        Ok(x) => x,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let dest = to.join(head.name.kind.folder()).join(&head.name.file);
    fs::rename(&tmp, &dest).map_err(io_at(&dest))?;
    Ok(len)
}

async fn fetch_to(
    bucket: &Bucket,
    key: &BackupKey,
    kind: Kind,
    object: &str,
    relative: &str,
    tmp: &Path,
) -> Result<(Head, u64), RestoreError> {
    let mut stream = bucket.get(relative).await?;
    let mut header = Vec::new();
    let mut opener: Option<Opener> = None;
    let file = File::create(tmp).map_err(io_at(tmp))?;
    let mut sink = Sink::new(file, tmp, key, kind, object, relative);
    while let Some(chunk) = stream.next().await {
        let mut chunk = &chunk?[..];
        if opener.is_none() {
            let n = (HEADER_LEN - header.len()).min(chunk.len());
            header.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            if header.len() == HEADER_LEN {
                opener = Some(key.opener(relative, &header)?);
            }
        }
        if let Some(o) = &mut opener {
            let r = o.feed(chunk, &mut |p| sink.push(p));
            sink.check(r)?;
        }
    }
    let Some(o) = opener else {
        return Err(RestoreError::Seal(SealError::Truncated {
            object: relative.into(),
            detail: format!("{} bytes, shorter than the header", header.len()),
        }));
    };
    let r = o.finish(&mut |p| sink.push(p));
    sink.check(r)?;
    sink.close()
}

/// Where an object's plaintext goes: the entry head is parsed and checked, the rest written to
/// the temporary file (hashed, for a pack).
struct Sink<'a> {
    file: File,
    path: &'a Path,
    key: &'a BackupKey,
    kind: Kind,
    object: &'a str,
    relative: &'a str,
    pending: Vec<u8>,
    head: Option<Head>,
    written: u64,
    hasher: blake3::Hasher,
    bad: Option<RestoreError>,
}

impl<'a> Sink<'a> {
    fn new(
        file: File,
        path: &'a Path,
        key: &'a BackupKey,
        kind: Kind,
        object: &'a str,
        relative: &'a str,
    ) -> Sink<'a> {
        Sink {
            file,
            path,
            key,
            kind,
            object,
            relative,
            pending: Vec::new(),
            head: None,
            written: 0,
            hasher: blake3::Hasher::new(),
            bad: None,
        }
    }

    fn bad(&self, detail: String) -> RestoreError {
        RestoreError::BadObject {
            object: self.relative.into(),
            detail,
        }
    }

    /// Takes opened plaintext. An `Err` stops the opener; the reason waits in `bad`.
    fn push(&mut self, plain: &[u8]) -> io::Result<()> {
        if self.head.is_some() {
            return self.write(plain);
        }
        let mut joined = std::mem::take(&mut self.pending);
        joined.extend_from_slice(plain);
        match Head::decode(&joined) {
            Ok(None) => {
                self.pending = joined;
                Ok(())
            }
            Ok(Some((head, used))) => {
                let bound = check_binding(self.key, self.relative, self.object, &head, self.kind);
                if let Err(e) = bound {
                    return self.stop(e);
                }
                self.head = Some(head);
                self.write(&joined[used..])
            }
            Err(e) => {
                let e = self.bad(e.to_string());
                self.stop(e)
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let len = self.head.as_ref().map_or(0, |h| h.len);
        if self.written + bytes.len() as u64 > len {
            let e = self.bad(format!("it holds more than the {len} bytes its head gives"));
            return self.stop(e);
        }
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.file.write_all(bytes)
    }

    fn stop(&mut self, e: RestoreError) -> io::Result<()> {
        self.bad = Some(e);
        Err(io::Error::other("stopped"))
    }

    /// Turns an opener's result into ours, preferring the reason a push stopped for.
    fn check(&mut self, r: Result<(), SealError>) -> Result<(), RestoreError> {
        match (r, self.bad.take()) {
            (_, Some(e)) => Err(e),
            (Err(SealError::Io { source, .. }), None) => Err(io_at(self.path)(source)),
            (Err(e), None) => Err(e.into()),
            (Ok(()), None) => Ok(()),
        }
    }

    /// The object is complete: check its length and a pack's hash, fsync, set its mtime.
    fn close(self) -> Result<(Head, u64), RestoreError> {
        let Some(head) = self.head.clone() else {
            return Err(self.bad("it ends inside its entry head".into()));
        };
        if self.written != head.len {
            return Err(self.bad(format!(
                "it holds {} bytes, its head gives {}",
                self.written, head.len
            )));
        }
        if let Some(want) = head.name.pack_hash() {
            let got = self.hasher.finalize().to_hex();
            if got.as_str() != want {
                return Err(self.bad(format!(
                    "its content hashes to {got}, not to its name {want}"
                )));
            }
        }
        let mtime = if head.mtime_ns >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_nanos(head.mtime_ns as u64)
        } else {
            SystemTime::UNIX_EPOCH
        };
        self.file
            .set_modified(mtime)
            .and_then(|()| self.file.sync_all())
            .map_err(io_at(self.path))?;
        Ok((head, self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_parse() {
        assert_eq!("latest".parse::<Pick>().unwrap(), Pick::Latest);
        assert_eq!(
            "00112233aabbccdd".parse::<Pick>().unwrap(),
            Pick::Id("00112233aabbccdd".into())
        );
        for bad in ["", "LATEST", "0011", "../x", "00112233aabbccdd.snap"] {
            assert!(
                matches!(bad.parse::<Pick>(), Err(RestoreError::BadPick(_))),
                "{bad}"
            );
        }
    }

    fn snap(id: &str, t: i64) -> SnapshotObject {
        SnapshotObject {
            name: Name::parse(&format!("snapshots/{id}.snap")).unwrap(),
            mtime_ns: t,
            object: id.repeat(4),
        }
    }

    #[test]
    fn latest_is_the_newest_and_an_unknown_id_lists_the_rest() {
        let all = vec![snap("0000000000000001", 1), snap("0000000000000002", 5)];
        assert_eq!(
            choose(all.clone(), &Pick::Latest, "s3://b")
                .unwrap()
                .mtime_ns,
            5
        );
        let e = choose(all, &Pick::Id("00000000000000ff".into()), "s3://b").unwrap_err();
        assert!(
            e.to_string().contains("0000000000000001, 0000000000000002"),
            "{e}"
        );
        let e = choose(vec![], &Pick::Latest, "s3://b").unwrap_err();
        assert!(matches!(e, RestoreError::NoSnapshots { .. }));
    }

    #[test]
    fn a_live_store_is_never_a_target() {
        let d = tempfile::tempdir().unwrap();
        check_target(&d.path().join("new")).unwrap();
        check_target(d.path()).unwrap();
        fs::create_dir_all(d.path().join("packs")).unwrap();
        let e = check_target(d.path()).unwrap_err();
        assert!(matches!(e, RestoreError::Target { .. }), "{e}");
        fs::create_dir_all(d.path().join("tmp")).unwrap();
        fs::write(d.path().join("tmp").join(MARKER), b"").unwrap();
        check_target(d.path()).unwrap();
    }
}
