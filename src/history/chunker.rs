//! Content-defined chunking (FastCDC 2020) of a stream, with the blake3 of every chunk and of
//! the whole stream computed in the same pass.
//!
//! Boundaries depend on the content around them, not on offsets, so an insertion in a large file
//! changes the chunks next to it and no others: the rest deduplicates. Sizes follow restic's
//! spirit; a file smaller than [`MIN`] is one chunk.

use std::io::{self, Read};

use fastcdc::v2020::StreamCDC;

use crate::history::id::ChunkId;

/// Smallest chunk (except a stream's last).
pub const MIN: usize = 256 * 1024;
/// Target average chunk size.
pub const AVG: usize = 1024 * 1024;
/// Largest chunk: also the most a chunk may claim to be when read back.
pub const MAX: usize = 4 * 1024 * 1024;

/// One chunk of a stream.
pub struct Chunk {
    pub id: ChunkId,
    pub data: Vec<u8>,
}

/// What a whole stream came to.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    pub blake3: [u8; 32],
    pub len: u64,
}

/// Hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    len: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Reads `r` to its end in chunks, handing each to `each` in order; returns the whole stream's
/// blake3 and length. At most [`MAX`] bytes of the stream are held at once (plus one chunk).
pub fn chunk_stream<E: From<io::Error>>(
    r: impl Read,
    mut each: impl FnMut(Chunk) -> Result<(), E>,
) -> Result<Whole, E> {
    let mut reader = Hashing {
        inner: r,
        hasher: blake3::Hasher::new(),
        len: 0,
    };
    for c in StreamCDC::new(&mut reader, MIN, AVG, MAX) {
        let data = c.map_err(io::Error::from)?.data;
        let id = *blake3::hash(&data).as_bytes();
        each(Chunk { id, data })?;
    }
    Ok(Whole {
        blake3: *reader.hasher.finalize().as_bytes(),
        len: reader.len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn ids(data: &[u8]) -> (Vec<ChunkId>, Vec<usize>) {
        let (mut ids, mut lens) = (Vec::new(), Vec::new());
        let whole = chunk_stream::<io::Error>(data, |c| {
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
