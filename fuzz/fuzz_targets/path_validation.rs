//! Arbitrary bytes -> `RelPath::new` (the confinement boundary, Invariant 7).
//!
//! Accept/reject is compared with an independent model built on `std::path` (which silently
//! drops `.` and empty components, so a count mismatch reveals them), every error must be true
//! of the input, and every accepted path must keep its promises: relative, no `.`/`..`/empty
//! component, no NUL, within the length limits, joined below a root it stays below it, and it
//! round-trips through its bytes, `parent`/`name`/`join` and `ancestors`.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use standby::types::{MAX_NAME, MAX_PATH, PathError, RelPath};

fn pieces(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    b.split(|c| *c == b'/')
}

/// Accepted, as std::path sees it.
fn model(b: &[u8]) -> bool {
    if b.is_empty() || b.len() > MAX_PATH || b.contains(&0) {
        return false;
    }
    let p = Path::new(OsStr::from_bytes(b));
    let comps: Vec<Component> = p.components().collect();
    p.is_relative()
        && comps.len() == pieces(b).count()
        && comps.iter().all(|c| match c {
            Component::Normal(n) => n.len() <= MAX_NAME,
            _ => false,
        })
}

fn check_accepted(input: &[u8], p: &RelPath) {
    let b = p.as_bytes();
    assert_eq!(b, input, "accepted path changed its bytes");
    assert!(!b.is_empty() && b.len() <= MAX_PATH);
    assert_ne!(b[0], b'/', "absolute path accepted");
    assert!(!b.contains(&0), "NUL accepted");
    for c in pieces(b) {
        assert!(!c.is_empty(), "empty component accepted: {p:?}");
        assert!(c != b"." && c != b"..", "dot component accepted: {p:?}");
        assert!(c.len() <= MAX_NAME);
    }
    assert!(std::ffi::CString::new(b).is_ok());

    // Below a root it stays below it, one normal component per piece.
    let root = Path::new("/ws/root");
    let full = p.to_path(root);
    let rest = full.strip_prefix(root).expect("path escaped its root");
    assert!(rest.components().all(|c| matches!(c, Component::Normal(_))));
    assert_eq!(rest.components().count(), p.depth());
    assert_eq!(rest.as_os_str().as_bytes(), b);

    // Round trips.
    assert_eq!(RelPath::new(b.to_vec()).as_ref(), Ok(p));
    assert_eq!(p.clone().into_bytes(), input);
    let name = p.name();
    assert!(!name.is_empty() && !name.contains(&b'/'));
    match p.parent() {
        Some(q) => {
            assert_eq!(q.join(name).as_ref(), Ok(p));
            assert!(p.starts_with(&q) && p != &q);
            let (lo, hi) = q.subtree_range();
            assert!(
                *p >= lo && *p < hi,
                "{p:?} outside the subtree range of {q:?}"
            );
            assert_eq!(q.depth() + 1, p.depth());
        }
        None => {
            assert_eq!(name, b);
            assert_eq!(p.depth(), 1);
        }
    }
    let anc: Vec<RelPath> = p.ancestors().collect();
    assert_eq!(anc.len(), p.depth() - 1);
    for (i, a) in anc.iter().enumerate() {
        assert_eq!(RelPath::new(a.as_bytes().to_vec()).as_ref(), Ok(a));
        assert!(p.starts_with(a));
        assert_eq!(a.depth(), i + 1);
    }
}

fn check_refused(input: &[u8], e: &PathError) {
    let bad_piece = |f: &dyn Fn(&[u8]) -> bool| pieces(input).any(f);
    let truthful = match e {
        PathError::Empty => input.is_empty(),
        PathError::TooLong => input.len() > MAX_PATH,
        PathError::Absolute => input.first() == Some(&b'/'),
        PathError::Nul => input.contains(&0),
        PathError::BadComponent => bad_piece(&|c| c.is_empty() || c == b"." || c == b".."),
        PathError::NameTooLong => bad_piece(&|c| c.len() > MAX_NAME),
    };
    assert!(truthful, "refused with an untrue reason {e:?}");
}

fuzz_target!(|data: &[u8]| {
    let r = RelPath::new(data.to_vec());
    assert_eq!(
        r.is_ok(),
        model(data),
        "RelPath::new and the model disagree: {r:?}"
    );
    match &r {
        Ok(p) => check_accepted(data, p),
        Err(e) => check_refused(data, e),
    }
    // `join` of any name to a valid path: exactly what `new` says of the concatenation.
    if let Some(i) = data.iter().rposition(|b| *b == 0xff)
        && let Ok(base) = RelPath::new(data[..i].to_vec())
    {
        let name = &data[i + 1..];
        let mut cat = data[..i].to_vec();
        cat.push(b'/');
        cat.extend_from_slice(name);
        assert_eq!(base.join(name), RelPath::new(cat));
    }
});
