//! The names of the history's objects: chunks and packs by their blake3, snapshots by the first
//! 8 bytes of the blake3 of their file. Names are content, so a copied file keeps its name.

use std::fmt;
use std::str::FromStr;

use crate::text::hex;

/// The blake3 of a chunk's raw bytes.
pub type ChunkId = [u8; 32];

/// A pack: the blake3 of the whole pack file; the file is `packs/<hex>.pack`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId(pub [u8; 32]);

/// A snapshot: the first 8 bytes of the blake3 of its file; the file is `snapshots/<hex>.snap`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(pub [u8; 8]);

impl PackId {
    pub fn file_name(&self) -> String {
        format!("{self}.pack")
    }

    /// The id a pack file name stands for, if it is one (`<64 hex>.pack`).
    pub fn from_file_name(name: &str) -> Option<PackId> {
        let stem = name.strip_suffix(".pack")?;
        Some(PackId(unhex::<32>(stem)?))
    }
}

impl SnapshotId {
    pub fn of(file: &[u8]) -> SnapshotId {
        let h = blake3::hash(file);
        let mut id = [0u8; 8];
        id.copy_from_slice(&h.as_bytes()[..8]);
        SnapshotId(id)
    }

    pub fn file_name(&self) -> String {
        format!("{self}.snap")
    }

    /// The id a snapshot file name stands for, if it is one (`<16 hex>.snap`).
    pub fn from_file_name(name: &str) -> Option<SnapshotId> {
        let stem = name.strip_suffix(".snap")?;
        Some(SnapshotId(unhex::<8>(stem)?))
    }
}

/// Exactly `2 * N` lower- or upper-case hex digits.
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    crate::text::unhex(s)?.try_into().ok()
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

impl FromStr for SnapshotId {
    type Err = String;

    fn from_str(s: &str) -> Result<SnapshotId, String> {
        unhex::<8>(s)
            .map(SnapshotId)
            .ok_or_else(|| format!("{s:?} is not a snapshot id (16 hex digits)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ids() {
        let p = PackId([0xab; 32]);
        assert_eq!(PackId::from_file_name(&p.file_name()), Some(p));
        let s = SnapshotId::of(b"x");
        assert_eq!(SnapshotId::from_file_name(&s.file_name()), Some(s));
        assert_eq!(s.to_string().parse::<SnapshotId>(), Ok(s));
        for bad in ["", ".pack", "zz.pack", &format!("{}.pack", "a".repeat(63))] {
            assert_eq!(PackId::from_file_name(bad), None, "{bad}");
        }
        assert_eq!(SnapshotId::from_file_name("0123456789abcdef.tmp"), None);
        assert!("0123456789abcde".parse::<SnapshotId>().is_err());
    }
}
