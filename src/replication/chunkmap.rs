//! Chunk maps: where the content-defined chunks of a big file lie, so that the sender knows what
//! changed in a file without asking the receiver (ARCHITECTURE.md, "The life of one write").
//!
//! When the sender streams a file of at least [`MIN_FILE`] bytes it cuts the content into
//! FastCDC chunks (`fastcdc::v2020::cut`, normalisation level 1, as the history chunker) and keeps
//! each chunk's length and its xxh3-128 ([`chunk_hash`]). Once the receiver has
//! committed that content, the map is stored under the content's whole-file blake3 in
//! `<state>/chunkmaps/` ([`MapStore`]). The next time the file changes, its new chunks are looked
//! up in the map of the receiver's copy: a chunk found there goes as `copy(offset, len)` of the
//! receiver's committed file, anything else as literal bytes.
//!
//! Sizes: 2 KiB minimum, 4 KiB average, 16 KiB maximum (the minimum is skipped without looking
//! for a cut). The history store's chunks (128 KiB on average) are made for deduplication across
//! snapshots; here a chunk is the unit an edit costs on the wire: a 1 KiB edit in place costs the
//! one or two chunks around it, about 9 KiB on average (8 such edits in a 64 MiB file: 70 KiB
//! median, 97 KiB at most over 20 seeds), a 64 KiB overwrite about 72 KiB, against blocks of
//! 4 KiB and more in the rsync fallback and 8 KiB in rsync itself at that size. Twice these sizes
//! cost 113 KiB median and 164 KiB at most for the same edits; half of them would cost a third
//! more time to cut and hash. A 256 MiB file's map is about 64,000 entries (1.3 MiB on disk,
//! 20 bytes each), read only when that file changes.
//!
//! A map is a hint, never trusted for correctness: a 128-bit hash makes an accidental clash
//! negligible, and a wrong copy (a clash, even one crafted by whoever writes the workspace, or a
//! map that does not match the receiver's bytes) is caught by the receiver's blake3 check of the
//! whole file, which then asks for it whole: a clash costs a resend, never a wrong replica. So the
//! chunks are named by xxh3-128, not blake3: 256 MiB cut into 4 KiB chunks hashed in 10 ms
//! against 178 ms (one core; blake3 of the whole file, which the sender computes too, 37 ms).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use fastcdc::v2020::{Normalization, cut, select_masks};

use crate::disk::crashsafe::{self, kind};
use crate::text::{hex, unhex};

/// Files from this size on get a chunk map.
pub const MIN_FILE: u64 = 1 << 20;
/// Smallest chunk (except a file's last).
pub const MIN: usize = 2 << 10;
/// Target average chunk size.
pub const AVG: usize = 4 << 10;
/// Largest chunk.
pub const MAX: usize = 16 << 10;
/// Bytes of a chunk's hash.
pub const HASH_LEN: usize = 16;
/// Folder of the maps inside the sender's state directory.
pub const DIR: &str = "chunkmaps";

/// A chunk's identity: its hash ([`chunk_hash`]).
pub type ChunkHash = [u8; HASH_LEN];

/// The identity of `data` as a chunk: its xxh3-128, little-endian.
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// The chunks of one file's content, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkMap {
    pub lens: Vec<u32>,
    pub hashes: Vec<ChunkHash>,
}

impl ChunkMap {
    pub fn push(&mut self, len: usize, hash: ChunkHash) {
        self.lens.push(len as u32);
        self.hashes.push(hash);
    }

    /// The length of the content it maps.
    pub fn size(&self) -> u64 {
        self.lens.iter().map(|&l| l as u64).sum()
    }

    /// Where each chunk first occurs in the content.
    pub fn offsets(&self) -> HashMap<ChunkHash, u64> {
        let mut at = HashMap::with_capacity(self.lens.len());
        let mut off = 0u64;
        for (len, h) in self.lens.iter().zip(&self.hashes) {
            at.entry(*h).or_insert(off);
            off += *len as u64;
        }
        at
    }

