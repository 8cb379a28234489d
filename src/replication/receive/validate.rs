//! Every check on incoming ops that needs no I/O (ARCHITECTURE.md, "Confinement").
//!
//! [`validate_ops`] is pure: it reads the committed manifest and the generation received so
//! far, and says what each op asks for as a [`Valid`] op. Staging it (`generation.rs`) is the
//! other half; the checks that depend on what the signature worker did (a delta's base) or on
//! the disk are made there.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use tonic::Status;

use super::MAX_INLINE;
use super::generation::{PState, Pending};
use super::refusal::bad;
use crate::proto::{Entry, Op, op, upsert};
use crate::replication::manifest::{Kind, Manifest, kind_of};
use crate::replication::scan::STAGE_DIR_NAME;
use crate::types::RelPath;

/// Files a generation may have streaming at once (the agent's sender streams up to four). Each holds
/// a thread of the blocking pool until its end: unbounded, a sender could take them all, and
/// the session would wait forever on a writer that never gets a thread, holding the replica.
pub(super) const MAX_STREAMS: usize = 64;

/// One op that passed every check.
pub(super) enum Valid {
    /// Remove `path`, which the replica holds as an `old`.
    Delete {
        path: RelPath,
        old: Kind,
    },
    Upsert(Upsert),
}

/// A checked upsert.
pub(super) struct Upsert {
    pub path: RelPath,
    /// The entry to record: inode and verify flag cleared (a file whose bytes the replica
    /// already holds keeps the replica's inode).
    pub entry: Entry,
    /// The kind the replica holds at `path`, when this upsert changes it.
    pub replaces: Option<Kind>,
    pub content: Content,
}

/// What an upsert carries.
pub(super) enum Content {
    /// A directory the replica does not hold as one: built whole in the stage.
    NewDir,
    /// A directory the replica already holds: metadata only.
    Dir,
    Symlink,
    /// A file whose bytes the replica already holds: metadata only.
    SameBytes,
    Inline {
        data: Bytes,
        zstd: bool,
    },
    /// A rename: the bytes of the committed file `src`.
    CopyFrom(RelPath),
    Stream(Streamed),
}

/// A file streamed as file `id`, as a delta against the base whose signature was sent when
/// `delta`.
pub(super) struct Streamed {
    pub id: u32,
    pub delta: bool,
    /// The inode of the replica's entry at this path (0 when none).
    pub base_ino: u64,
    pub copies: Copies,
}

/// Whether a stream may copy from the replica's committed copy of its path.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Copies {
    No,
    /// Yes: the committed entry there (a file of this size) has the blake3 the sender named;
    /// the stream may produce at most `limit` bytes (the size its upsert declares).
    From {
        base_size: u64,
        limit: u64,
    },
    /// The sender named content the replica does not hold there: the file is refused (its
    /// chunks are dropped and it is asked for again whole).
    Refused(String),
}

/// What an upsert's `base_blake3` allows its stream.
fn copies(
    path: &RelPath,
    base_blake3: &[u8],
    delta: bool,
    entry: &Entry,
    old: Option<&Entry>,
) -> Result<Copies, Status> {
    if base_blake3.is_empty() {
        return Ok(Copies::No);
    }
    if delta {
        return Err(bad(format!("{path}: a stream of deltas and of copies")));
    }
    Ok(match old {
        Some(o) if kind_of(o) == Some(Kind::File) && o.blake3 == base_blake3 => Copies::From {
            base_size: o.size,
            limit: entry.size,
        },
        _ => Copies::Refused(format!(
            "the replica's copy is not the base {} the sender named",
            crate::text::hex(base_blake3)
        )),
    })
}

/// What [`validate_ops`] made of a batch: the ops before the first refused one, and that
/// refusal. The staging half stages the valid ops before returning the refusal, so a batch
/// with several faults is refused for the same fault, after the same staging, as when each op
/// was checked and staged in turn.
pub(super) struct Checked {
    pub ops: Vec<Valid>,
    pub refusal: Option<Status>,
}

/// What a batch is checked against.
pub(super) struct Context<'a> {
    /// The committed manifest.
    pub manifest: &'a Manifest,
    /// The changes received so far in this generation.
    pub changes: &'a BTreeMap<RelPath, Pending>,
    /// Ids of the files streaming now.
    pub streaming: HashSet<u32>,
}

/// Checks a batch of ops, in order, and stops at the first one refused.
pub(super) fn validate_ops(mut cx: Context<'_>, ops: Vec<Op>) -> Checked {
    let mut seen = HashSet::new();
    let mut valid = Vec::new();
    for o in ops {
        match validate_op(&mut cx, &seen, o) {
            Ok(None) => {}
            Ok(Some(v)) => {
                seen.insert(v.path().clone());
                valid.push(v);
            }
            Err(refusal) => {
                return Checked {
                    ops: valid,
                    refusal: Some(refusal),
                };
            }
        }
    }
    Checked {
        ops: valid,
        refusal: None,
    }
}

/// One op; `None` for a deletion of what is already absent. `seen` holds the paths changed
/// earlier in this batch.
fn validate_op(
    cx: &mut Context<'_>,
    seen: &HashSet<RelPath>,
    o: Op,
) -> Result<Option<Valid>, Status> {
    let path = rel(&o.path)?;
    let pending = cx
        .changes
        .get(&path)
        .is_some_and(|prev| prev.state != PState::Rejected);
    if pending || seen.contains(&path) {
        return Err(bad(format!("second change to {path} in one generation")));
    }
    let old = cx.manifest.get(&path);
    match o
        .change
        .ok_or_else(|| bad(format!("{path}: op without a change")))?
    {
        op::Change::Delete(k) => validate_delete(path, k, old.and_then(kind_of)),
        op::Change::Upsert(u) => validate_upsert(cx, path, u, old).map(Some),
    }
}

