//! Backup objects from a bucket (src/trust/seal.rs, src/backup/layout.rs): anything a bucket can
//! return goes through `BackupKey::open` (fed in arbitrary pieces) and the entry head parser.
//!
//! - Neither ever panics; every refusal is a typed error.
//! - A genuine object altered anywhere (a byte flipped, cut short, extended) never opens to
//!   other bytes: it opens to the original or is refused.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use standby::backup::layout::Head;
use standby::trust::seal::{BackupKey, HEADER_LEN};

const NAME: &str = "packs/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[derive(Arbitrary, Debug)]
enum Input {
    /// Raw bytes as an object, fed in pieces of the given sizes.
    Raw { bytes: Vec<u8>, pieces: Vec<u16> },
    /// A genuine object of `plain`, then altered.
    Altered {
        plain: Vec<u8>,
        flip: Option<(u32, u8)>,
        cut: Option<u32>,
        extend: Vec<u8>,
    },
}

fn open_in_pieces(key: &BackupKey, bytes: &[u8], pieces: &[u16]) -> Option<Vec<u8>> {
    let mut o = key.opener(NAME, bytes).ok()?;
    let mut out = Vec::new();
    let mut rest = &bytes[HEADER_LEN..];
    for p in pieces {
        let n = (*p as usize).min(rest.len());
        o.feed(&rest[..n], &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .ok()?;
        rest = &rest[n..];
    }
    o.feed(rest, &mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })
    .ok()?;
    o.finish(&mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })
    .ok()?;
    Some(out)
}

fuzz_target!(|input: Input| {
    let key = BackupKey::from_bytes([7; 32]);
    match input {
        Input::Raw { bytes, pieces } => {
            let _ = Head::decode(&bytes);
            let _ = key.open(NAME, &bytes);
            let _ = open_in_pieces(&key, &bytes, &pieces);
        }
        Input::Altered {
            plain,
            flip,
            cut,
            extend,
        } => {
            let sealed = key.seal(NAME, &plain);
            let mut bad = sealed.clone();
            if let Some((at, bits)) = flip {
                let at = at as usize % bad.len();
                bad[at] ^= bits.max(1);
            }
            if let Some(c) = cut {
                bad.truncate(c as usize % (bad.len() + 1));
            }
            bad.extend_from_slice(&extend);
            match key.open(NAME, &bad) {
                Ok(p) => assert_eq!(p, plain, "an altered object opened to other bytes"),
                Err(_) => assert_ne!(bad, sealed, "a genuine object was refused"),
            }
        }
    }
});
