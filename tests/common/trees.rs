//! Seeded trees and exact snapshots of a directory (content, mode, mtime, link target), their
//! differences, and fixed mtimes so a tree is reproducible.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// What a snapshot records of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { mode: u32, mtime: i64, hash: String },
    Dir { mode: u32, mtime: i64 },
    Link { target: Vec<u8>, mtime: i64 },
}

pub type Snapshot = BTreeMap<Vec<u8>, Node>;

/// Every path below `root` (not `root` itself), skipping the stage directory at the top.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        if rel == b".standby-stage" {
            continue;
        }
        let m = fs::symlink_metadata(&p).unwrap();
        let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
        let node = if m.file_type().is_symlink() {
            Node::Link {
                target: fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec(),
                mtime,
            }
        } else if m.is_dir() {
            walk(root, &p, out);
            Node::Dir {
                mode: m.mode() & 0o7777,
                mtime,
            }
        } else {
            Node::File {
                mode: m.mode() & 0o7777,
                mtime,
                hash: blake3::Hasher::new()
                    .update_mmap(&p)
                    .unwrap()
                    .finalize()
                    .to_hex()
                    .to_string(),
            }
        };
        out.insert(rel, node);
    }
}

/// A readable account of how two snapshots differ (empty when equal).
pub fn diff(a: &Snapshot, b: &Snapshot) -> String {
    let mut s = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => s += &format!("only in first: {}\n", String::from_utf8_lossy(k)),
            Some(w) if w != v => {
                s += &format!("differs: {}: {v:?} vs {w:?}\n", String::from_utf8_lossy(k))
            }
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            s += &format!("only in second: {}\n", String::from_utf8_lossy(k));
        }
    }
    if s.len() > 4000 {
        s.truncate(4000);
        s += "...";
    }
    s
}

pub fn assert_same(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let d = diff(&sa, &sb);
    assert!(
        d.is_empty(),
        "{} and {} differ:\n{d}",
        a.display(),
        b.display()
    );
}

/// Deterministic pseudo-random bytes (fast).
pub fn bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Compressible text-like bytes.
pub fn text(rng: &mut StdRng, n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "epoch",
        "loss",
        "step",
        "grad",
        "0.0031",
        "checkpoint",
        "weights",
        "layer",
        "\n",
    ];
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
        v.push(b' ');
    }
    v.truncate(n);
    v
}

pub fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// Files staged in a receiver's stage directory (below its bucket directories).
pub fn staged_files(stage: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(stage).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            for f in fs::read_dir(e.path()).unwrap() {
                eprintln!("staged: {}", f.unwrap().path().display());
                n += 1;
            }
        } else {
            eprintln!("staged: {}", e.path().display());
            n += 1;
        }
    }
    n
}

/// A varied tree: nested directories, `n_small` small files (some compressible), the given big
/// files, unicode and spaces in names, symlinks (relative, absolute, dangling), modes, empty
/// directories. Mtimes are set to fixed past values so the tree is exactly reproducible.
pub fn make_tree(root: &Path, rng: &mut StdRng, n_small: usize, big: &[usize]) {
    fs::create_dir_all(root).unwrap();
    let dirs = [
        "",
        "src",
        "src/models",
        "data/train",
        "data/val",
        "runs/exp 1",
        "ünïcødé/日本語",
        "deep/a/b/c/d/e/f",
    ];
    for d in dirs {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::create_dir_all(root.join("empty/also empty")).unwrap();
    for i in 0..n_small {
        let d = dirs[i % dirs.len()];
        let name = match i % 5 {
            0 => format!("file {i}.txt"),
            1 => format!("ñame-{i}.py"),
            2 => format!("x{i}"),
            3 => format!(".hidden{i}"),
            _ => format!("f{i}.bin"),
        };
        let size = rng.random_range(0..6000);
        let data = if i % 2 == 0 {
            text(rng, size)
        } else {
            bytes(rng, size)
        };
        let p = root.join(d).join(name);
        fs::write(&p, data).unwrap();
        let mode = [0o644, 0o600, 0o755, 0o444, 0o640][i % 5];
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(
            &p,
            1_700_000_000 + i as i64,
            (i as i64 * 7919) % 1_000_000_000,
        );
    }
    for (k, &n) in big.iter().enumerate() {
        let p = root.join(format!("data/big-{k}.bin"));
        write_big(&p, rng, n);
        set_mtime(&p, 1_700_100_000 + k as i64, 123);
    }
    symlink("src/models", root.join("models")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    symlink("../../data", root.join("runs/exp 1/data-link")).unwrap();
    set_mtime(&root.join("models"), 1_700_200_000, 5);
    fs::set_permissions(root.join("data/val"), fs::Permissions::from_mode(0o750)).unwrap();
    fix_dir_mtimes(root);
}

/// Writes `n` random bytes without holding them all in memory.
pub fn write_big(p: &Path, rng: &mut StdRng, n: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(p).unwrap());
    let mut left = n;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let k = left.min(buf.len());
        rng.fill(&mut buf[..k]);
        f.write_all(&buf[..k]).unwrap();
        left -= k;
    }
}

/// Sets every directory's mtime to a fixed value (deepest first), so trees are reproducible.
pub fn fix_dir_mtimes(root: &Path) {
    let mut dirs = Vec::new();
    collect_dirs(root, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for (i, d) in dirs.iter().enumerate() {
        set_mtime(d, 1_600_000_000 + i as i64, 0);
    }
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.push(e.path());
            collect_dirs(&e.path(), out);
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A copy of the tree at `from` in `to` (made), with modes, mtimes and links as they are.
pub fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}
