use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};

use super::*;
use crate::replication::manifest::Kind;

fn file(content: &[u8], mode: u32) -> Entry {
    Entry {
        kind: Kind::File.to_proto(),
        mode,
        mtime_ns: 1_600_000_000_000_000_000,
        size: content.len() as u64,
        blake3: blake3::hash(content).as_bytes().to_vec(),
        ..Default::default()
    }
}

fn rel(p: &str) -> RelPath {
    RelPath::new(p).unwrap()
}

#[test]
fn files_dirs_and_symlinks_land_verified_with_their_modes() {
    let d = tempfile::tempdir().unwrap();
    let mut u = Unpacker::new(d.path()).unwrap();
    let dir = Entry {
        kind: Kind::Dir.to_proto(),
        mode: 0o755,
        ..Default::default()
    };
    u.entry(rel("ckpt"), dir).unwrap();
    u.entry(rel("ckpt/a.bin"), file(b"hello world", 0o6755))
        .unwrap();
    u.data(b"hello ").unwrap();
    u.data(b"world").unwrap();
    let link = Entry {
        kind: Kind::Symlink.to_proto(),
        mode: 0o777,
        target: b"a.bin".to_vec(),
        ..Default::default()
    };
    u.entry(rel("ckpt/latest"), link).unwrap();
    // A file in a directory the stream never named on its own.
    u.entry(rel("deep/er/b"), file(b"", 0o600)).unwrap();
    let done = u.finish().unwrap();
    assert_eq!(
        (done.files, done.dirs, done.symlinks, done.bytes),
        (2, 1, 1, 11)
    );
    assert_eq!(
        fs::read(d.path().join("ckpt/a.bin")).unwrap(),
        b"hello world"
    );
    let mode = fs::metadata(d.path().join("ckpt/a.bin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "setuid and setgid are never restored");
    assert_eq!(
        fs::read_link(d.path().join("ckpt/latest")).unwrap(),
        Path::new("a.bin")
    );
    assert!(d.path().join("deep/er/b").is_file());
    assert_eq!(
        fs::read_dir(d.path().join("ckpt")).unwrap().count(),
        2,
        "no temporaries left"
    );
}

#[test]
fn a_file_that_does_not_match_its_hash_never_replaces_the_old_one() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("model.pt"), b"the good bytes").unwrap();
    let mut u = Unpacker::new(d.path()).unwrap();
    u.entry(rel("model.pt"), file(b"restored bytes", 0o644))
        .unwrap();
    u.data(b"tampered bytes").unwrap();
    let err = u.finish().unwrap_err();
    assert!(matches!(err, UnpackError::Mismatch { .. }), "{err}");
    assert_eq!(
        fs::read(d.path().join("model.pt")).unwrap(),
        b"the good bytes"
    );
    assert_eq!(
        fs::read_dir(d.path()).unwrap().count(),
        1,
        "the temporary is gone"
    );
}

#[test]
fn short_or_long_content_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut u = Unpacker::new(d.path()).unwrap();
    u.entry(rel("a"), file(b"abc", 0o644)).unwrap();
    u.data(b"ab").unwrap();
    let err = u.entry(rel("b"), file(b"x", 0o644)).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Size {
                got: 2,
                want: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(!d.path().join("a").exists());

    let mut u = Unpacker::new(d.path()).unwrap();
    u.entry(rel("a"), file(b"abc", 0o644)).unwrap();
    let err = u.data(b"abcd").unwrap_err();
    assert!(matches!(err, UnpackError::Size { .. }), "{err}");
    assert!(matches!(
        Unpacker::new(d.path()).unwrap().data(b"x"),
        Err(UnpackError::Stray)
    ));
}

#[test]
fn nothing_is_written_through_a_symlink_or_over_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    symlink(outside.path(), d.path().join("ckpt")).unwrap();
    fs::create_dir(d.path().join("data")).unwrap();
    let mut u = Unpacker::new(d.path()).unwrap();
    let err = u.entry(rel("ckpt/a"), file(b"x", 0o644)).unwrap_err();
    assert!(matches!(err, UnpackError::NotADir(_)), "{err}");
    let err = u.entry(rel("data"), file(b"x", 0o644)).unwrap_err();
    assert!(matches!(err, UnpackError::IsADir(_)), "{err}");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(d.path().join("data").is_dir());
}

fn attrs(items: &[(&str, &str)]) -> Option<crate::proto::Xattrs> {
    Some(crate::replication::manifest::tests::xattrs(items))
}

/// A restore (`agent-gpu restore`, `restore-backup`) writes owners back when it runs as root,
/// and extended attributes, but never file capabilities; hostile attributes stop it.
#[test]
fn owners_and_attributes_are_restored_capabilities_never() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let mut u = Unpacker::new(d.path()).unwrap();
    let dir = Entry {
        kind: Kind::Dir.to_proto(),
        mode: 0o755,
        uid: Some(1001),
        gid: Some(1002),
        xattrs: attrs(&[("user.dir", "d")]),
        ..Default::default()
    };
    u.entry(rel("d"), dir).unwrap();
    let f = Entry {
        uid: Some(1234),
        gid: Some(5678),
        xattrs: attrs(&[("security.capability", "caps"), ("user.standby.test", "v")]),
        ..file(b"x", 0o644)
    };
    u.entry(rel("d/f"), f).unwrap();
    u.data(b"x").unwrap();
    let link = Entry {
        kind: Kind::Symlink.to_proto(),
        mode: 0o777,
        target: b"f".to_vec(),
        uid: Some(1234),
        gid: Some(5678),
        ..Default::default()
    };
    u.entry(rel("d/l"), link).unwrap();
    u.finish().unwrap();
    let get = |p: &str, n: &str| crate::disk::xattr::get_path(&d.path().join(p), n.as_bytes());
    assert_eq!(
        get("d/f", "user.standby.test").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(get("d", "user.dir").unwrap().as_deref(), Some(&b"d"[..]));
    assert_eq!(
        get("d/f", "security.capability").unwrap(),
        None,
        "capabilities never restored"
    );
    let owner = |p: &str| {
        let m = fs::symlink_metadata(d.path().join(p)).unwrap();
        (m.uid(), m.gid())
    };
    if crate::disk::fsx::privileged() {
        assert_eq!(owner("d/f"), (1234, 5678));
        assert_eq!(owner("d"), (1001, 1002));
        assert_eq!(owner("d/l"), (1234, 5678));
    } else {
        eprintln!("owners not checked: restoring them needs root");
    }

    let mut u = Unpacker::new(d.path()).unwrap();
    let hostile = Entry {
        xattrs: attrs(&[("system.posix_acl_access", "")]),
        ..file(b"y", 0o644)
    };
    let err = u.entry(rel("d/f"), hostile).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert_eq!(
        fs::read(d.path().join("d/f")).unwrap(),
        b"x",
        "the file restored before stays"
    );
}
