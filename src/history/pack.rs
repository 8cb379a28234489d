//! The pack format: many chunks in one immutable file, with a footer that lists them.
//!
//! ```text
//! header   "SBYK" | version u16 LE | 0u16
//! chunks   stored bytes, back to back (raw or zstd)
//! footer   zstd(PackFooter)
//! trailer  footer length u64 LE | blake3(footer) | "SBYKFOOT"
//! ```
//! The file is named by the blake3 of all of it, so a pack is verified whole by hashing it and
//! copied anywhere without renaming. The footer is checksummed on its own: `open` reads only
//! footers, and every chunk is verified against its id whenever it is read.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

use crate::disk::crashsafe::fsync_dir;
use crate::disk::fsx;
use crate::history::HistoryError;
use crate::history::chunker;
use crate::history::id::{ChunkId, PackId};
use crate::proto::history::{Coding as CodingProto, PackChunk, PackFooter};
use crate::replication::compress;
use crate::text::hex;

const MAGIC: [u8; 4] = *b"SBYK";
const VERSION: u16 = 1;
const HEADER: u64 = 8;
const END: [u8; 8] = *b"SBYKFOOT";
const TRAILER: u64 = 8 + 32 + 8;
/// A footer larger than this is refused (a corrupt length must not allocate gigabytes).
const MAX_FOOTER: usize = 64 << 20;
/// Write-back of a pack being filled is started every this many bytes.
const WRITEBACK_STEP: u64 = 1 << 20;
/// zstd level for chunks: the fastest, and a chunk is stored compressed only when that pays.
/// Level 3 stored the benchmark's 20k small files in 1.4 % less room, and its pack writes took
/// 1.3–1.7 ms instead of 0.9–1.0 in a record of 20 changed ones (`bench/history.rs`).
const LEVEL: i32 = 1;

/// How a chunk's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Raw,
    Zstd,
}

/// Where one chunk lies in its pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub id: ChunkId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub coding: Coding,
}

/// A pack being written under `tmp/`. Dropped unsealed, its file is removed.
pub struct PackWriter {
    file: BufWriter<File>,
    tmp: PathBuf,
    len: u64,
    /// Bytes whose write-back was started (`fsx::start_writeback`).
    hinted: u64,
    chunks: Vec<Stored>,
    hasher: blake3::Hasher,
    sealed: bool,
}

/// Bytes of each sample [`incompressible`] tries.
const SAMPLE: usize = 4 << 10;

/// Whether samples at the start, middle and end of a chunk of at least two samples all fail
/// to compress by 1/32 (what `compress::if_smaller` asks of the whole). zstd gives up on a
/// sample of noise in a few microseconds; on a whole chunk of it, in tens.
fn incompressible(raw: &[u8]) -> bool {
    if raw.len() < 2 * SAMPLE {
        return false;
    }
    let mid = raw.len() / 2 - SAMPLE / 2;
    [0, mid, raw.len() - SAMPLE]
        .iter()
        .all(|&at| compress::if_smaller(&raw[at..at + SAMPLE], LEVEL).is_none())
}

/// A complete, fsynced pack still under `tmp/`.
pub struct Sealed {
    pub id: PackId,
    pub size: u64,
    pub chunks: Vec<Stored>,
    tmp: PathBuf,
}

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

impl PackWriter {
    pub fn create(tmp_dir: &Path) -> Result<PackWriter, HistoryError> {
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        let tmp = tmp_dir.join(format!("pack-{}-{n}.tmp", std::process::id()));
        let file = File::create_new(&tmp).map_err(HistoryError::io("creating", &tmp))?;
        let mut w = PackWriter {
            // Chunks of 64 KiB or more go to the file straight from the caller; a 1 MiB buffer
            // copied them first (a record's 8.6 MB of pack writes: 11–13 ms, now 7–8).
            file: BufWriter::with_capacity(64 << 10, file),
            tmp,
            len: 0,
            hinted: 0,
            chunks: Vec::new(),
            hasher: blake3::Hasher::new(),
            sealed: false,
        };
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&[0, 0]);
        w.write(&header)?;
        Ok(w)
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Adds a chunk, zstd-compressed when that saves space. A chunk whose three samples do not
    /// compress (random bytes, already compressed data) is stored raw without trying the
    /// whole: the attempt cost about as much as the rest of recording it.
    pub fn add(&mut self, id: ChunkId, raw: &[u8]) -> Result<(), HistoryError> {
        if incompressible(raw) {
            return self.add_stored(id, raw, raw.len(), Coding::Raw);
        }
        match compress::if_smaller(raw, LEVEL) {
            Some(z) => self.add_stored(id, &z, raw.len(), Coding::Zstd),
            None => self.add_stored(id, raw, raw.len(), Coding::Raw),
        }
    }

