//! The mirror: makes the bucket hold, sealed, exactly the packs and snapshots the local store
//! holds (ARCHITECTURE.md, "Off-site backup").
//!
//! One pass:
//! 1. list the local store and the bucket;
//! 2. plan (pure, [`plan`]): adopt objects the bucket holds for local files the journal does not
//!    know (a crash between an upload and its journal record), upload what is missing, delete
//!    what the journal recorded whose local file is gone;
//! 3. upload packs, several in flight, each recorded in the journal once complete;
//! 4. only if every pack is up, upload snapshots — so a snapshot in the bucket never names a
//!    pack the bucket lacks;
//! 5. delete snapshot objects, then — only if all of those went — pack objects, mirroring the
//!    store's own prune order, so a pack leaves the bucket only after every snapshot that needed
//!    it.
//!
//! A pass never stops at the first failure: every object is tried, failures are counted and
//! the next pass tries again. Nothing is skipped after a crash or an outage, because each pass
//! starts from the listing, not from memory; an object interrupted mid-upload is uploaded
//! again whole (an abandoned multipart upload is aborted when the process lives to do so; a
//! lifecycle rule on the bucket cleans up after a crash: README.md, "Off-site backups").

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::WriteMultipart;
use tokio::io::AsyncReadExt;

use super::bucket::{Bucket, BucketError};
use super::journal::{Journal, JournalError, Uploaded};
use super::layout::{self, Head, Kind, LocalFile};
use crate::rate::RateLimit;
use crate::trust::seal::{self, BackupKey, SEGMENT, SealError};

/// How the mirror uploads.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Objects in flight at once.
    pub concurrency: usize,
    /// Upload bandwidth in bytes per second, shared by every object in flight; None: no limit.
    pub rate_limit: Option<u64>,
    /// Size of each multipart part (at least 5 MiB: S3, R2 and B2 refuse smaller parts but the
    /// last).
    pub part_size: usize,
    /// Sealed objects larger than this go up in parts; smaller ones in one request. No request
    /// carries more than this or `part_size`: each must finish within the bucket's timeout
    /// while `concurrency` of them share the link.
    pub multipart_above: u64,
}

/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Errors a pass keeps word for word (the rest are only counted).
const ERRORS_KEPT: usize = 5;

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            concurrency: 4,
            rate_limit: None,
            part_size: 8 << 20,
            multipart_above: 8 << 20,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    /// Sealed bytes of the objects completed in this pass.
    pub bytes_uploaded: u64,
    pub objects_uploaded: u64,
    /// Objects found complete in the bucket and recorded without uploading them again.
    pub objects_adopted: u64,
    pub objects_deleted: u64,
    /// Objects (or listings) that failed; the next pass tries them again.
    pub failures: u64,
    /// Objects held back because something they depend on failed (snapshots waiting for their
    /// packs, packs waiting for the snapshots that used them to leave the bucket).
    pub deferred: u64,
    /// Objects in the bucket under this prefix that this machine neither holds nor recorded:
    /// left alone (another machine's, or this bucket restored onto a fresh store).
    pub foreign: u64,
    /// The newest snapshot the bucket holds (its time, ns since the epoch), for the backup-lag
    /// metric.
    pub newest_snapshot_ns: Option<i64>,
    /// The first few errors, one line each.
    pub errors: Vec<String>,
}

