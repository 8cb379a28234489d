//! Content-defined chunking (FastCDC 2020, `fastcdc::v2020::cut` on an in-memory window) of a
//! stream, with the blake3 of every chunk and of the whole stream computed in the same pass.
//!
//! Boundaries depend on the content around them, not on offsets, so an insertion in a large file
//! changes the chunks next to it and no others: the rest deduplicates. Sizes follow restic's
//! spirit; a file smaller than [`MIN`] is one chunk.

use std::io::{self, Read};

use fastcdc::v2020::{Normalization, cut, select_masks};

use crate::history::id::ChunkId;

/// Smallest chunk (except a stream's last).
pub const MIN: usize = 256 * 1024;
/// Target average chunk size.
pub const AVG: usize = 1024 * 1024;
/// Largest chunk: also the most a chunk may claim to be when read back.
pub const MAX: usize = 4 * 1024 * 1024;

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
        let (mask_s, mask_l) = self.masks;
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
            let (_, len) = cut(
                window,
                MIN,
                AVG,
                MAX,
                mask_s,
                mask_l,
                mask_s << 1,
                mask_l << 1,
            );
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
    use rand::{Rng, SeedableRng};

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
}
