//! The snapshot store's files as the backup sees them, and the entry head each object's
//! plaintext starts with (ARCHITECTURE.md, "Off-site backup").
//!
//! The store (`history`) keeps `packs/<64 hex>.pack` (named by the blake3 of the file) and
//! `snapshots/<16 hex>.snap`; both are immutable once present and deleted only by the store's
//! prune. Anything else under the store (`tmp/`, half-written files) is not backed up.
//!
//! An object's plaintext is the entry head, then the file's bytes:
//! `version u8 = 1 | kind u8 | name length u16 | name | mtime ns i64 | length u64`.
//! The head travels inside the AEAD, so the bucket sees neither the name nor the time.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a file of the store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pack,
    Snapshot,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Pack, Kind::Snapshot];

    /// The folder holding this kind, locally and in the bucket.
    pub fn folder(self) -> &'static str {
        match self {
            Kind::Pack => "packs",
            Kind::Snapshot => "snapshots",
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::Pack => 1,
            Kind::Snapshot => 2,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::Pack),
            2 => Some(Kind::Snapshot),
            _ => None,
        }
    }

    /// The kind of a file name inside its folder, when the store would have made it.
    pub fn of_name(self, file: &str) -> bool {
        let (stem, digits) = match self {
            Kind::Pack => (file.strip_suffix(".pack"), 64),
            Kind::Snapshot => (file.strip_suffix(".snap"), 16),
        };
        stem.is_some_and(|s| {
            s.len() == digits
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }
}

/// The local name of a store file: `packs/<hex>.pack` or `snapshots/<hex>.snap`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name {
    pub kind: Kind,
    /// The file name inside its folder.
    pub file: String,
}

impl Name {
    /// Parses `folder/file`; None unless the store would have made that name.
    pub fn parse(local: &str) -> Option<Name> {
        let (folder, file) = local.split_once('/')?;
        let kind = Kind::ALL.into_iter().find(|k| k.folder() == folder)?;
        kind.of_name(file).then(|| Name {
            kind,
            file: file.to_string(),
        })
    }

    pub fn local(&self) -> String {
        format!("{}/{}", self.kind.folder(), self.file)
    }

    /// For a pack, the blake3 its name promises.
    pub fn pack_hash(&self) -> Option<&str> {
        (self.kind == Kind::Pack).then(|| &self.file[..64])
    }

    /// For a snapshot, its id (the 16 hex digits).
    pub fn snapshot_id(&self) -> Option<&str> {
        (self.kind == Kind::Snapshot).then(|| &self.file[..16])
    }
}

/// One file of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    pub name: Name,
    pub path: PathBuf,
    pub len: u64,
    pub mtime_ns: i64,
}

/// Every pack and snapshot under `store`, in name order. A missing folder is an empty one (a
/// new store); a file that vanishes while listed (a prune) is left out.
pub fn scan(store: &Path) -> io::Result<Vec<LocalFile>> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        let dir = store.join(kind.folder());
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        };
        for e in entries {
            let e = e?;
            let Some(file) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !kind.of_name(&file) {
                continue;
            }
            let meta = match e.metadata() {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(LocalFile {
                name: Name { kind, file },
                path: e.path(),
                len: meta.len(),
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The head of an object's plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub name: Name,
    pub mtime_ns: i64,
    pub len: u64,
}

const HEAD_VERSION: u8 = 1;
const HEAD_FIXED: usize = 1 + 1 + 2 + 8 + 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("unknown entry version {0}")]
    Version(u8),
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("entry names {0:?}, which is not a pack or snapshot name")]
    Name(String),
}

impl Head {
    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.local();
        let mut out = Vec::with_capacity(HEAD_FIXED + name.len());
        out.push(HEAD_VERSION);
        out.push(self.name.kind.code());
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&self.mtime_ns.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a head from the start of `buf`: `Ok(None)` while `buf` is too short, else the
    /// head and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        if buf[0] != HEAD_VERSION {
            return Err(HeadError::Version(buf[0]));
        }
        let kind = Kind::from_code(buf[1]).ok_or(HeadError::Kind(buf[1]))?;
        let n = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        let total = HEAD_FIXED + n;
        if buf.len() < total {
            return Ok(None);
        }
        let local = String::from_utf8_lossy(&buf[4..4 + n]).into_owned();
        let name = Name::parse(&local)
            .filter(|name| name.kind == kind)
            .ok_or(HeadError::Name(local))?;
        let at = 4 + n;
        let mtime_ns = i64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let len = u64::from_be_bytes(buf[at + 8..at + 16].try_into().expect("8 bytes"));
        Ok(Some((
            Head {
                name,
                mtime_ns,
                len,
            },
            total,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACK: &str =
        "packs/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.pack";

    #[test]
    fn names_the_store_makes_and_no_others() {
        assert_eq!(Name::parse(PACK).unwrap().kind, Kind::Pack);
        let s = Name::parse("snapshots/0011223344556677.snap").unwrap();
        assert_eq!(s.snapshot_id(), Some("0011223344556677"));
        for bad in [
            "packs/xyz.pack",
            "snapshots/0011223344556677.pack",
            "tmp/0011223344556677.snap",
            "snapshots/0011223344556677.snap.tmp",
            "snapshots/00112233445566AA.snap",
            "../snapshots/0011223344556677.snap",
        ] {
            assert!(Name::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn head_round_trips_and_waits_for_bytes() {
        let h = Head {
            name: Name::parse(PACK).unwrap(),
            mtime_ns: -5,
            len: 1 << 40,
        };
        let mut b = h.encode();
        for cut in 0..b.len() {
            assert_eq!(Head::decode(&b[..cut]).unwrap(), None, "cut {cut}");
        }
        b.extend_from_slice(b"file bytes");
        let (back, used) = Head::decode(&b).unwrap().unwrap();
        assert_eq!(back, h);
        assert_eq!(&b[used..], b"file bytes");
    }

    #[test]
    fn a_bad_head_is_an_error_not_a_panic() {
        assert_eq!(Head::decode(&[9, 1, 0, 0]), Err(HeadError::Version(9)));
        assert_eq!(Head::decode(&[1, 7, 0, 0]), Err(HeadError::Kind(7)));
        let mut b = vec![1, 2, 0, 3];
        b.extend_from_slice(b"../");
        b.extend_from_slice(&[0; 16]);
        assert!(matches!(Head::decode(&b), Err(HeadError::Name(_))));
    }

    #[test]
    fn scan_lists_store_files_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("packs")).unwrap();
        std::fs::create_dir_all(d.path().join("tmp")).unwrap();
        std::fs::write(d.path().join(PACK), b"p").unwrap();
        std::fs::write(d.path().join("packs/junk"), b"j").unwrap();
        std::fs::write(d.path().join("tmp/x.snap"), b"t").unwrap();
        let got = scan(d.path()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name.local(), PACK);
        assert_eq!(got[0].len, 1);
    }
}