impl Figures {
    fn fail(&mut self, e: impl std::fmt::Display) {
        self.failures += 1;
        tracing::warn!(error = %e, "backup");
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(e.to_string());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("backup: listing the store {path}: {source}")]
    Store { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Why one object did not go up.
#[derive(Debug, thiserror::Error)]
enum ObjectError {
    #[error("{path}: {source}")]
    Local { path: PathBuf, source: io::Error },
    #[error("{path}: {detail}; not uploaded (check the store with `agent-cpu verify`)")]
    Corrupt { path: PathBuf, detail: String },
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// What a pass will do, decided from the three views before anything is sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Complete in the bucket, unknown to the journal: record them.
    pub adopt: Vec<Uploaded>,
    /// Missing from the bucket (or of the wrong size), packs and snapshots.
    pub upload: BTreeMap<Kind, Vec<LocalFile>>,
    /// Recorded, local file gone: delete, snapshots first.
    pub delete: BTreeMap<Kind, Vec<Uploaded>>,
    pub foreign: u64,
}

/// Plans a pass from the local files, the bucket's listing (object name → size, by kind) and
/// the journal.
pub fn plan(
    local: &[LocalFile],
    listing: &BTreeMap<Kind, BTreeMap<String, u64>>,
    journal: &BTreeMap<String, Uploaded>,
    key: &BackupKey,
) -> Plan {
    let mut p = Plan::default();
    let mut ours = BTreeSet::new();
    for f in local {
        let name = f.name.local();
        let object = key.object_name(&name);
        let sealed = sealed_len(f);
        ours.insert(object.clone());
        let held = listing.get(&f.name.kind).and_then(|l| l.get(&object));
        match (held, journal.get(&name)) {
            (Some(&size), Some(_)) if size == sealed => {}
            (Some(&size), None) if size == sealed => p.adopt.push(Uploaded {
                local: name,
                object,
                sealed,
                mtime_ns: f.mtime_ns,
            }),
            _ => p.upload.entry(f.name.kind).or_default().push(f.clone()),
        }
    }
    let present: BTreeSet<&str> = local.iter().map(|f| f.name.file.as_str()).collect();
    for u in journal.values() {
        let Some(name) = layout::Name::parse(&u.local) else {
            continue;
        };
        ours.insert(u.object.clone());
        if !present.contains(name.file.as_str()) {
            p.delete.entry(name.kind).or_default().push(u.clone());
        }
    }
    p.foreign = listing
        .values()
        .flat_map(|l| l.keys())
        .filter(|o| !ours.contains(*o))
        .count() as u64;
    p
}

/// The sealed size of a local file's object.
fn sealed_len(f: &LocalFile) -> u64 {
    let head = Head {
        name: f.name.clone(),
        mtime_ns: f.mtime_ns,
        len: f.len,
    };
    seal::sealed_len(head.encode().len() as u64 + f.len)
}

/// What every upload of a pass shares.
struct Ctx {
    bucket: Bucket,
    key: BackupKey,
    store: PathBuf,
    limit: Option<RateLimit>,
    opts: UploadOptions,
}

/// The mirror of one store to one bucket.
pub struct Mirror {
    ctx: Ctx,
    journal: Journal,
}

impl Mirror {
    /// Mirrors the store at `store` into `bucket`, recording in the journal at `journal`.
    pub fn open(
        bucket: Bucket,
        key: BackupKey,
        store: &Path,
        journal: &Path,
        opts: UploadOptions,
    ) -> Result<Mirror, UploadError> {
        Ok(Mirror {
            ctx: Ctx {
                bucket,
                key,
                store: store.to_path_buf(),
                limit: opts.rate_limit.map(RateLimit::new),
                opts,
            },
            journal: Journal::open(journal)?,
        })
    }

    /// One pass (see the module doc). `Err` only when the local store or the journal cannot be
    /// read or written; the bucket's failures are counted in the figures.
    pub async fn pass(&mut self) -> Result<Figures, UploadError> {
        let local = layout::scan(&self.ctx.store).map_err(|source| UploadError::Store {
            path: self.ctx.store.clone(),
            source,
        })?;
        let mut f = Figures::default();
        match self.listing().await {
            Ok(listing) => {
                let p = plan(&local, &listing, self.journal.live(), &self.ctx.key);
                self.carry_out(p, &mut f).await?;
            }
            Err(e) => f.fail(e),
        }
        f.newest_snapshot_ns = self.newest_snapshot_ns();
        Ok(f)
    }

    async fn listing(&self) -> Result<BTreeMap<Kind, BTreeMap<String, u64>>, BucketError> {
        let mut out = BTreeMap::new();
        for kind in Kind::ALL {
            out.insert(kind, self.ctx.bucket.list(kind).await?);
        }
        Ok(out)
    }

    async fn carry_out(&mut self, mut p: Plan, f: &mut Figures) -> Result<(), UploadError> {
        f.foreign = p.foreign;
        for u in p.adopt {
            self.journal.uploaded(u)?;
            f.objects_adopted += 1;
        }
        let packs = p.upload.remove(&Kind::Pack).unwrap_or_default();
        let snapshots = p.upload.remove(&Kind::Snapshot).unwrap_or_default();
        self.upload(&packs, f).await?;
        if f.failures == 0 {
            self.upload(&snapshots, f).await?;
        } else {
            f.deferred += snapshots.len() as u64;
        }
        let before = f.failures;
        let gone = p.delete.remove(&Kind::Snapshot).unwrap_or_default();
        self.delete(&gone, f).await?;
        let gone = p.delete.remove(&Kind::Pack).unwrap_or_default();
        if f.failures == before {
            self.delete(&gone, f).await?;
        } else {
            f.deferred += gone.len() as u64;
        }
        Ok(())
    }

    async fn upload(&mut self, files: &[LocalFile], f: &mut Figures) -> Result<(), UploadError> {
        let ctx = &self.ctx;
        // The futures are made first: a stream over a closure borrowing them is not provably
        // `Send`, and the agent runs this pass in a spawned task.
        let uploads: Vec<_> = files.iter().map(|file| upload_one(ctx, file)).collect();
        let mut done = futures::stream::iter(uploads).buffer_unordered(ctx.opts.concurrency.max(1));
        while let Some(r) = done.next().await {
            match r {
                Ok(u) => {
                    f.bytes_uploaded += u.sealed;
                    f.objects_uploaded += 1;
                    self.journal.uploaded(u)?;
                }
                Err(e) => f.fail(e),
            }
        }
        Ok(())
    }

    async fn delete(&mut self, gone: &[Uploaded], f: &mut Figures) -> Result<(), UploadError> {
        for u in gone {
            let Some(name) = layout::Name::parse(&u.local) else {
                continue;
            };
            match self
                .ctx
                .bucket
                .delete(&Bucket::relative(name.kind, &u.object))
                .await
            {
                Ok(()) => {
                    self.journal.deleted(&u.local)?;
                    f.objects_deleted += 1;
                }
                Err(e) => f.fail(e),
            }
        }
        Ok(())
    }

    /// The newest snapshot the journal says the bucket holds.
    pub fn newest_snapshot_ns(&self) -> Option<i64> {
        self.journal
            .live()
            .values()
            .filter(|u| u.local.starts_with("snapshots/"))
            .map(|u| u.mtime_ns)
            .max()
    }
}

/// Seals and uploads one file; its journal record once the bucket holds all of it.
async fn upload_one(ctx: &Ctx, file: &LocalFile) -> Result<Uploaded, ObjectError> {
    let local = file.name.local();
    let object = ctx.key.object_name(&local);
    let relative = Bucket::relative(file.name.kind, &object);
    let sealed = sealed_len(file);
    let mut src = Plain::open(file).await?;
    let mut sealer = ctx.key.sealer(&relative);
    let header = sealer.header();
    if sealed <= ctx.opts.multipart_above {
        let mut out = Vec::with_capacity(sealed as usize);
        out.extend_from_slice(&header);
        while let Some((plain, last)) = src.next_segment().await? {
            out.extend(sealer.seal_segment(&plain, last)?);
        }
        src.verify()?;
        ctx.take(out.len()).await;
        ctx.bucket.put(&relative, out).await?;
    } else {
        let mut w = ctx
            .bucket
            .put_multipart(&relative, ctx.opts.part_size)
            .await?;
        match feed(ctx, &relative, &mut w, &header, &mut sealer, &mut src).await {
            Ok(()) => {
                w.finish()
                    .await
                    .map_err(|e| ctx.bucket.multipart_error(&relative, e))?;
            }
            Err(e) => {
                // Abort so the bucket does not keep (and bill) the parts; a failing abort
                // during an outage is left to the bucket's lifecycle rule.
                let _ = w.abort().await;
                return Err(e);
            }
        }
    }
    Ok(Uploaded {
        local,
        object,
        sealed,
        mtime_ns: file.mtime_ns,
    })
}

/// Streams a file's sealed segments into a multipart upload.
async fn feed(
    ctx: &Ctx,
    relative: &str,
    w: &mut WriteMultipart,
    header: &[u8],
    sealer: &mut seal::Sealer,
    src: &mut Plain,
) -> Result<(), ObjectError> {
    w.write(header);
    while let Some((plain, last)) = src.next_segment().await? {
        let s = sealer.seal_segment(&plain, last)?;
        ctx.take(s.len()).await;
        w.wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(|e| ctx.bucket.multipart_error(relative, e))?;
        w.write(&s);
    }
    src.verify()
}

impl Ctx {
    async fn take(&self, bytes: usize) {
        if let Some(l) = &self.limit {
            l.take(bytes as u64).await;
        }
    }
}

/// An object's plaintext, read segment by segment: the entry head, then the file, whose blake3
/// is checked against a pack's name as it streams by.
struct Plain {
    path: PathBuf,
    head: Vec<u8>,
    file: tokio::fs::File,
    left: u64,
    hasher: Option<(blake3::Hasher, String)>,
    done: bool,
}

impl Plain {
    async fn open(f: &LocalFile) -> Result<Plain, ObjectError> {
        let file = tokio::fs::File::open(&f.path)
            .await
            .map_err(|source| ObjectError::Local {
                path: f.path.clone(),
                source,
            })?;
        let head = Head {
            name: f.name.clone(),
            mtime_ns: f.mtime_ns,
            len: f.len,
        };
        Ok(Plain {
            path: f.path.clone(),
            head: head.encode(),
            file,
            left: f.len,
            hasher: f
                .name
                .pack_hash()
                .map(|h| (blake3::Hasher::new(), h.to_string())),
            done: false,
        })
    }

    /// The next segment and whether it is the last; None after the last.
    async fn next_segment(&mut self) -> Result<Option<(Vec<u8>, bool)>, ObjectError> {
        if self.done {
            return Ok(None);
        }
        let mut buf = std::mem::take(&mut self.head);
        buf.reserve(SEGMENT - buf.len().min(SEGMENT));
        while buf.len() < SEGMENT && self.left > 0 {
            let at = buf.len();
            let want = ((SEGMENT - at) as u64).min(self.left) as usize;
            buf.resize(at + want, 0);
            let n = self
                .file
                .read(&mut buf[at..])
                .await
                .map_err(|source| ObjectError::Local {
                    path: self.path.clone(),
                    source,
                })?;
            buf.truncate(at + n);
            if n == 0 {
                return Err(self.corrupt(format!(
                    "the file shrank while read ({} bytes short)",
                    self.left
                )));
            }
            if let Some((h, _)) = &mut self.hasher {
                h.update(&buf[at..]);
            }
            self.left -= n as u64;
        }
        let last = buf.len() < SEGMENT;
        self.done = last;
        Ok(Some((buf, last)))
    }

    /// After the last segment: a pack's bytes hash to its name.
    fn verify(&self) -> Result<(), ObjectError> {
        if let Some((h, want)) = &self.hasher {
            let got = h.finalize().to_hex();
            if got.as_str() != want {
                return Err(self.corrupt(format!(
                    "its blake3 is {got}, not the {want} its name promises"
                )));
            }
        }
        Ok(())
    }

    fn corrupt(&self, detail: String) -> ObjectError {
        ObjectError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests;