    /// The stored form: a count, then each chunk's length (u32, little-endian) and hash.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.lens.len() * (4 + HASH_LEN));
        out.extend_from_slice(&(self.lens.len() as u32).to_le_bytes());
        for (len, h) in self.lens.iter().zip(&self.hashes) {
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(h);
        }
        out
    }

    /// Reads the stored form back; refuses anything malformed (wrong length, empty chunks).
    pub fn decode(b: &[u8]) -> Result<ChunkMap, String> {
        let Some((n, rest)) = b.split_first_chunk::<4>() else {
            return Err("shorter than its count".into());
        };
        let n = u32::from_le_bytes(*n) as usize;
        if rest.len() != n.checked_mul(4 + HASH_LEN).ok_or("count overflows")? {
            return Err(format!("{} bytes for {n} chunks", rest.len()));
        }
        let mut m = ChunkMap {
            lens: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
        };
        for e in rest.chunks_exact(4 + HASH_LEN) {
            let len = u32::from_le_bytes(e[..4].try_into().expect("4 bytes"));
            if len == 0 {
                return Err("a chunk of 0 bytes".into());
            }
            m.push(len as usize, e[4..].try_into().expect("hash"));
        }
        Ok(m)
    }
}

/// Content-defined cut points.
pub struct Cutter {
    masks: (u64, u64),
}

impl Default for Cutter {
    fn default() -> Cutter {
        Cutter {
            masks: select_masks(AVG, Normalization::Level1),
        }
    }
}

impl Cutter {
    /// The lengths of the whole chunks at the start of `data`. Unless `eof`, a chunk is cut only
    /// where at least [`MAX`] bytes were there to look at, so the unclaimed rest (less than
    /// `MAX` bytes) must be offered again with what follows it; at `eof` everything is cut.
    pub fn cuts(&self, data: &[u8], eof: bool) -> Vec<usize> {
        let (s, l) = self.masks;
        let mut out = Vec::with_capacity(data.len() / AVG + 1);
        let mut start = 0;
        while start < data.len() && (eof || data.len() - start >= MAX) {
            let (_, len) = cut(&data[start..], MIN, AVG, MAX, s, l, s << 1, l << 1);
            out.push(len);
            start += len;
        }
        out
    }
}

/// The maps kept in a state directory, one file per content (named by its blake3).
#[derive(Clone, Debug)]
pub struct MapStore {
    dir: PathBuf,
}

impl MapStore {
    pub fn open(state_dir: &Path) -> io::Result<MapStore> {
        let dir = state_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(MapStore { dir })
    }

    fn path(&self, content: &[u8]) -> PathBuf {
        self.dir.join(hex(content))
    }

