//! Content-defined chunking (FastCDC 2020, `fastcdc::v2020::cut` on an in-memory window) of a
//! stream, with the blake3 of every chunk and of the whole stream computed in the same pass.
//!
//! Boundaries depend on the content around them, not on offsets, so an insertion in a large file
//! changes the chunks next to it and no others: the rest deduplicates. Sizes follow restic's
//! spirit; a file smaller than [`MIN`] is one chunk.

use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use fastcdc::v2020::{Normalization, cut, select_masks};

use crate::history::id::ChunkId;

/// Smallest chunk (except a stream's last).
pub const MIN: usize = 16 * 1024;
/// Target average chunk size: small enough that a scattered 64 KiB edit of a big file stores
/// about 210 KiB (ARCHITECTURE.md, "History").
pub const AVG: usize = 64 * 1024;
/// Largest chunk this chunker cuts.
pub const MAX: usize = 256 * 1024;
/// The most a stored chunk may claim to be when read back: stores written before the chunks
/// were made smaller (1 MiB average) hold chunks of up to 4 MiB.
pub const READ_MAX: usize = 4 * 1024 * 1024;

/// One chunk of a stream.
pub struct Chunk<'a> {
    pub id: ChunkId,
    pub data: &'a [u8],
}

/// What a whole stream came to.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    pub blake3: [u8; 32],
    pub len: u64,
}

/// A chunker with its window, reused from stream to stream (many small files cost no
/// allocation each). The window is two maximal chunks long, so the unread rest is moved to its
/// start about once per [`MAX`] bytes, not after every chunk.
pub struct Chunker {
    buf: Vec<u8>,
    masks: (u64, u64),
}

impl Default for Chunker {
    fn default() -> Chunker {
        Chunker {
            buf: Vec::new(),
            // Level 1, as `fastcdc::v2020::StreamCDC` chooses: boundaries are the same as its.
            masks: select_masks(AVG, Normalization::Level1),
        }
    }
}

/// Where FastCDC cuts the first chunk of `window` (its length), with the chunker's masks.
fn cut_len(window: &[u8], (mask_s, mask_l): (u64, u64)) -> usize {
    cut(
        window,
        MIN,
        AVG,
        MAX,
        mask_s,
        mask_l,
        mask_s << 1,
        mask_l << 1,
    )
    .1
}

impl Chunker {
    /// Reads `r` to its end in chunks, handing each to `each` in order; returns the whole
    /// stream's blake3 and length. At most `2 * MAX` bytes of the stream are held at once.
    pub fn chunks<E: From<io::Error>>(
        &mut self,
        mut r: impl Read,
        mut each: impl FnMut(Chunk<'_>) -> Result<(), E>,
    ) -> Result<Whole, E> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; 2 * MAX];
        }
        let mut hasher = blake3::Hasher::new();
        let (mut start, mut end, mut total, mut eof) = (0usize, 0usize, 0u64, false);
        loop {
            if self.buf.len() - start < MAX {
                self.buf.copy_within(start..end, 0);
                (start, end) = (0, end - start);
            }
            while !eof && end - start < MAX {
                let n = read_some(&mut r, &mut self.buf[end..start + MAX])?;
                hasher.update(&self.buf[end..end + n]);
                (end, total, eof) = (end + n, total + n as u64, n == 0);
            }
            if start == end {
                break;
            }
            let window = &self.buf[start..end];
            let len = cut_len(window, self.masks);
            let data = &window[..len];
            each(Chunk {
                id: *blake3::hash(data).as_bytes(),
                data,
            })?;
            start += len;
        }
        Ok(Whole {
            blake3: *hasher.finalize().as_bytes(),
            len: total,
        })
    }
}

/// What [`Chunker::rechunk`] made of a file.
#[derive(Debug, PartialEq, Eq)]
pub struct Rechunked {
    /// The file's chunks in order, old and new.
    pub ids: Vec<ChunkId>,
    /// Bytes read from the file.
    pub read: u64,
}

/// The first window a re-chunk reads at a boundary: at least [`AVG`] (so `cut` normalises as
/// it does on a full window) and most chunks end inside it; a chunk that does not is cut again
/// on a full [`MAX`] window.
const STEP: usize = AVG + AVG / 2;