    /// Adds a chunk's stored bytes as they are (a repack copies verified chunks this way).
    pub fn add_stored(
        &mut self,
        id: ChunkId,
        stored: &[u8],
        raw_len: usize,
        coding: Coding,
    ) -> Result<(), HistoryError> {
        let s = Stored {
            id,
            offset: self.len,
            stored_len: stored.len() as u32,
            raw_len: raw_len as u32,
            coding,
        };
        self.write(stored)?;
        self.chunks.push(s);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), HistoryError> {
        self.file
            .write_all(bytes)
            .map_err(HistoryError::io("writing", &self.tmp))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        // The disk writes what the buffer let go while chunks go on coming, so the seal's
        // fsync waits for little more than the last of them.
        let in_file = self.len - self.file.buffer().len() as u64;
        if in_file - self.hinted >= WRITEBACK_STEP {
            fsx::start_writeback(self.file.get_ref(), self.hinted, in_file - self.hinted);
            self.hinted = in_file;
        }
        Ok(())
    }

    /// Writes the footer and fsyncs the file; it stays under `tmp/` until installed.
    pub fn seal(mut self) -> Result<Sealed, HistoryError> {
        let footer = PackFooter {
            chunks: self.chunks.iter().map(to_proto).collect(),
        };
        let footer = compress::compress(&footer.encode_to_vec(), LEVEL)
            .map_err(HistoryError::io("compressing the footer of", &self.tmp))?;
        let mut trailer = (footer.len() as u64).to_le_bytes().to_vec();
        trailer.extend_from_slice(blake3::hash(&footer).as_bytes());
        trailer.extend_from_slice(&END);
        self.write(&footer)?;
        self.write(&trailer)?;
        // The buffer goes to the file before the fsync, so the fsync covers the footer.
        let durable = self
            .file
            .flush()
            .and_then(|()| self.file.get_ref().sync_all());
        durable.map_err(HistoryError::io("syncing", &self.tmp))?;
        self.sealed = true;
        Ok(Sealed {
            id: PackId(*self.hasher.finalize().as_bytes()),
            size: self.len,
            chunks: std::mem::take(&mut self.chunks),
            tmp: self.tmp.clone(),
        })
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.sealed {
            // Best effort: `tmp/` is cleared on open anyway.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Sealed {
    /// Renames the pack into `packs/` and makes the rename durable.
    pub fn install(&self, packs: &Path) -> Result<(), HistoryError> {
        let to = packs.join(self.id.file_name());
        std::fs::rename(&self.tmp, &to).map_err(HistoryError::io("installing", &to))?;
        fsync_dir(packs).map_err(HistoryError::io("syncing", packs))
    }
}

fn to_proto(s: &Stored) -> PackChunk {
    PackChunk {
        id: s.id.to_vec(),
        offset: s.offset,
        stored_len: s.stored_len,
        raw_len: s.raw_len,
        coding: match s.coding {
            Coding::Raw => CodingProto::Raw,
            Coding::Zstd => CodingProto::Zstd,
        } as i32,
    }
}

/// Reads and checks a pack's footer; returns its chunks and the file's size.
pub fn read_footer(path: &Path) -> Result<(Vec<Stored>, u64), HistoryError> {
    let bad = |reason: String| HistoryError::BadPack {
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(HistoryError::io("opening", path))?;
    let size = file
        .metadata()
        .map_err(HistoryError::io("reading", path))?
        .len();
    if size < HEADER + TRAILER {
        return Err(bad(format!("only {size} bytes long")));
    }
    let mut header = [0u8; HEADER as usize];
    read_at(&file, path, &mut header, 0)?;
    if header[..4] != MAGIC {
        return Err(bad("not a pack (bad magic)".into()));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(bad(format!("unsupported pack format version {version}")));
    }
    let mut trailer = [0u8; TRAILER as usize];
    read_at(&file, path, &mut trailer, size - TRAILER)?;
    if trailer[40..] != END {
        return Err(bad("no footer (truncated or torn)".into()));
    }
    let footer_len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let data_end = (size - TRAILER)
        .checked_sub(footer_len)
        .filter(|e| *e >= HEADER && footer_len as usize <= MAX_FOOTER)
        .ok_or_else(|| bad(format!("footer length {footer_len} out of bounds")))?;
    let mut footer = vec![0u8; footer_len as usize];
    read_at(&file, path, &mut footer, data_end)?;
    if blake3::hash(&footer).as_bytes()[..] != trailer[8..40] {
        return Err(bad("footer checksum mismatch".into()));
    }
    let footer = compress::decompress(&footer, MAX_FOOTER)
        .map_err(|e| bad(format!("footer does not decompress: {e}")))?;
    let footer =
        PackFooter::decode(&footer[..]).map_err(|e| bad(format!("footer does not decode: {e}")))?;
    let chunks = footer
        .chunks
        .iter()
        .map(|c| from_proto(c, data_end))
        .collect::<Result<Vec<_>, String>>()
        .map_err(bad)?;
    Ok((chunks, size))
}

fn from_proto(c: &PackChunk, data_end: u64) -> Result<Stored, String> {
    let id: ChunkId = c.id[..]
        .try_into()
        .map_err(|_| format!("a chunk id of {} bytes", c.id.len()))?;
    let coding = match CodingProto::try_from(c.coding) {
        Ok(CodingProto::Raw) => Coding::Raw,
        Ok(CodingProto::Zstd) => Coding::Zstd,
        _ => {
            return Err(format!(
                "chunk {} has unknown coding {}",
                hex(&id),
                c.coding
            ));
        }
    };
    let in_bounds = c.offset >= HEADER
        && c.offset.saturating_add(c.stored_len as u64) <= data_end
        && c.raw_len as usize <= chunker::READ_MAX
        && (coding == Coding::Zstd || c.stored_len == c.raw_len);
    if !in_bounds {
        return Err(format!("chunk {} lies out of bounds", hex(&id)));
    }
    Ok(Stored {
        id,
        offset: c.offset,
        stored_len: c.stored_len,
        raw_len: c.raw_len,
        coding,
    })
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<(), HistoryError> {
    file.read_exact_at(buf, at)
        .map_err(HistoryError::io("reading", path))
}

/// A chunk's stored bytes, as they lie in the pack (checked by [`decode`]).
pub fn read_stored(file: &File, path: &Path, s: &Stored) -> Result<Vec<u8>, HistoryError> {
    let mut buf = vec![0u8; s.stored_len as usize];
    read_at(file, path, &mut buf, s.offset)?;
    Ok(buf)
}

/// A chunk's raw bytes from its stored bytes, verified against its id.
pub fn decode(stored: Vec<u8>, path: &Path, s: &Stored) -> Result<Vec<u8>, HistoryError> {
    let bad = |reason: String| HistoryError::BadChunk {
        chunk: hex(&s.id),
        pack: path.to_owned(),
        reason,
    };
    let raw = match s.coding {
        Coding::Raw => stored,
        Coding::Zstd => compress::decompress(&stored, s.raw_len as usize)
            .map_err(|e| bad(format!("does not decompress: {e}")))?,
    };
    if raw.len() != s.raw_len as usize {
        return Err(bad(format!("{} bytes, expected {}", raw.len(), s.raw_len)));
    }
    if blake3::hash(&raw).as_bytes() != &s.id {
        return Err(bad("content does not match the chunk's blake3".into()));
    }
    Ok(raw)
}

/// A chunk's raw bytes, verified.
pub fn read_chunk(file: &File, path: &Path, s: &Stored) -> Result<Vec<u8>, HistoryError> {
    decode(read_stored(file, path, s)?, path, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(dir: &Path, chunks: &[&[u8]]) -> (PathBuf, Vec<Stored>) {
        let tmp = dir.join("tmp");
        let packs = dir.join("packs");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::create_dir_all(&packs).unwrap();
        let mut w = PackWriter::create(&tmp).unwrap();
        for c in chunks {
            w.add(*blake3::hash(c).as_bytes(), c).unwrap();
        }
        let sealed = w.seal().unwrap();
        sealed.install(&packs).unwrap();
        let path = packs.join(sealed.id.file_name());
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(
            blake3::hash(&whole).as_bytes(),
            &sealed.id.0,
            "named by its hash"
        );
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
        (path, sealed.chunks)
    }

    #[test]
    fn large_chunks_are_sampled_before_compressing() {
        let mut random = vec![0u8; 1 << 20];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut random);
        assert!(incompressible(&random));
        let text = b"all work and no play ".repeat(50_000);
        assert!(!incompressible(&text));
        // Compressible in one sample only: compressed whole, as before.
        let mut mixed = random.clone();
        mixed[..SAMPLE].fill(0);
        assert!(!incompressible(&mixed));
        assert!(
            !incompressible(&random[..SAMPLE * 2 - 1]),
            "small chunks are not sampled"
        );
        assert!(incompressible(&random[..SAMPLE * 2]));
        assert!(compress::if_smaller(&random[..SAMPLE * 2], LEVEL).is_none());
        // Bytes drawn from 160 values (7.3 bits a byte): an entropy coder saves 1/32 of them.
        let narrow: Vec<u8> = random.iter().map(|b| b % 160).collect();
        assert!(!incompressible(&narrow));
    }

    #[test]
    fn round_trip_raw_and_compressed() {
        let d = tempfile::tempdir().unwrap();
        let text = b"all work and no play ".repeat(5000);
        let noise: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (path, written) = pack(d.path(), &[&text, &noise, b"tiny"]);
        let (chunks, size) = read_footer(&path).unwrap();
        assert_eq!(chunks, written);
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert_eq!(chunks[0].coding, Coding::Zstd);
        assert_eq!(chunks[2].coding, Coding::Raw);
        let f = File::open(&path).unwrap();
        assert_eq!(read_chunk(&f, &path, &chunks[0]).unwrap(), text);
        assert_eq!(read_chunk(&f, &path, &chunks[1]).unwrap(), noise);
        assert_eq!(read_chunk(&f, &path, &chunks[2]).unwrap(), b"tiny");
    }

    #[test]
    fn damaged_packs_are_refused_clearly() {
        let d = tempfile::tempdir().unwrap();
        let (path, chunks) = pack(d.path(), &[b"first chunk", b"second chunk"]);
        let good = std::fs::read(&path).unwrap();
        let f = File::open(&path).unwrap();

        // A flipped byte in a chunk: that chunk is refused, naming it; the other still reads.
        let mut bytes = good.clone();
        bytes[chunks[1].offset as usize] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_chunk(&f, &path, &chunks[1]).unwrap_err().to_string();
        assert!(
            e.contains(&hex(&chunks[1].id)) && e.contains("does not match"),
            "{e}"
        );
        assert_eq!(read_chunk(&f, &path, &chunks[0]).unwrap(), b"first chunk");

        // A flipped byte in the footer, a torn tail, a foreign file.
        let footer_byte = good.len() - TRAILER as usize - 1;
        for (damage, expect) in [
            (
                Box::new(|b: &mut Vec<u8>| b[footer_byte] ^= 1) as Box<dyn Fn(&mut Vec<u8>)>,
                "footer checksum",
            ),
            (
                Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 3)),
                "no footer",
            ),
            (Box::new(|b: &mut Vec<u8>| b[0] = b'X'), "bad magic"),
            (Box::new(|b: &mut Vec<u8>| b.truncate(20)), "bytes long"),
        ] {
            let mut bytes = good.clone();
            damage(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let e = read_footer(&path).unwrap_err().to_string();
            assert!(
                e.contains(expect) && e.contains(&path.display().to_string()),
                "{e}"
            );
        }
        std::fs::write(&path, &good).unwrap();
        assert_eq!(
            read_footer(&path).unwrap().0,
            chunks,
            "the good pack still reads"
        );
    }
}
