//! Rolling a committed generation forward (`standby::replication::receive::apply::apply_record`)
//! on a real temporary workspace, for an arbitrary sequence of generations and local tampering.
//!
//! Each run builds `base/{ws,stage,outside}` on tmpfs. Generations are built the way the
//! receiver builds its records (old kinds from the current manifest, staged files, symlinks and
//! directories, kept and patched files, packs) from arbitrary paths, modes, times, contents and
//! symlink targets (pointing outside, at `..`, at the stage); "plant" steps tamper with the
//! workspace directly (a symlink, file or directory put anywhere, or something removed), as a
//! local user could. Stage names are always the receiver's own (the journal is written by the
//! receiver; those names never come from the network).
//!
//! Checked after every step:
//! - nothing outside `ws/` changed: `outside/` is identical (names, kinds, modes, sizes, mtimes,
//!   ctimes, contents, link targets), `base/` holds exactly the three directories, and the
//!   stage lost entries (renamed into place) but gained or changed none;
//! - `apply_record` never panics, and refuses a record with an invalid path;
//! - while nothing was planted and every record was well formed, it succeeds, a replay of the
//!   same record (a crash right after applying) succeeds too, and the workspace then equals the
//!   manifest: same paths, kinds, modes, mtimes, file contents and link targets.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use standby::disk::fsx::{self, Root};
use standby::proto::Entry;
use standby::proto::state::{Change, Extent, Record};
use standby::replication::manifest::{Kind, Manifest, kind_of};
use standby::replication::receive::apply::{
    Policy, SetIdBits, apply_record, clear_stage, prepare_stage,
};
use standby::types::RelPath;

/// Modes are compared exactly with the manifest: setuid and setgid bits are kept. Owners are
/// left alone (the fuzzer runs as whoever runs it).
const KEEP: Policy = Policy {
    setid: SetIdBits::Keep,
    privileged: false,
};

#[derive(Arbitrary, Debug)]
enum PathSel {
    /// Components from a small alphabet (so paths collide), at most four deep.
    Small(Vec<u8>),
    /// Anything, valid or not.
    Raw(Vec<u8>),
}

const NAMES: [&str; 5] = ["a", "b", "l", "d", "f"];

