//! rsync-algorithm deltas with `fast_rsync`, made safe for input from the network.
//!
//! fast_rsync panics on a signature with block size 0 and trusts lengths it is given, so every
//! signature from a peer is validated here first ([`check_signature`]), and deltas are applied
//! with an exact output length ([`apply_window`]). Files are diffed in windows: copy offsets are
//! absolute in the base, so each window's delta stands alone and no file is held whole in memory
//! on the sending side.

use fast_rsync::{Signature, SignatureOptions};
use rayon::prelude::*;

/// Bytes of new data diffed (or sent literally) per chunk.
pub const WINDOW: usize = 2 << 20;
/// Largest chunk a receiver accepts (output bytes of one `Chunk`).
pub const MAX_CHUNK: usize = 8 << 20;
pub const MIN_BLOCK: u32 = 256;
pub const MAX_BLOCK: u32 = 1 << 20;
/// Bytes of MD4 kept per block.
pub const HASH_LEN: u32 = 16;
const MD4_MAGIC: u32 = 0x7273_0136;
const HEADER: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("signature refused: {0}")]
    Signature(String),
    #[error("delta refused: {0}")]
    Apply(String),
}

/// Block size for a base of `len` bytes: 4 KiB up to 64 MiB, then about sqrt(len), capped.
pub fn block_size_for(len: u64) -> u32 {
    if len <= 64 << 20 {
        return 4096;
    }
    let s = (len as f64).sqrt() as u64;
    (s.next_power_of_two() as u32).clamp(8192, 128 << 10)
}

/// Checks a requested block size (from a `SigRequest`).
pub fn check_block_size(b: u32) -> Result<(), DeltaError> {
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&b) {
        return Err(DeltaError::Signature(format!(
            "block size {b} outside {MIN_BLOCK}..={MAX_BLOCK}"
        )));
    }
    Ok(())
}

/// Validates a serialized signature received from a peer before fast_rsync sees it: MD4 type,
/// the block size we asked for, a hash length fast_rsync supports, and exactly one entry per
/// block of a base of `base_size` bytes.
pub fn check_signature(
    bytes: Vec<u8>,
    block_size: u32,
    base_size: u64,
) -> Result<Signature, DeltaError> {
    let bad = |m: String| Err(DeltaError::Signature(m));
    if bytes.len() < HEADER {
        return bad(format!("{} bytes is shorter than a header", bytes.len()));
    }
    let word = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != MD4_MAGIC {
        return bad(format!("unsupported signature type {:#x}", word(0)));
    }
    let (b, h) = (word(4), word(8));
    if b == 0 {
        return bad("block size 0".into());
    }
    if b != block_size {
        return bad(format!("block size {b}, asked for {block_size}"));
    }
    if h == 0 || h > 16 {
        return bad(format!("hash length {h} outside 1..=16"));
    }
    let per = 4 + h as usize;
    let body = bytes.len() - HEADER;
    let blocks = base_size.div_ceil(b as u64);
    if !body.is_multiple_of(per) || (body / per) as u64 != blocks {
        return bad(format!(
            "{} entries for a {base_size}-byte base in blocks of {b}",
            body as f64 / per as f64
        ));
    }
    Signature::deserialize(bytes).map_err(|_| DeltaError::Signature("unparseable".into()))
}

/// The signature of `base`, computed in parallel on block-aligned pieces.
pub fn signature(base: &[u8], block_size: u32) -> Vec<u8> {
    let opts = SignatureOptions {
        block_size,
        crypto_hash_size: HASH_LEN,
    };
    let piece = (block_size as usize) * ((16 << 20) / block_size as usize).max(1);
    if base.len() <= piece {
        return Signature::calculate(base, opts).into_serialized();
    }
    let parts: Vec<Vec<u8>> = base
        .par_chunks(piece)
        .map(|c| Signature::calculate(c, opts).into_serialized())
        .collect();
    let mut out =
        Vec::with_capacity(parts.iter().map(|p| p.len() - HEADER).sum::<usize>() + HEADER);
    out.extend_from_slice(&parts[0]);
    for p in &parts[1..] {
        out.extend_from_slice(&p[HEADER..]);
    }
    out
}

