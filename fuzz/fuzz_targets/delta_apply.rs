//! rsync deltas from the network: `check_signature` and `apply_window` (src/delta.rs).
//!
//! Three modes, picked by the first byte:
//! - a hostile signature: `check_signature` returns Ok or Err, and once it has said Ok,
//!   fast_rsync's `index`/`diff` on it must not panic (the check is what protects them);
//! - a hostile delta: `apply_window` returns Ok with exactly the requested length, or Err;
//!   a length over `MAX_CHUNK` is always refused (libFuzzer's `-malloc_limit_mb` catches any
//!   allocation a claimed length could cause);
//! - a round trip: `signature(base)` passes `check_signature`, and a mutated target diffed in
//!   arbitrary windows and applied window by window with `apply_window` is rebuilt exactly.
#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use standby::replication::delta::{
    HASH_LEN, MAX_CHUNK, MIN_BLOCK, apply_window, check_signature, signature,
};

const MD4_MAGIC: u32 = 0x7273_0136;
const SMALL_BLOCKS: [u32; 5] = [256, 512, 1024, 2048, 4096];

fn hostile_signature(u: &mut Unstructured) -> Result<()> {
    let block_size: u32 = if u.arbitrary()? {
        u.arbitrary()?
    } else {
        *u.choose(&SMALL_BLOCKS)?
    };
    let base_size = u64::from(u.arbitrary::<u16>()?);
    let mut sig = Vec::new();
    if u.arbitrary()? {
        // A plausible header, so the body checks are reached often.
        let hash: u32 = u.int_in_range(0..=20)?;
        sig.extend_from_slice(&MD4_MAGIC.to_be_bytes());
        sig.extend_from_slice(&block_size.to_be_bytes());
        sig.extend_from_slice(&hash.to_be_bytes());
        if u.arbitrary()? {
            // The right number of entries, arbitrary contents.
            let per = 4 + hash as usize;
            let blocks = base_size.div_ceil(u64::from(block_size.max(1))) as usize;
            let n = per * blocks;
            if n <= 1 << 20 {
                let body = u.bytes(n.min(u.len()))?.to_vec();
                sig.extend_from_slice(&body);
                sig.resize(12 + n, 0);
            }
        }
    }
    let rest: Vec<u8> = u.arbitrary()?;
    sig.extend_from_slice(&rest);
    let target: Vec<u8> = u.arbitrary()?;
    if let Ok(s) = check_signature(sig, block_size, base_size) {
        let idx = s.index();
        let mut out = Vec::new();
        let _ = fast_rsync::diff(&idx, &target, &mut out);
    }
    Ok(())
}

fn hostile_delta(u: &mut Unstructured) -> Result<()> {
    let len: usize = if u.arbitrary()? {
        u.arbitrary::<u32>()? as usize
    } else {
        u.arbitrary::<u16>()? as usize
    };
    let base: Vec<u8> = u.arbitrary()?;
    let mut delta = Vec::new();
    if u.arbitrary()? {
        delta.extend_from_slice(&0x7273_0236u32.to_be_bytes()); // delta magic
    }
    delta.extend_from_slice(u.bytes(u.len())?);
    if let Ok(out) = apply_window(&base, &delta, len) {
        assert_eq!(out.len(), len, "apply_window returned the wrong length");
        assert!(len <= MAX_CHUNK, "a chunk over MAX_CHUNK was accepted");
    }
    Ok(())
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Flip { at: u16, xor: u8 },
    Insert { at: u16, bytes: Vec<u8> },
    Delete { at: u16, len: u16 },
    Copy { from: u16, to: u16, len: u16 },
}

fn round_trip(u: &mut Unstructured) -> Result<()> {
    let block_size = if u.arbitrary()? {
        u.int_in_range(MIN_BLOCK..=8192)?
    } else {
        *u.choose(&SMALL_BLOCKS)?
    };
    let base_len = u.arbitrary::<u16>()? as usize;
    // Cheap, block-repetitive content with arbitrary seeds, so matches happen.
    let seed: Vec<u8> = u.arbitrary()?;
    let base: Vec<u8> = if seed.is_empty() {
        vec![0; base_len]
    } else {
        (0..base_len)
            .map(|i| seed[i % seed.len()].wrapping_add((i / 997) as u8))
            .collect()
    };
    let edits: Vec<Edit> = u.arbitrary()?;
    let mut target = base.clone();
    for e in edits.into_iter().take(16) {
        let n = target.len();
        match e {
            Edit::Flip { at, xor } if n > 0 => target[at as usize % n] ^= xor | 1,
            Edit::Insert { at, bytes } => {
                let at = at as usize % (n + 1);
                target.splice(at..at, bytes);
            }
            Edit::Delete { at, len } if n > 0 => {
                let at = at as usize % n;
                let end = (at + len as usize).min(n);
                target.drain(at..end);
            }
            Edit::Copy { from, to, len } if n > 0 => {
                let from = from as usize % n;
                let end = (from + len as usize).min(n);
                let piece = target[from..end].to_vec();
                let to = to as usize % (n + 1);
                target.splice(to..to, piece);
            }
            _ => {}
        }
    }
    // Windows stand in for `WINDOW` (2 MiB); at most 64 of them keeps each run fast.
    let min_window = target.len().div_ceil(64).max(1);
    let window = u.int_in_range(min_window..=target.len().max(min_window))?;

    let sig = signature(&base, block_size);
    let sig = check_signature(sig, block_size, base.len() as u64)
        .expect("our own signature must pass check_signature");
    assert_eq!(HASH_LEN, 16);
    let idx = sig.index();
    let mut rebuilt = Vec::with_capacity(target.len());
    for w in target.chunks(window) {
        let mut d = Vec::new();
        fast_rsync::diff(&idx, w, &mut d).expect("diff");
        let out = apply_window(&base, &d, w.len()).expect("our own delta must apply");
        assert_eq!(out, w);
        rebuilt.extend_from_slice(&out);
        // One byte more or less than the window is always refused.
        assert!(apply_window(&base, &d, w.len() + 1).is_err());
        if !w.is_empty() {
            assert!(apply_window(&base, &d, w.len() - 1).is_err());
        }
    }
    assert_eq!(rebuilt, target);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let _ = match mode % 3 {
        0 => hostile_signature(&mut u),
        1 => hostile_delta(&mut u),
        _ => round_trip(&mut u),
    };
});
