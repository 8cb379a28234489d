use super::*;
use crate::replication::manifest::tests::{file, xattrs};
use crate::replication::scan::{Exclude, Scope, walk};
use crate::types::RelPath;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

fn rp(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// Whether the filesystem of `dir` keeps `user.*` attributes (tmpfs does since Linux 6.6).
pub(crate) fn xattrs_supported(dir: &Path) -> bool {
    let f = dir.join(".xattr-probe");
    std::fs::write(&f, b"").unwrap();
    let root = fsx::Root::open(dir).unwrap();
    let ok = Inode::at(root.fd(), b".xattr-probe")
        .and_then(|i| i.set(b"user.probe", b"1"))
        .is_ok();
    std::fs::remove_file(f).unwrap();
    ok
}

fn set(path: &Path, name: &str, value: &str) {
    let dir = fsx::open_dir_path(path.parent().unwrap()).unwrap();
    let name_in_dir = path.file_name().unwrap().as_encoded_bytes();
    Inode::at(dir.as_fd(), name_in_dir)
        .unwrap()
        .set(name.as_bytes(), value.as_bytes())
        .unwrap();
}

fn with_xattrs(items: &[(&str, &str)]) -> Entry {
    Entry {
        xattrs: Some(xattrs(items)),
        ..file(1, 1, 1)
    }
}

#[test]
fn hostile_attributes_are_refused_with_a_reason() {
    let ok = with_xattrs(&[("security.x", "1"), ("trusted.y", "2"), ("user.a", "3")]);
    check(&ok, Kind::File).unwrap();
    let long_name = format!("user.{}", "n".repeat(NAME_MAX));
    let big_value = "v".repeat(VALUE_MAX + 1);
    let many: Vec<(String, String)> = (0..=MAX_XATTRS)
        .map(|i| (format!("user.{i:03}"), String::new()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (&n[..], &v[..])).collect();
    let half = "v".repeat(VALUE_MAX / 2);
    let cases: Vec<(Entry, &str)> = vec![
        (with_xattrs(&[(&long_name, "")]), "name of"),
        (with_xattrs(&[("user.a", &big_value)]), "value of"),
        (
            with_xattrs(&[("user.a", &half), ("user.b", &half)]),
            "in all",
        ),
        (with_xattrs(&many), "extended attributes (at most"),
        (with_xattrs(&[("user.a\0b", "")]), "NUL"),
        (with_xattrs(&[("system.posix_acl_access", "")]), "outside"),
        (with_xattrs(&[("user.", "")]), "outside"),
        (with_xattrs(&[("evil", "")]), "outside"),
        (with_xattrs(&[("user.b", ""), ("user.a", "")]), "sorted"),
        (with_xattrs(&[("user.a", ""), ("user.a", "")]), "sorted"),
        (
            Entry {
                uid: Some(u32::MAX),
                ..file(1, 1, 1)
            },
            "owner",
        ),
    ];
    for (e, why) in cases {
        let err = check(&e, Kind::File).unwrap_err();
        assert!(err.contains(why), "{err:?} should say {why:?}");
    }
    let link = Entry {
        kind: Kind::Symlink.to_proto(),
        ..with_xattrs(&[("user.a", "")])
    };
    assert!(check(&link, Kind::Symlink).unwrap_err().contains("symlink"));
}

#[test]
fn reach_follows_privilege_and_capabilities() {
    let plain = Reach {
        privileged: false,
        capabilities: true,
    };
    let root = Reach {
        privileged: true,
        capabilities: false,
    };
    assert!(plain.handles(b"user.x") && root.handles(b"user.x"));
    assert!(!plain.handles(b"trusted.x") && root.handles(b"trusted.x"));
    assert!(!plain.handles(b"security.ima") && root.handles(b"security.ima"));
    assert!(!root.handles(b"security.selinux"));
    assert!(!root.handles(b"security.capability"));
    assert!(
        Reach {
            capabilities: true,
            ..root
        }
        .handles(b"security.capability")
    );
    assert!(!root.handles(b"system.posix_acl_access"));
}

/// Scans `dir` with attributes filled in against `index`, as the sender does.
fn scan(dir: &Path, index: &Manifest) -> Walk {
    let (mut w, _) = walk(dir, &Scope::Full, &Exclude::default());
    fill(
        dir,
        &mut w,
        index,
        crate::host::unix_ms_now() as i64 * 1_000_000,
    );
    w
}

#[test]
fn attributes_are_read_again_only_when_the_change_time_moves() {
    let d = tempfile::tempdir().unwrap();
    if !xattrs_supported(d.path()) {
        eprintln!("skipped: the temporary directory's filesystem keeps no user.* xattrs");
        return;
    }
    let f = d.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    set(&f, "user.b", "2");
    set(&f, "user.a", "1");
    let w = scan(d.path(), &Manifest::new());
    let st = &w.entries[&rp("f")];
    assert_eq!(st.xattrs, Some(xattrs(&[("user.a", "1"), ("user.b", "2")])));
    assert_eq!(
        st.ctime_ns, 0,
        "read within the racy window: not trusted yet"
    );
    assert_eq!(st.uid, std::fs::metadata(&f).unwrap().uid());

    // An index entry read at this very inode and change time is believed without a read: give
    // it attributes the file does not have, and the scan takes them.
    let md = std::fs::metadata(&f).unwrap();
    let ctime = md.ctime() * 1_000_000_000 + md.ctime_nsec();
    let mut index = Manifest::new();
    let mut e = st.entry();
    e.ctime_ns = ctime;
    e.xattrs = Some(xattrs(&[("user.cached", "")]));
    index.insert(rp("f"), e.clone());
    let w = scan(d.path(), &index);
    assert_eq!(w.entries[&rp("f")].xattrs, e.xattrs, "not read again");

    // setxattr moves the change time (not the mtime): read again, the change is seen.
    let mtime = md.mtime_nsec();
    std::thread::sleep(std::time::Duration::from_millis(20));
    set(&f, "user.a", "changed");
    assert_eq!(std::fs::metadata(&f).unwrap().mtime_nsec(), mtime);
    let w = scan(d.path(), &index);
    assert_eq!(
        w.entries[&rp("f")].xattrs,
        Some(xattrs(&[("user.a", "changed"), ("user.b", "2")]))
    );
    let plan = crate::replication::scan::plan(&index, &w, &[None]);
    assert!(
        matches!(
            plan.actions[..],
            [crate::replication::scan::Action::Meta { .. }]
        ),
        "an attribute-only change is a metadata change: {:?}",
        plan.actions
    );
}

#[test]
fn a_change_time_old_enough_is_kept_and_an_unchanged_rescan_is_local_only() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), b"x").unwrap();
    // Pretend the scan started 10 s after the file's change: its attributes are trusted.
    let (mut w, roots) = walk(d.path(), &Scope::Full, &Exclude::default());
    let later = crate::host::unix_ms_now() as i64 * 1_000_000 + 10_000_000_000;
    fill(d.path(), &mut w, &Manifest::new(), later);
    let st = w.entries[&rp("f")].clone();
    assert_ne!(st.ctime_ns, 0);
    assert!(st.xattrs.is_some(), "read (possibly empty)");
    // The index as the last generation left it, with a zeroed (racy) change time: the rescan
    // reads again, finds the same, and only the index's change time moves.
    let mut index = Manifest::new();
    index.insert(
        rp("f"),
        Entry {
            ctime_ns: 0,
            ..st.entry()
        },
    );
    let plan = crate::replication::scan::plan(&index, &w, &roots);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.local, vec![(rp("f"), st.ctime_ns)]);
}