fn validate_delete(path: RelPath, k: i32, old_kind: Option<Kind>) -> Result<Option<Valid>, Status> {
    let k = Kind::from_proto(k).ok_or_else(|| bad(format!("{path}: delete of no kind")))?;
    match old_kind {
        None => Ok(None), // already absent
        Some(ok) if ok != k => Err(bad(format!(
            "delete of {path} as a {k:?}, but the replica holds a {ok:?}"
        ))),
        Some(_) => Ok(Some(Valid::Delete { path, old: k })),
    }
}

fn validate_upsert(
    cx: &mut Context<'_>,
    path: RelPath,
    u: crate::proto::Upsert,
    old: Option<&Entry>,
) -> Result<Valid, Status> {
    let mut entry = u
        .entry
        .ok_or_else(|| bad(format!("{path}: upsert without entry")))?;
    entry.ino = 0;
    entry.verify = false;
    entry.ctime_ns = 0;
    let kind = check_entry(&path, &entry)?;
    let old_kind = old.and_then(kind_of);
    let content = match (kind, u.content.unwrap_or(upsert::Content::Keep(true))) {
        (Kind::Dir, upsert::Content::Keep(_)) if old_kind != Some(Kind::Dir) => Content::NewDir,
        (Kind::Dir, upsert::Content::Keep(_)) => Content::Dir,
        (Kind::Symlink, upsert::Content::Keep(_)) => Content::Symlink,
        (Kind::File, upsert::Content::Keep(_)) => {
            check_same_bytes(&path, &entry, old)?;
            entry.ino = old.map(|o| o.ino).unwrap_or(0);
            Content::SameBytes
        }
        (Kind::File, upsert::Content::Inline(data)) => {
            if entry.size as usize > MAX_INLINE || data.len() > MAX_INLINE {
                return Err(bad(format!("{path}: inline file too large")));
            }
            Content::Inline { data, zstd: u.zstd }
        }
        (Kind::File, upsert::Content::CopyFrom(src)) => Content::CopyFrom(rel(&src)?),
        (Kind::File, upsert::Content::Stream(id)) => {
            check_stream(cx, &path, id)?;
            Content::Stream(Streamed {
                id,
                delta: u.delta,
                base_ino: old.map(|o| o.ino).unwrap_or(0),
                copies: copies(&path, &u.base_blake3, u.delta, &entry, old)?,
            })
        }
        (k, _) => return Err(bad(format!("{path}: a {k:?} cannot carry file content"))),
    };
    Ok(Valid::Upsert(Upsert {
        path,
        entry,
        replaces: old_kind.filter(|ok| *ok != kind),
        content,
    }))
}

/// A metadata-only change of a file is only valid if the replica holds the same bytes.
fn check_same_bytes(path: &RelPath, entry: &Entry, old: Option<&Entry>) -> Result<(), Status> {
    let same = old.is_some_and(|o| {
        kind_of(o) == Some(Kind::File) && o.blake3 == entry.blake3 && o.size == entry.size
    });
    if !same {
        return Err(bad(format!(
            "{path}: metadata-only change, but the replica's content differs"
        )));
    }
    Ok(())
}

/// A new stream needs an unused id and a free slot (see [`MAX_STREAMS`]).
fn check_stream(cx: &mut Context<'_>, path: &RelPath, id: u32) -> Result<(), Status> {
    if cx.streaming.contains(&id) {
        return Err(bad(format!("file id {id} already streaming")));
    }
    if cx.streaming.len() >= MAX_STREAMS {
        return Err(bad(format!(
            "{path}: more than {MAX_STREAMS} files streaming at once"
        )));
    }
    cx.streaming.insert(id);
    Ok(())
}

/// A path from the network: valid, and not the stage's reserved name.
pub(super) fn rel(path: &[u8]) -> Result<RelPath, Status> {
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

/// An entry's kind, with the fields that kind allows, and its owner and extended attributes
/// within their limits (`replication::attrs::check`).
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
    crate::replication::attrs::check(e, k).map_err(|why| bad(format!("{p}: {why}")))?;
    Ok(k)
}

impl Valid {
    pub(super) fn path(&self) -> &RelPath {
        match self {
            Valid::Delete { path, .. } => path,
            Valid::Upsert(u) => &u.path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::manifest::tests::file;

    #[test]
    fn copies_only_from_the_content_the_replica_holds() {
        let p = RelPath::new("ckpt").unwrap();
        let (base, new) = (file(1000, 1, 7), file(1200, 2, 8));
        assert_eq!(
            copies(&p, &[], false, &new, Some(&base)).unwrap(),
            Copies::No
        );
        assert_eq!(
            copies(&p, &base.blake3, false, &new, Some(&base)).unwrap(),
            Copies::From {
                base_size: 1000,
                limit: 1200
            }
        );
        // Another content, no file there, or a directory there: refused, the session goes on.
        for old in [
            Some(&new),
            None,
            Some(&crate::replication::manifest::tests::dir()),
        ] {
            let r = copies(&p, &base.blake3, false, &new, old).unwrap();
            assert!(matches!(r, Copies::Refused(_)), "{r:?}");
        }
        // Deltas and copies in one stream: a protocol error.
        assert!(copies(&p, &base.blake3, true, &new, Some(&base)).is_err());
    }
}
