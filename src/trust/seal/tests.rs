use super::*;

fn key(b: u8) -> BackupKey {
    BackupKey::from_bytes([b; 32])
}

/// Plaintext that spans several segments and ends mid-segment.
fn plain() -> Vec<u8> {
    (0..SEGMENT * 2 + 1234)
        .map(|i| (i * 7 % 251) as u8)
        .collect()
}

#[test]
fn round_trip_at_every_segment_edge() {
    let k = key(1);
    for len in [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, SEGMENT * 2] {
        let p: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let s = k.seal("packs/a", &p);
        assert_eq!(s.len() as u64, sealed_len(len as u64), "len {len}");
        assert_eq!(k.open("packs/a", &s).unwrap(), p, "len {len}");
    }
}

#[test]
fn opening_in_small_pieces_gives_the_same_bytes() {
    let k = key(1);
    let p = plain();
    let s = k.seal("o", &p);
    let mut o = k.opener("o", &s).unwrap();
    let mut out = Vec::new();
    for piece in s[HEADER_LEN..].chunks(4097) {
        o.feed(piece, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
    }
    o.finish(&mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    assert_eq!(out, p);
}

#[test]
fn ciphertext_holds_no_plaintext() {
    let k = key(1);
    let p = b"a very recognisable sentence, repeated: ".repeat(100);
    let s = k.seal("o", &p);
    assert!(!s.windows(20).any(|w| w == &p[..20]));
}

#[test]
fn a_tampered_byte_is_refused_in_every_part() {
    let k = key(1);
    let s = k.seal("o", &plain());
    // A nonce byte, a byte of the first and of the last segment, a tag byte.
    for at in [HEADER_LEN - 1, HEADER_LEN + 5, s.len() - 100, s.len() - 1] {
        let mut t = s.clone();
        t[at] ^= 0x40;
        let e = k.open("o", &t).unwrap_err();
        assert!(matches!(e, SealError::Tampered { .. }), "byte {at}: {e}");
    }
    // The untouched object still opens.
    assert_eq!(k.open("o", &s).unwrap(), plain());
}

#[test]
fn an_object_under_another_name_is_refused() {
    let k = key(1);
    let s = k.seal("packs/one", b"content");
    let e = k.open("packs/two", &s).unwrap_err();
    assert!(matches!(e, SealError::Tampered { segment: 0, .. }), "{e}");
    assert!(e.to_string().contains("another name"), "{e}");
}

#[test]
fn a_wrong_key_is_named_by_both_fingerprints() {
    let (a, b) = (key(1), key(2));
    let s = a.seal("o", b"content");
    let e = b.open("o", &s).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, SealError::WrongKey { .. }));
    assert!(
        msg.contains(&format!(
            "this backup was sealed with key {}; the key given is {}",
            a.fingerprint(),
            b.fingerprint()
        )),
        "{msg}"
    );
    assert!(!msg.contains(&a.to_hex()) && !msg.contains(&b.to_hex()));
}

#[test]
fn truncation_anywhere_is_refused() {
    let k = key(1);
    let s = k.seal("o", &plain());
    let boundary = HEADER_LEN + SEGMENT + TAG_LEN;
    for cut in [
        0,
        3,
        HEADER_LEN,
        HEADER_LEN + 7,
        boundary,
        boundary + 10,
        s.len() - 1,
    ] {
        let e = k.open("o", &s[..cut]).unwrap_err();
        assert!(
            matches!(e, SealError::Truncated { .. } | SealError::Tampered { .. }),
            "cut at {cut}: {e}"
        );
    }
    // Cut exactly after a whole segment: told apart from tampering.
    let e = k.open("o", &s[..boundary]).unwrap_err();
    assert!(matches!(e, SealError::Truncated { .. }), "{e}");
    let e = k.open("o", &s[..HEADER_LEN + 3]).unwrap_err();
    assert!(matches!(e, SealError::Truncated { .. }), "{e}");
}

#[test]
fn foreign_bytes_and_future_versions_are_named() {
    let k = key(1);
    let e = k.open("o", &[0u8; 100]).unwrap_err();
    assert!(matches!(e, SealError::NotSealed { .. }), "{e}");
    let mut s = k.seal("o", b"x");
    s[4] = 9;
    let e = k.open("o", &s).unwrap_err();
    assert!(matches!(e, SealError::Version { found: 9, .. }), "{e}");
}

#[test]
fn segments_must_be_whole_until_the_last() {
    let k = key(1);
    let mut s = k.sealer("o");
    assert!(matches!(
        s.seal_segment(&[0; 10], false),
        Err(SealError::ShortSegment { .. })
    ));
    assert!(s.seal_segment(&[0; 10], true).is_ok());
}

#[test]
fn names_are_keyed_and_stable() {
    let (a, b) = (key(1), key(2));
    let n = a.object_name("packs/abc.pack");
    assert_eq!(n, a.object_name("packs/abc.pack"));
    assert_ne!(n, b.object_name("packs/abc.pack"));
    assert_ne!(n, a.object_name("packs/abd.pack"));
    assert_eq!(n.len(), 64);
    assert!(!n.contains("abc"));
}

#[test]
fn key_file_is_made_once_private_and_reloads() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let k = BackupKey::load_or_create(d.path()).unwrap();
    let again = BackupKey::load_or_create(d.path()).unwrap();
    assert_eq!(k.fingerprint(), again.fingerprint());
    let m = std::fs::metadata(d.path().join(KEY_FILE)).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        BackupKey::from_hex(&k.to_hex()).unwrap().fingerprint(),
        k.fingerprint()
    );
    assert!(matches!(
        BackupKey::from_hex("zz"),
        Err(SealError::BadKeyText)
    ));
    std::fs::write(d.path().join(KEY_FILE), b"short").unwrap();
    let e = BackupKey::load_or_create(d.path()).unwrap_err();
    assert!(matches!(e, SealError::BadKeyFile { len: 5, .. }), "{e}");
}

#[test]
fn fingerprint_is_printable_and_not_the_key() {
    let k = key(7);
    let f = k.fingerprint().to_string();
    assert_eq!(f.len(), 19);
    assert!(f.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
    assert!(!k.to_hex().contains(&f.replace('-', "")));
}
