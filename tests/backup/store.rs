//! Stores of the snapshot store's layout, written by hand (`packs/<blake3>.pack`,
//! `snapshots/<id>.snap`), with plaintext the tests then look for in the bucket.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Text every pack and snapshot carries, so a grep of the bucket would find it if anything
/// went up in the clear.
pub const MARKER: &[u8] = b"PLAINTEXT-MARKER ckpt/step-900.pt";

pub struct Store {
    pub dir: tempfile::TempDir,
    /// Snapshot local names in the order made, with the packs each uses.
    pub snapshots: Vec<(String, Vec<String>)>,
}

/// `len` bytes from `seed` (a blake3 stream), the marker at the start and every 1 MiB.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    let mut at = 0;
    while at + MARKER.len() <= len {
        out[at..at + MARKER.len()].copy_from_slice(MARKER);
        at += 1 << 20;
    }
    out
}

impl Store {
    pub fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        for d in ["packs", "snapshots", "tmp"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Store {
            dir,
            snapshots: Vec::new(),
        }
    }

    /// The usual store: three snapshots over five packs, one of them 20 MiB (a multipart
    /// upload), the first pack used only by the first snapshot.
    pub fn standard() -> Store {
        let mut s = Store::new();
        let p: Vec<String> = [
            (1, 100_000),
            (2, 150_000),
            (3, 20 << 20),
            (4, 70_000),
            (5, 1),
        ]
        .into_iter()
        .map(|(seed, len)| s.add_pack(&content(seed, len)))
        .collect();
        s.add_snapshot(1, &[&p[0], &p[1]]);
        s.add_snapshot(2, &[&p[1], &p[2], &p[3]]);
        s.add_snapshot(3, &[&p[1], &p[2], &p[3], &p[4]]);
        s
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a pack named by its blake3; its local name.
    pub fn add_pack(&self, bytes: &[u8]) -> String {
        let local = format!("packs/{}.pack", blake3::hash(bytes).to_hex());
        let tmp = self.path().join("tmp/pack");
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, self.path().join(&local)).unwrap();
        local
    }

    /// Writes snapshot `n` naming `packs`, its time `n` minutes after a fixed instant.
    pub fn add_snapshot(&mut self, n: u64, packs: &[&String]) -> String {
        let local = format!("snapshots/{:016x}.snap", 0xabc0_0000_0000 + n);
        let mut text = MARKER.to_vec();
        for p in packs {
            text.extend_from_slice(format!("\n{p}").as_bytes());
        }
        let path = self.path().join(&local);
        fs::write(&path, &text).unwrap();
        let f = fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(Self::time(n)).unwrap();
        self.snapshots
            .push((local.clone(), packs.iter().map(|p| p.to_string()).collect()));
        local
    }

    pub fn time(n: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000 + n * 60)
    }

    pub fn remove(&self, local: &str) {
        fs::remove_file(self.path().join(local)).unwrap();
    }

    /// Every pack and snapshot file, by local name.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        files(self.path())
    }

    /// Local names of packs, snapshot ids and the marker: none may appear in the bucket.
    pub fn secrets(&self) -> Vec<Vec<u8>> {
        let mut out = vec![MARKER.to_vec()];
        for name in self.files().keys() {
            let stem = name.split_once('/').unwrap().1.split_once('.').unwrap().0;
            out.push(stem.as_bytes().to_vec());
        }
        out
    }
}

/// Packs and snapshots under `dir`, by local name; any other file is an error.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for d in ["packs", "snapshots"] {
        let Ok(entries) = fs::read_dir(dir.join(d)) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            let name = format!("{d}/{}", e.file_name().to_string_lossy());
            out.insert(name, fs::read(e.path()).unwrap());
        }
    }
    out
}

/// The entries of `dir` besides `packs` and `snapshots` (a finished restore leaves none).
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with("packs") && !p.ends_with("snapshots"))
        .collect()
}