/// Applies one window's delta against `base`, producing exactly `len` bytes.
pub fn apply_window(base: &[u8], delta: &[u8], len: usize) -> Result<Vec<u8>, DeltaError> {
    if len > MAX_CHUNK {
        return Err(DeltaError::Apply(format!(
            "chunk of {len} bytes is too large"
        )));
    }
    let mut out = Vec::with_capacity(len);
    fast_rsync::apply_limited(base, delta, &mut out, len)
        .map_err(|e| DeltaError::Apply(e.to_string()))?;
    if out.len() != len {
        return Err(DeltaError::Apply(format!(
            "produced {} bytes, expected {len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn parallel_signature_equals_serial() {
        let base = data((40 << 20) + 12345, 3);
        let par = signature(&base, 4096);
        let ser = Signature::calculate(
            &base,
            SignatureOptions {
                block_size: 4096,
                crypto_hash_size: 16,
            },
        )
        .into_serialized();
        assert_eq!(par, ser);
        check_signature(par, 4096, base.len() as u64).unwrap();
    }

    #[test]
    fn windowed_delta_roundtrip_with_insertion() {
        let base = data(5 << 20, 1);
        let mut new = base.clone();
        new.splice(100..100, b"inserted!".iter().copied().cycle().take(100));
        new[3 << 20] ^= 0xff;
        let sig = check_signature(signature(&base, 4096), 4096, base.len() as u64).unwrap();
        let idx = sig.index();
        let mut rebuilt = Vec::new();
        let mut wire = 0;
        for w in new.chunks(WINDOW) {
            let mut d = Vec::new();
            fast_rsync::diff(&idx, w, &mut d).unwrap();
            wire += d.len();
            rebuilt.extend(apply_window(&base, &d, w.len()).unwrap());
        }
        assert_eq!(rebuilt, new);
        assert!(wire < 64 << 10, "delta of a small change was {wire} bytes");
    }

    #[test]
    fn refuses_hostile_signatures() {
        let base = data(10_000, 2);
        let good = signature(&base, 1024);
        // block size 0: fast_rsync would panic in diff
        let mut zero = good.clone();
        zero[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(check_signature(zero, 1024, 10_000).is_err());
        let mut hash = good.clone();
        hash[8..12].copy_from_slice(&17u32.to_be_bytes());
        assert!(check_signature(hash, 1024, 10_000).is_err());
        assert!(check_signature(good.clone(), 2048, 10_000).is_err());
        assert!(check_signature(good.clone(), 1024, 20_000).is_err());
        assert!(check_signature(good[..good.len() - 1].to_vec(), 1024, 10_000).is_err());
        assert!(check_signature(vec![1, 2, 3], 1024, 10_000).is_err());
        assert!(check_block_size(0).is_err());
        assert!(check_block_size(4096).is_ok());
    }

    #[test]
    fn apply_refuses_wrong_lengths_and_garbage() {
        let base = data(10_000, 4);
        let sig = check_signature(signature(&base, 1024), 1024, 10_000).unwrap();
        let mut d = Vec::new();
        fast_rsync::diff(&sig.index(), &base[..5000], &mut d).unwrap();
        assert!(apply_window(&base, &d, 5000).is_ok());
        assert!(apply_window(&base, &d, 4999).is_err());
        assert!(apply_window(&base, &d, 5001).is_err());
        assert!(apply_window(&base, b"garbage", 10).is_err());
        assert!(apply_window(&base, &d, MAX_CHUNK + 1).is_err());
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size_for(0), 4096);
        assert_eq!(block_size_for(64 << 20), 4096);
        assert_eq!(block_size_for(1 << 30), 32768);
        assert_eq!(block_size_for(1 << 40), 128 << 10);
    }
}