    /// The map of the content with this blake3, if one is kept (an unreadable one is reported
    /// and treated as absent: the file then goes the slower way).
    pub fn load(&self, content: &[u8]) -> Option<ChunkMap> {
        if content.len() != 32 {
            return None;
        }
        let r = crashsafe::read_state(&self.path(content), kind::CHUNK_MAP)
            .map_err(|e| e.to_string())
            .and_then(|b| b.map(|b| ChunkMap::decode(&b)).transpose());
        match r {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(content = %hex(content), error = %e, "ignoring an unreadable chunk map");
                None
            }
        }
    }

    /// Whether a map of this content is kept.
    pub fn has(&self, content: &[u8]) -> bool {
        content.len() == 32 && self.path(content).exists()
    }

    /// Keeps `map` as the map of the content with this blake3 (crash-safely).
    pub fn save(&self, content: &[u8], map: &ChunkMap) -> io::Result<()> {
        crashsafe::write_state(&self.path(content), kind::CHUNK_MAP, &map.encode())
    }

    /// Removes every map whose content is not in `referenced`; returns how many went.
    pub fn keep_only(&self, referenced: &HashSet<Vec<u8>>) -> io::Result<usize> {
        let mut removed = 0;
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let keep = name
                .to_str()
                .and_then(unhex)
                .is_some_and(|h| referenced.contains(&h));
            if !keep {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    pub(crate) fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// The map of `data`, cut in pieces of `step` bytes as a stream reader would.
    fn map_of(data: &[u8], step: usize) -> ChunkMap {
        let c = Cutter::default();
        let mut m = ChunkMap::default();
        let mut carry = Vec::new();
        let mut pos = 0;
        loop {
            let end = (pos + step).min(data.len());
            carry.extend_from_slice(&data[pos..end]);
            pos = end;
            let eof = pos == data.len();
            let mut used = 0;
            for len in c.cuts(&carry, eof) {
                m.push(len, chunk_hash(&carry[used..used + len]));
                used += len;
            }
            carry.drain(..used);
            if eof {
                return m;
            }
        }
    }

    #[test]
    fn cuts_do_not_depend_on_how_the_stream_was_read() {
        let data = random((3 << 20) + 777, 1);
        let a = map_of(&data, 1 << 20);
        let b = map_of(&data, 100_003);
        assert_eq!(a, b);
        assert_eq!(a.size(), data.len() as u64);
        assert!(a.lens.iter().all(|&l| l as usize <= MAX));
        assert!(
            a.lens[..a.lens.len() - 1]
                .iter()
                .all(|&l| l as usize >= MIN)
        );
        let avg = data.len() / a.lens.len();
        assert!((AVG / 2..AVG * 2).contains(&avg), "average chunk {avg}");
    }

    #[test]
    fn an_insertion_changes_only_the_chunks_around_it() {
        let base = random(4 << 20, 2);
        let mut new = base.clone();
        new.splice(100..100, random(100, 3));
        let old = map_of(&base, 1 << 20).offsets();
        let m = map_of(&new, 1 << 20);
        let missing: u64 = m
            .lens
            .iter()
            .zip(&m.hashes)
            .filter(|(_, h)| !old.contains_key(*h))
            .map(|(l, _)| *l as u64)
            .sum();
        assert!(
            missing <= 2 * MAX as u64,
            "{missing} bytes not found in the base"
        );
    }

    #[test]
    fn maps_round_trip_and_malformed_ones_are_refused() {
        let m = map_of(&random(300_000, 4), 50_000);
        assert_eq!(ChunkMap::decode(&m.encode()).unwrap(), m);
        let e = m.encode();
        assert!(ChunkMap::decode(&e[..e.len() - 1]).is_err());
        assert!(ChunkMap::decode(&e[..3]).is_err());
        let mut huge = e.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ChunkMap::decode(&huge).is_err());
        let mut zero = e.clone();
        zero[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(ChunkMap::decode(&zero).is_err());
        assert_eq!(ChunkMap::decode(&0u32.to_le_bytes()).unwrap().size(), 0);
    }

    #[test]
    fn the_store_keeps_maps_by_content_and_drops_the_unreferenced() {
        let d = tempfile::tempdir().unwrap();
        let s = MapStore::open(d.path()).unwrap();
        let m = map_of(&random(200_000, 5), 200_000);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        s.save(&a, &m).unwrap();
        s.save(&b, &m).unwrap();
        assert_eq!(s.load(&a), Some(m.clone()));
        assert!(s.load(&[3u8; 32]).is_none());
        assert!(s.load(b"short").is_none());
        // A damaged map is ignored, not trusted.
        let p = d.path().join(DIR).join(hex(&b));
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(s.load(&b).is_none());
        std::fs::write(d.path().join(DIR).join("not-hex"), b"x").unwrap();
        let keep: HashSet<Vec<u8>> = [a.to_vec()].into();
        assert_eq!(s.keep_only(&keep).unwrap(), 2);
        assert!(s.has(&a) && !s.has(&b));
        assert_eq!(s.load(&a), Some(m));
    }
}
