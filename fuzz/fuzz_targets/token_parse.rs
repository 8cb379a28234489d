//! Join tokens (src/token.rs): arbitrary text through `Token::parse` and `Token::verify`, and
//! forgeries of a genuine token.
//!
//! - `parse` and `verify` never panic; a parsed token re-signed verifies and parses back equal.
//! - A genuine token altered by one byte (replaced, inserted or removed; with its MAC kept, or
//!   re-signed with another key) never verifies as a different token; a replaced byte never
//!   verifies at all.
#![no_main]

use libfuzzer_sys::fuzz_target;
use standby::trust::identity::Role;
use standby::trust::token::{Token, TokenError};

const KEY: [u8; 32] = [0x5a; 32];
const OTHER_KEY: [u8; 32] = [0xa5; 32];
const FP: &str = "522d0010f223ec882803c4b498ec173cc6d7989c5a252e7ee97ca6b239f34199";

fn roles() -> [Role; 2] {
    [Role::Gpu, Role::Cpu]
}

fn arbitrary_text(s: &str) {
    let parsed = Token::parse(s);
    for role in roles() {
        for fp in [FP, ""] {
            if let Ok(t) = Token::verify(s, &KEY, fp, role, 0) {
                // Only reachable with a correct MAC: must agree with `parse`.
                assert_eq!(parsed.as_ref().map(|(p, _)| p), Ok(&t));
            }
        }
    }
    if let Ok((t, mac)) = parsed {
        assert_eq!(mac.len(), 32);
        let signed = t.sign(&KEY);
        assert_eq!(Token::parse(&signed).map(|(p, _)| p), Ok(t.clone()));
        let now = t.expires_unix.saturating_sub(1);
        let v = Token::verify(&signed, &KEY, &t.ca_fingerprint, t.role, now);
        if t.expires_unix == 0 {
            assert_eq!(v, Err(TokenError::Expired));
        } else {
            assert_eq!(v, Ok(t.clone()));
        }
        assert_eq!(
            Token::verify(&signed, &OTHER_KEY, &t.ca_fingerprint, t.role, now),
            Err(TokenError::BadMac)
        );
    }
}

fn forgery(data: &[u8]) {
    let [op, at, byte, role, e0, e1, e2, e3, rest @ ..] = data else {
        return;
    };
    let pair: String = std::iter::once('p')
        .chain(
            rest.iter()
                .map(|b| b"abcdefghijklmnopqrstuvwxyz0123456789-_."[*b as usize % 39] as char)
                .take(40),
        )
        .collect();
    let role = roles()[*role as usize % 2];
    let exp = u64::from(u32::from_le_bytes([*e0, *e1, *e2, *e3])).max(1) + 1_000;
    let t = Token::new(&pair, role, exp, FP);
    let genuine = t.sign(&KEY);
    assert_eq!(Token::verify(&genuine, &KEY, FP, role, 0), Ok(t.clone()));

    let mut altered = genuine.clone().into_bytes();
    let i = *at as usize % (altered.len() + 1);
    let replaced = match op % 3 {
        0 => {
            let i = i.min(altered.len() - 1);
            if altered[i] == *byte {
                return;
            }
            altered[i] = *byte;
            true
        }
        1 => {
            altered.insert(i, *byte);
            false
        }
        _ => {
            altered.remove(i.min(altered.len() - 1));
            false
        }
    };
    let Ok(altered) = String::from_utf8(altered) else {
        return;
    };
    for r in roles() {
        let v = Token::verify(&altered, &KEY, FP, r, 0);
        if replaced {
            assert!(
                v.is_err(),
                "a token with a replaced byte verified: {altered:?}"
            );
        }
        if let Ok(v) = v {
            assert_eq!(
                v, t,
                "an altered token verified as another token: {altered:?}"
            );
        }
    }
    // Re-signed by someone without the coordinator's key.
    if let Ok((forged, _)) = Token::parse(&altered) {
        let resigned = forged.sign(&OTHER_KEY);
        assert_eq!(
            Token::verify(&resigned, &KEY, FP, forged.role, 0),
            Err(TokenError::BadMac)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    arbitrary_text(&String::from_utf8_lossy(data));
    forgery(data);
});