impl Chunker {
    /// Chunks a file that differs from the content chunked as `old` (ids and lengths, in order)
    /// only inside `ranges` (half-open byte ranges, any order) and past the shorter of the two
    /// lengths, reading only around the ranges: the result is the chunk list
    /// [`Chunker::chunks`] would give for the whole file. New chunks are handed to `each`.
    ///
    /// Why this holds (ARCHITECTURE.md, "History"): `cut` at a boundary `a` looks at the bytes
    /// from `a` up to and including the byte at its cut `b`, and at how much of the stream is
    /// left, capped at [`MAX`]. So an old chunk `[a, b)` is cut the same in the new file when `a`
    /// is a boundary there, no range touches `[a, b]`, and the rest from `a` is the same or at
    /// least [`MAX`] in both. From the file's start, old chunks that qualify are taken as they
    /// are; elsewhere new chunks are cut from the file until one ends on an old boundary whose
    /// chunk qualifies, and the two chunkings run together again from there.
    pub fn rechunk<E: From<io::Error>>(
        &mut self,
        file: &impl FileExt,
        len: u64,
        old: &[(ChunkId, u64)],
        ranges: &[(u64, u64)],
        mut each: impl FnMut(Chunk<'_>) -> Result<(), E>,
    ) -> Result<Rechunked, E> {
        let old_len: u64 = old.iter().map(|c| c.1).sum();
        let mut dirty = ranges.to_vec();
        if old_len != len {
            dirty.push((old_len.min(len), old_len.max(len)));
        }
        let dirty = crate::replication::receive::edits::merged(dirty);
        let same_tail = |a: u64| old_len == len || a + MAX as u64 <= old_len.min(len);
        let clean = |a: u64, b: u64| {
            let i = dirty.partition_point(|r| r.1 <= a);
            let upto = if b == len { b } else { b + 1 };
            dirty.get(i).is_none_or(|r| r.0 >= upto) && same_tail(a) && b <= len
        };
        if self.buf.len() < 2 * MAX {
            self.buf = vec![0u8; 2 * MAX];
        }
        let mut w = Window::default();
        let mut out = Rechunked {
            ids: Vec::with_capacity(old.len()),
            read: 0,
        };
        let (mut pos, mut k, mut start) = (0u64, 0usize, 0u64);
        while pos < len {
            while k < old.len() && start < pos {
                (start, k) = (start + old[k].1, k + 1);
            }
            if k < old.len() && start == pos && clean(pos, pos + old[k].1) {
                out.ids.push(old[k].0);
                pos += old[k].1;
                continue;
            }
            let n = self.next_at(file, &mut w, pos, len, &mut out.read)?;
            let data = &self.buf[..n];
            let id = *blake3::hash(data).as_bytes();
            each(Chunk { id, data })?;
            out.ids.push(id);
            pos += n as u64;
        }
        Ok(out)
    }

    /// Cuts the chunk starting at `pos` (a boundary) of a `len`-byte file: it is left at the
    /// start of the buffer and its length returned.
    fn next_at(
        &mut self,
        file: &impl FileExt,
        w: &mut Window,
        pos: u64,
        len: u64,
        read: &mut u64,
    ) -> io::Result<usize> {
        // Keep what the last window read past `pos`.
        if pos >= w.at && pos < w.at + w.len as u64 {
            let skip = (pos - w.at) as usize;
            self.buf.copy_within(skip..w.len, 0);
            w.len -= skip;
        } else {
            w.len = 0;
        }
        w.at = pos;
        let rest = usize::try_from(len - pos).unwrap_or(usize::MAX);
        let full = rest.min(MAX);
        let mut want = rest.min(STEP).max(w.len.min(full));
        loop {
            while w.len < want {
                let n = file.read_at(&mut self.buf[w.len..want], pos + w.len as u64)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                (w.len, *read) = (w.len + n, *read + n as u64);
            }
            let window = &self.buf[..want];
            let n = cut_len(window, self.masks);
            // A cut inside the window is the cut the whole stream gives; at its end, look
            // further unless the window is all there is to look at.
            if n < want || want == full {
                return Ok(n);
            }
            want = full;
        }
    }
}

/// The file bytes at the start of a re-chunk's buffer: `len` bytes from offset `at`.
#[derive(Default)]
struct Window {
    at: u64,
    len: usize,
}

/// One `read`, retried when interrupted.
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngExt, SeedableRng};

    fn ids(data: &[u8]) -> (Vec<ChunkId>, Vec<usize>) {
        let (mut ids, mut lens) = (Vec::new(), Vec::new());
        let whole = Chunker::default()
            .chunks::<io::Error>(data, |c| {
                ids.push(c.id);
                lens.push(c.data.len());
                Ok(())
            })
            .unwrap();
        assert_eq!(whole.blake3, *blake3::hash(data).as_bytes());
        assert_eq!(whole.len, data.len() as u64);
        (ids, lens)
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    #[test]
    fn sizes_stay_in_bounds_and_small_streams_are_one_chunk() {
        let data = random(24 << 20, 1);
        let (chunk_ids, lens) = ids(&data);
        assert!(chunk_ids.len() >= 8, "{} chunks", chunk_ids.len());
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        for l in &lens[..lens.len() - 1] {
            assert!((MIN..=MAX).contains(l), "chunk of {l} bytes");
        }
        assert_eq!(ids(&data[..MIN - 1]).0.len(), 1);
        assert_eq!(ids(b"").0.len(), 0);
    }

    #[test]
    fn same_boundaries_as_fastcdc_stream_cdc_and_reads_of_any_size() {
        let data = random(12 << 20, 4);
        let theirs: Vec<usize> = fastcdc::v2020::StreamCDC::new(&data[..], MIN, AVG, MAX)
            .map(|c| c.unwrap().length)
            .collect();
        assert_eq!(ids(&data).1, theirs);
        // A reader that hands out a few bytes at a time cuts the same chunks.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(77_777);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut lens = Vec::new();
        let mut chunker = Chunker::default();
        for _ in 0..2 {
            lens.clear();
            chunker
                .chunks::<io::Error>(Trickle(&data), |c| {
                    lens.push(c.data.len());
                    Ok(())
                })
                .unwrap();
            assert_eq!(lens, theirs, "the chunker is reusable");
        }
    }

    #[test]
    fn boundaries_survive_an_insertion() {
        let data = random(16 << 20, 2);
        let mut edited = data.clone();
        let at = 5 << 20;
        edited.splice(at..at, random(1000, 3));
        let (before, _) = ids(&data);
        let (after, _) = ids(&edited);
        let shared = after.iter().filter(|c| before.contains(c)).count();
        // Only the chunks around the insertion differ; everything after it realigns.
        assert!(
            after.len() - shared <= 2 && before.len() - shared <= 2,
            "{shared} shared of {} before, {} after",
            before.len(),
            after.len()
        );
        assert_eq!(before.last(), after.last());
    }

    /// Re-chunks `new` from `old`'s chunks and `ranges`; checks it against chunking `new`
    /// whole, and that every new chunk was handed over. Returns the bytes read.
    fn rechunked(old: &[u8], new: &[u8], ranges: &[(u64, u64)]) -> u64 {
        let (old_ids, old_lens) = ids(old);
        let old: Vec<(ChunkId, u64)> = old_ids
            .iter()
            .zip(&old_lens)
            .map(|(i, l)| (*i, *l as u64))
            .collect();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, new).unwrap();
        let mut handed = Vec::new();
        let r = Chunker::default()
            .rechunk::<io::Error>(&f, new.len() as u64, &old, ranges, |c| {
                assert_eq!(c.id, *blake3::hash(c.data).as_bytes());
                handed.push(c.id);
                Ok(())
            })
            .unwrap();
        let (want, _) = ids(new);
        assert_eq!(r.ids, want, "the same chunks as chunking the whole file");
        for id in &want {
            assert!(
                old_ids.contains(id) || handed.contains(id),
                "a new chunk not handed over"
            );
        }
        r.read
    }

    #[test]
    fn rechunk_around_ranges_gives_the_whole_file_chunks_reading_little() {
        let data = random(32 << 20, 5);
        assert_eq!(
            rechunked(&data, &data, &[]),
            0,
            "nothing changed: nothing read"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let mut new = data.clone();
        let mut ranges = Vec::new();
        for i in 0..8u64 {
            let at = rng.random_range(0..new.len() - 65536);
            new[at..at + 65536].copy_from_slice(&random(65536, 100 + i));
            ranges.push((at as u64, at as u64 + 65536));
        }
        let read = rechunked(&data, &new, &ranges);
        assert!(
            read < (new.len() / 2) as u64,
            "read {read} of {}",
            new.len()
        );
        // A single byte changed on a boundary, and the first and last bytes.
        let (_, lens) = ids(&data);
        let b = lens[0] + lens[1];
        let mut edge = data.clone();
        for at in [0, b, data.len() - 1] {
            edge[at] ^= 0xff;
        }
        let r = [
            (0, 1),
            (b as u64, b as u64 + 1),
            (data.len() as u64 - 1, data.len() as u64),
        ];
        rechunked(&data, &edge, &r);
    }

    #[test]
    fn rechunk_of_a_base_cut_with_larger_chunks_keeps_the_content() {
        // A store written with 1 MiB average chunks: the base's chunks are not this chunker's.
        let data = random(6 << 20, 9);
        let old: Vec<(ChunkId, u64)> = data
            .chunks(1 << 20)
            .map(|c| (*blake3::hash(c).as_bytes(), c.len() as u64))
            .collect();
        let mut new = data.clone();
        let at = (2 << 20) + 777;
        new[at..at + 65536].copy_from_slice(&random(65536, 10));
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &new).unwrap();
        let mut bytes: std::collections::HashMap<ChunkId, Vec<u8>> = data
            .chunks(1 << 20)
            .map(|c| (*blake3::hash(c).as_bytes(), c.to_vec()))
            .collect();
        let ranges = [(at as u64, at as u64 + 65536)];
        let r = Chunker::default()
            .rechunk::<io::Error>(&f, new.len() as u64, &old, &ranges, |c| {
                bytes.insert(c.id, c.data.to_vec());
                Ok(())
            })
            .unwrap();
        let rebuilt: Vec<u8> = r.ids.iter().flat_map(|id| bytes[id].clone()).collect();
        assert!(rebuilt == new, "the chunks hold exactly the new content");
        assert!(
            r.ids.contains(&old[0].0),
            "the untouched first chunk is kept"
        );
    }

    #[test]
    fn rechunk_follows_a_file_cut_or_extended() {
        let data = random(20 << 20, 7);
        let cut_short = &data[..(13 << 20) + 12345];
        rechunked(&data, cut_short, &[]);
        let mut longer = data.clone();
        longer.extend_from_slice(&random(3 << 20, 8));
        rechunked(&data, &longer, &[]);
        rechunked(&data, &data[..100], &[]);
        rechunked(&data[..100], &data, &[]);
        rechunked(&data, b"", &[]);
    }
}