#[test]
fn an_ownership_only_change_is_a_metadata_change() {
    if !fsx::privileged() {
        eprintln!("skipped: chown to another user needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let w = scan(d.path(), &Manifest::new());
    let mut index = Manifest::new();
    for (p, st) in &w.entries {
        index.insert(p.clone(), st.entry());
    }
    std::os::unix::fs::lchown(&f, Some(1234), Some(5678)).unwrap();
    let w = scan(d.path(), &index);
    let plan = crate::replication::scan::plan(&index, &w, &[None]);
    match &plan.actions[..] {
        [crate::replication::scan::Action::Meta { stat, .. }] => {
            assert_eq!((stat.uid, stat.gid), (1234, 5678));
        }
        other => panic!("expected one metadata change, got {other:?}"),
    }
}

#[test]
fn set_xattrs_matches_the_entry_within_reach_only() {
    let d = tempfile::tempdir().unwrap();
    if !xattrs_supported(d.path()) {
        eprintln!("skipped: the temporary directory's filesystem keeps no user.* xattrs");
        return;
    }
    let f = d.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    set(&f, "user.stale", "old");
    set(&f, "user.keep", "old");
    let privileged = fsx::privileged();
    if privileged {
        set(&f, "trusted.local", "mine");
    }
    let root = fsx::Root::open(d.path()).unwrap();
    let want = with_xattrs(&[("trusted.new", "t"), ("user.keep", "new"), ("user.z", "")]);
    let reach = Reach {
        privileged: false,
        capabilities: false,
    };
    set_xattrs_at(root.fd(), b"f", &want, reach, &"f").unwrap();
    let mut names = xattr::list_path(&f).unwrap().unwrap();
    names.sort();
    let expected: Vec<&[u8]> = if privileged {
        vec![b"trusted.local", b"user.keep", b"user.z"]
    } else {
        vec![b"user.keep", b"user.z"]
    };
    assert_eq!(
        names, expected,
        "unprivileged: trusted.* neither set nor removed"
    );
    assert_eq!(xattr::get_path(&f, b"user.keep").unwrap().unwrap(), b"new");
    // Not carried (an old entry): nothing is touched.
    set_xattrs_at(root.fd(), b"f", &file(1, 1, 1), reach, &"f").unwrap();
    assert_eq!(xattr::list_path(&f).unwrap().unwrap().len(), names.len());
}

#[test]
fn set_xattrs_at_refuses_a_planted_symlink() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    if !xattrs_supported(outside.path()) {
        eprintln!("skipped: the temporary directory's filesystem keeps no user.* xattrs");
        return;
    }
    let target = outside.path().join("secret");
    std::fs::write(&target, b"x").unwrap();
    std::os::unix::fs::symlink(&target, d.path().join("f")).unwrap();
    let root = fsx::Root::open(d.path()).unwrap();
    let want = with_xattrs(&[("user.evil", "1")]);
    let reach = Reach::sender();
    assert!(set_xattrs_at(root.fd(), b"f", &want, reach, &"f").is_err());
    assert!(xattr::list_path(&target).unwrap().unwrap().is_empty());
}