impl PathSel {
    fn bytes(&self) -> Vec<u8> {
        match self {
            PathSel::Small(v) => {
                let comps: Vec<&str> = v.iter().take(4).map(|b| NAMES[*b as usize % 5]).collect();
                if comps.is_empty() {
                    b"a".to_vec()
                } else {
                    comps.join("/").into_bytes()
                }
            }
            PathSel::Raw(v) => v.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum TargetSel {
    Outside,
    OutsideFile,
    OutsideDir,
    Stage,
    /// `../` repeated, then `outside` or `outside/f`.
    Up {
        ups: u8,
        file: bool,
    },
    DotDot,
    Slash,
    Raw(Vec<u8>),
}

impl TargetSel {
    fn bytes(&self, base: &Path) -> Vec<u8> {
        let abs = |p: PathBuf| p.as_os_str().as_bytes().to_vec();
        match self {
            TargetSel::Outside => abs(base.join("outside")),
            TargetSel::OutsideFile => abs(base.join("outside/f")),
            TargetSel::OutsideDir => abs(base.join("outside/d")),
            TargetSel::Stage => abs(base.join("stage/00")),
            TargetSel::Up { ups, file } => {
                let mut t = "../".repeat(*ups as usize % 6 + 1);
                t.push_str(if *file { "outside/f" } else { "outside" });
                t.into_bytes()
            }
            TargetSel::DotDot => b"..".to_vec(),
            TargetSel::Slash => b"/".to_vec(),
            TargetSel::Raw(v) => {
                let v: Vec<u8> = v.iter().copied().filter(|b| *b != 0).take(64).collect();
                if v.is_empty() { b"x".to_vec() } else { v }
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum What {
    Delete,
    Dir {
        staged: bool,
    },
    Symlink(TargetSel),
    FileStaged(Vec<u8>),
    /// Linked from another path: staged, metadata set after the rename.
    FileCopied(Vec<u8>),
    /// Metadata only (the replica already holds this content).
    FileKeep,
    /// Updated in place from a patch.
    FilePatch {
        data: Vec<u8>,
        extents: Vec<(u16, u8, u8)>,
        size: u16,
    },
    /// A small file from the generation's pack.
    FilePacked(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Op {
    path: PathSel,
    what: What,
    mode: u16,
    mtime_s: u32,
    mtime_ns: u32,
}

#[derive(Arbitrary, Debug)]
enum Plant {
    Symlink(TargetSel),
    File,
    Dir,
    Remove,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Generation { ops: Vec<Op>, replay: bool },
    Plant { path: PathSel, what: Plant },
}

/// Everything observable about a tree, for "nothing changed" checks.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    mode: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
}

fn snapshot(dir: &Path, prefix: &[u8], out: &mut BTreeMap<Vec<u8>, Node>) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let md = std::fs::symlink_metadata(&p).unwrap();
        let key = [prefix, b"/", n.as_bytes()].concat();
        let content = if md.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().into_os_string().into_vec()
        } else if md.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            key.clone(),
            Node {
                mode: md.mode(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
                content,
            },
        );
        if md.is_dir() {
            snapshot(&p, &key, out);
        }
    }
}

struct World {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    ws: PathBuf,
    root: Root,
    stage: OwnedFd,
    outside: BTreeMap<Vec<u8>, Node>,
    manifest: Manifest,
    /// Content of every file in the manifest.
    contents: HashMap<RelPath, Vec<u8>>,
    generation: u64,
    seq: u64,
    /// Nothing planted and every record well formed so far: the workspace must equal the
    /// manifest.
    clean: bool,
}

fn tmp_parent() -> &'static Path {
    if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    }
}

impl World {
    fn new() -> World {
        let tmp = tempfile::Builder::new()
            .prefix("standby-fuzz-")
            .tempdir_in(tmp_parent())
            .unwrap();
        let base = tmp.path().to_path_buf();
        let ws = base.join("ws");
        for d in ["ws", "stage", "outside", "outside/d"] {
            std::fs::create_dir(base.join(d)).unwrap();
        }
        std::fs::write(base.join("outside/f"), b"secret").unwrap();
        std::fs::set_permissions(
            base.join("outside/f"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::write(base.join("outside/d/g"), b"secret too").unwrap();
        let root = Root::open(&ws).unwrap();
        let stage = fsx::open_dir_path(&base.join("stage")).unwrap();
        prepare_stage(stage.as_fd()).unwrap();
        let mut outside = BTreeMap::new();
        snapshot(&base.join("outside"), b"outside", &mut outside);
        World {
            _tmp: tmp,
            base,
            ws,
            root,
            stage,
            outside,
            manifest: Manifest::new(),
            contents: HashMap::new(),
            generation: 0,
            seq: 0,
            clean: true,
        }
    }

    fn stage_name(&mut self) -> String {
        self.seq += 1;
        format!("{:02x}/g{}-{}", self.seq % 16, self.generation, self.seq)
    }

    fn check_confined(&self) {
        let mut top: Vec<_> = std::fs::read_dir(&self.base)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["outside", "stage", "ws"],
            "something appeared beside the workspace"
        );
        for d in ["ws", "stage", "outside"] {
            let md = std::fs::symlink_metadata(self.base.join(d)).unwrap();
            assert!(md.is_dir(), "{d} was replaced");
        }
        let mut now = BTreeMap::new();
        snapshot(&self.base.join("outside"), b"outside", &mut now);
        if now != self.outside {
            let changed: Vec<String> = now
                .keys()
                .chain(self.outside.keys())
                .filter(|k| now.get(*k) != self.outside.get(*k))
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            panic!(
                "something outside the workspace changed: {changed:?}\nbefore: {:?}\nafter: {:?}",
                self.outside, now
            );
        }
    }

    fn stage_snapshot(&self) -> BTreeMap<Vec<u8>, Node> {
        let mut s = BTreeMap::new();
        snapshot(&self.base.join("stage"), b"stage", &mut s);
        s
    }

    fn entry(kind: Kind, op: &Op) -> Entry {
        Entry {
            kind: kind.to_proto(),
            mode: if kind == Kind::Symlink {
                0o777
            } else {
                u32::from(op.mode) & 0o7777
            },
            mtime_ns: i64::from(op.mtime_s) * 1_000_000_000
                + i64::from(op.mtime_ns % 1_000_000_000),
            ..Default::default()
        }
    }

    fn write_stage_file(&self, name: &str, data: &[u8], e: &Entry) {
        let mut f = fsx::create_excl(self.stage.as_fd(), name.as_bytes()).unwrap();
        f.write_all(data).unwrap();
        standby::replication::receive::apply::set_file_meta(&f, e, KEEP).unwrap();
    }

    /// Builds a record as the receiver would; None for an op the receiver would refuse.
    fn generation(&mut self, ops: &[Op], replay: bool) -> bool {
        self.generation += 1;
        let mut changes: Vec<Change> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut new_contents: Vec<(RelPath, Option<Vec<u8>>)> = Vec::new();
        let mut pack: Option<(String, Vec<u8>)> = None;
        let mut invalid = false;
        for op in ops.iter().take(12) {
            let bytes = op.path.bytes();
            let Ok(p) = RelPath::new(bytes.clone()) else {
                // Only reachable through a corrupt journal; must be refused as a whole.
                changes.push(Change {
                    path: bytes.into(),
                    entry: Some(Self::entry(Kind::Dir, op)),
                    ..Default::default()
                });
                invalid = true;
                continue;
            };
            if !seen.insert(p.clone()) {
                continue; // the receiver refuses a second change to one path
            }
            let old = self.manifest.get(&p).cloned();
            let old_kind = old.as_ref().and_then(kind_of);
            let old_field = |k: Kind| match old_kind {
                Some(o) if o != k => o.to_proto(),
                _ => 0,
            };
            let mut c = Change {
                path: p.as_bytes().to_vec().into(),
                ..Default::default()
            };
            match &op.what {
                What::Delete => {
                    let Some(k) = old_kind else { continue };
                    c.old_kind = k.to_proto();
                    new_contents.push((p.clone(), None));
                }
                What::Dir { staged } => {
                    let e = Self::entry(Kind::Dir, op);
                    c.old_kind = old_field(Kind::Dir);
                    if *staged && old_kind != Some(Kind::Dir) {
                        let name = self.stage_name();
                        fsx::mkdirat(self.stage.as_fd(), name.as_bytes(), 0o700).unwrap();
                        c.stage = name;
                    }
                    c.entry = Some(e);
                    new_contents.push((p.clone(), None));
                }
                What::Symlink(t) => {
                    let mut e = Self::entry(Kind::Symlink, op);
                    let target = t.bytes(&self.base);
                    e.target = target.clone().into();
                    let name = self.stage_name();
                    fsx::symlinkat(&target, self.stage.as_fd(), name.as_bytes()).unwrap();
                    fsx::set_mtime_at(self.stage.as_fd(), name.as_bytes(), e.mtime_ns).unwrap();
                    c.old_kind = old_field(Kind::Symlink);
                    c.stage = name;
                    c.entry = Some(e);
                    new_contents.push((p.clone(), None));
                }
                What::FileStaged(data) | What::FileCopied(data) => {
                    let data = &data[..data.len().min(4096)];
                    let mut e = Self::entry(Kind::File, op);
                    e.size = data.len() as u64;
                    let name = self.stage_name();
                    self.write_stage_file(&name, data, &e);
                    c.old_kind = old_field(Kind::File);
                    c.stage = name;
                    c.set_meta = matches!(op.what, What::FileCopied(_));
                    c.entry = Some(e);
                    new_contents.push((p.clone(), Some(data.to_vec())));
                }
                What::FileKeep => {
                    let Some(o) = old.filter(|_| old_kind == Some(Kind::File)) else {
                        continue;
                    };
                    let mut e = Self::entry(Kind::File, op);
                    e.size = o.size;
                    e.blake3 = o.blake3.clone();
                    c.set_meta = true;
                    c.entry = Some(e);
                }
                What::FilePatch {
                    data,
                    extents,
                    size,
                } => {
                    if old_kind != Some(Kind::File) {
                        continue;
                    }
                    let mut content = self.contents[&p].clone();
                    let data = &data[..data.len().min(4096)];
                    let mut ex = Vec::new();
                    for (offset, len, at) in extents.iter().take(8) {
                        let at = *at as usize % (data.len() + 1);
                        let len = (*len as usize).min(data.len() - at);
                        let offset = *offset as usize;
                        if content.len() < offset + len {
                            content.resize(offset + len, 0);
                        }
                        content[offset..offset + len].copy_from_slice(&data[at..at + len]);
                        ex.push(Extent {
                            offset: offset as u64,
                            len: len as u64,
                            at: at as u64,
                        });
                    }
                    content.resize(*size as usize, 0);
                    let mut e = Self::entry(Kind::File, op);
                    e.size = u64::from(*size);
                    let name = self.stage_name();
                    let mut f = fsx::create_excl(self.stage.as_fd(), name.as_bytes()).unwrap();
                    f.write_all(data).unwrap();
                    c.patch = name;
                    c.extents = ex;
                    c.set_meta = true;
                    c.entry = Some(e);
                    new_contents.push((p.clone(), Some(content)));
                }
                What::FilePacked(data) => {
                    let data = &data[..data.len().min(512)];
                    let mut e = Self::entry(Kind::File, op);
                    e.size = data.len() as u64;
                    if pack.is_none() {
                        pack = Some((self.stage_name(), Vec::new()));
                    }
                    let (name, buf) = pack.as_mut().unwrap();
                    c.pack = name.clone();
                    c.pack_offset = buf.len() as u64;
                    buf.extend_from_slice(data);
                    c.old_kind = old_field(Kind::File);
                    c.entry = Some(e);
                    new_contents.push((p.clone(), Some(data.to_vec())));
                }
            }
            changes.push(c);
        }
        if let Some((name, buf)) = &pack {
            let mut f = fsx::create_excl(self.stage.as_fd(), name.as_bytes()).unwrap();
            f.write_all(buf).unwrap();
        }
        // The receiver keeps a generation's changes in a BTreeMap by path.
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        let rec = Record {
            generation: self.generation,
            changes,
            ..Default::default()
        };
        let mut after = self.manifest.clone();
        let applies = after.apply(&rec.changes).is_ok();
        assert_eq!(applies, !invalid);
        // What the receiver checks before it commits: every upserted path's parent is a
        // directory in the manifest after the generation.
        let well_formed = applies
            && rec.changes.iter().filter(|c| c.entry.is_some()).all(|c| {
                let p = RelPath::new(c.path.to_vec()).unwrap();
                p.parent()
                    .is_none_or(|d| after.get(&d).and_then(kind_of) == Some(Kind::Dir))
            });

        let staged_before = self.stage_snapshot();
        let r = apply_record(&self.root, self.stage.as_fd(), &rec, &after, KEEP);
        self.check_confined();
        let staged_after = self.stage_snapshot();
        for (k, v) in &staged_after {
            // Directories lose entries as their files are placed; their own mode is unchanged.
            let before = staged_before
                .get(k)
                .unwrap_or_else(|| panic!("{} appeared in the stage", String::from_utf8_lossy(k)));
            if v.mode & libc::S_IFMT == libc::S_IFDIR {
                assert_eq!(
                    v.mode,
                    before.mode,
                    "{} changed in the stage",
                    String::from_utf8_lossy(k)
                );
            } else {
                assert_eq!(
                    v,
                    before,
                    "{} changed in the stage",
                    String::from_utf8_lossy(k)
                );
            }
        }
        if invalid {
            assert!(r.is_err(), "a record with an invalid path was applied");
            return false;
        }
        if !(self.clean && well_formed) {
            self.clean = false;
            if r.is_err() {
                return false;
            }
        } else if let Err(e) = &r {
            panic!("a well-formed record on an untampered workspace failed: {e}\n{rec:?}");
        }
        if replay {
            let r2 = apply_record(&self.root, self.stage.as_fd(), &rec, &after, KEEP);
            self.check_confined();
            if self.clean {
                r2.unwrap_or_else(|e| panic!("replaying an applied record failed: {e}"));
            }
        }
        clear_stage(self.stage.as_fd()).unwrap();
        self.check_confined();
        // The manifest deletes subtrees of removed directories: drop their contents too.
        self.manifest = after;
        for (p, c) in new_contents {
            match c {
                Some(c) => self.contents.insert(p, c),
                None => self.contents.remove(&p),
            };
        }
        let manifest = &self.manifest;
        self.contents
            .retain(|p, _| manifest.get(p).and_then(kind_of) == Some(Kind::File));
        if self.clean {
            self.check_equal();
        }
        true
    }

    fn plant(&mut self, path: &PathSel, what: &Plant) {
        self.clean = false;
        let Ok(p) = RelPath::new(path.bytes()) else {
            return;
        };
        let Ok((dir, name)) = self.root.open_parent(&p) else {
            return;
        };
        let d = dir.as_fd();
        match what {
            Plant::Symlink(t) => {
                let _ = fsx::remove_tree_at(d, name);
                let _ = fsx::symlinkat(&t.bytes(&self.base), d, name);
            }
            Plant::File => {
                let _ = fsx::remove_tree_at(d, name);
                if let Ok(mut f) = fsx::create_trunc(d, name, 0o644) {
                    let _ = f.write_all(b"planted");
                }
            }
            Plant::Dir => {
                let _ = fsx::remove_tree_at(d, name);
                let _ = fsx::mkdirat(d, name, 0o755);
            }
            Plant::Remove => {
                let _ = fsx::remove_tree_at(d, name);
            }
        }
        self.check_confined();
    }

    /// The workspace holds exactly the manifest.
    fn check_equal(&self) {
        let mut disk = BTreeMap::new();
        snapshot(&self.ws, b"", &mut disk);
        let disk: BTreeMap<RelPath, Node> = disk
            .into_iter()
            .map(|(k, v)| (RelPath::new(k[1..].to_vec()).unwrap(), v))
            .collect();
        let want: Vec<&RelPath> = self.manifest.iter().map(|(p, _)| p).collect();
        let have: Vec<&RelPath> = disk.keys().collect();
        assert_eq!(have, want, "workspace paths differ from the manifest");
        for (p, e) in self.manifest.iter() {
            let n = &disk[p];
            let fmt = n.mode & libc::S_IFMT;
            match kind_of(e).unwrap() {
                Kind::File => {
                    assert_eq!(fmt, libc::S_IFREG, "{p}: not a file");
                    assert_eq!(n.content, self.contents[p], "{p}: content");
                    assert_eq!(n.size, e.size, "{p}: size");
                }
                Kind::Dir => assert_eq!(fmt, libc::S_IFDIR, "{p}: not a directory"),
                Kind::Symlink => {
                    assert_eq!(fmt, libc::S_IFLNK, "{p}: not a symlink");
                    assert_eq!(n.content, e.target.to_vec(), "{p}: target");
                }
            }
            if kind_of(e) != Some(Kind::Symlink) {
                assert_eq!(n.mode & 0o7777, e.mode, "{p}: mode");
            }
            let mt = n.mtime.0 * 1_000_000_000 + n.mtime.1;
            assert_eq!(mt, e.mtime_ns, "{p}: mtime");
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let mut w = World::new();
    for s in steps.iter().take(6) {
        match s {
            Step::Generation { ops, replay } => {
                if !w.generation(ops, *replay) {
                    break;
                }
            }
            Step::Plant { path, what } => w.plant(path, what),
        }
    }
});
