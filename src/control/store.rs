//! The coordinator's durable state behind a [`Store`] trait: pairs (with their epochs, states and
//! machines), used join tokens, and the certificates it issued (`certs`: which machine holds
//! each, whether it was revoked; kept until they expire).
//!
//! [`FileStore`] is the embedded default: an append-only log of framed, checksummed entries (the
//! latest entry for a pair wins) that is compacted into a fresh log once it is mostly stale. A
//! durable `put` is fsynced before it returns; many pairs written together cost one fsync.
//! `etcd::EtcdStore` (the `etcd` feature) keeps the same state in etcd for highly available
//! coordinators: leader election, and every write guarded by the leader key; `ha` holds its
//! settings, which every build reads.
//! `MemStore` serves tests, with a restart that keeps only what was made durable.
//!
//! A log written before the pair state, roles and phase were enums is migrated when it is opened
//! (`legacy`), and rewritten at once in the new form.

pub mod certs;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod ha;
pub mod legacy;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message;

use crate::disk::crashsafe::{self, FrameError, frame, kind, read_frame};
use crate::proto::state::{IssuedCert, PairRecord, StoreEntry, UsedToken, store_entry};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store {path}: corrupt entry at offset {offset}")]
    Corrupt { path: PathBuf, offset: u64 },
    #[error("store {path}: {source}")]
    Legacy {
        path: PathBuf,
        #[source]
        source: legacy::Refused,
    },
    #[error("etcd: {0}")]
    EtcdConfig(String),
    #[cfg(feature = "etcd")]
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("etcd {op}: no answer within {after:?}")]
    EtcdTimeout {
        op: &'static str,
        after: std::time::Duration,
    },
    #[error("etcd: the value of {key} does not decode")]
    EtcdCorrupt { key: String },
    #[error("not the leader: only the leading coordinator writes the state")]
    NotLeader,
    #[error(
        "deposed: the leader key is no longer this coordinator's (our term {term}, the key's {now}, 0: none); not written"
    )]
    Deposed { term: i64, now: i64 },
    #[error(
        "the leader's lease was not renewed within its deadline (term {term}); stepping down, not written"
    )]
    LeaseLapsed { term: i64 },
    #[error(
        "etcd holds the state of another CA ({theirs}, ours {ours}): copy the first coordinator's directory (ca.pem, ca.key, token.key, backup.key) or use another --etcd-prefix"
    )]
    ForeignCa { ours: String, theirs: String },
}

/// What a store holds.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub pairs: HashMap<String, PairRecord>,
    pub used_tokens: HashMap<String, u64>,
    /// Issued certificates by serial (hex).
    pub certs: HashMap<String, IssuedCert>,
}

impl Snapshot {
    /// Forgets used tokens that have expired, and certificates no renewal grace lets in any
    /// more (nothing can present them).
    fn prune(&mut self, now_unix: u64) {
        self.used_tokens.retain(|_, exp| *exp > now_unix);
        self.certs.retain(|_, c| certs::kept(c, now_unix));
    }

    fn live(&self) -> u64 {
        (self.pairs.len() + self.used_tokens.len() + self.certs.len()) as u64
    }
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Writes these pairs; `durable` waits until they are on disk.
    fn put_pairs(&self, pairs: &[PairRecord], durable: bool) -> Result<(), StoreError>;
    fn delete_pair(&self, name: &str) -> Result<(), StoreError>;
    /// Records a token as used, durably. False when it already was (a replay).
    fn use_token(&self, nonce: &str, expires_unix: u64) -> Result<bool, StoreError>;
    /// Records issued certificates (new, or revoked since), durably.
    fn put_certs(&self, certs: &[IssuedCert]) -> Result<(), StoreError>;
    /// The term every command to agents carries: the leader's on etcd (0 once deposed, so
    /// agents that saw the term refuse what it still sends), 0 for a store without election.
    fn term(&self) -> u64 {
        0
    }
    /// Who leads and which coordinators share the state (`coordinator status`); None for a
    /// store without election.
    fn coordinators(&self) -> Result<Option<Coordinators>, StoreError> {
        Ok(None)
    }
}

/// The coordinators sharing one etcd state, as etcd says at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coordinators {
    /// The leader key's address (empty: no leader now) and term (its create revision).
    pub leader: String,
    pub term: i64,
    /// The address of every coordinator whose membership record lives (under its own lease, so a
    /// dead coordinator's goes within the lease's TTL), sorted.
    pub members: Vec<String>,
    /// The etcd client URLs this coordinator was given.
    pub endpoints: Vec<String>,
}

const LOG_KIND: u16 = kind::RECORD + 100;

pub struct FileStore {
    path: PathBuf,
    inner: Mutex<FileInner>,
}

struct FileInner {
    log: File,
    state: Snapshot,
    entries: u64,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Decodes the entry framed at `offset`, migrating a pair from before the enums (true when it
/// was).
fn read_entry(path: &Path, offset: u64, bytes: &[u8]) -> Result<(StoreEntry, bool), StoreError> {
    let mut e = StoreEntry::decode(bytes).map_err(|_| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset,
    })?;
    let migrated = legacy::migrate_entry(&mut e, bytes).map_err(|source| StoreError::Legacy {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((e, migrated))
}

fn apply(state: &mut Snapshot, e: StoreEntry) {
    match e.entry {
        Some(store_entry::Entry::Pair(p)) => {
            state.pairs.insert(p.name.clone(), p);
        }
        Some(store_entry::Entry::DeletedPair(n)) => {
            state.pairs.remove(&n);
        }
        Some(store_entry::Entry::Token(t)) => {
            state.used_tokens.insert(t.nonce, t.expires_unix);
        }
        Some(store_entry::Entry::Cert(c)) => {
            state.certs.insert(c.serial.clone(), c);
        }
        None => {}
    }
}

impl FileStore {
    /// Opens (or creates) `<dir>/coordinator.log`.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let path = dir.join("coordinator.log");
        let mut state = Snapshot::default();
        let mut entries = 0;
        let mut migrated = 0;
        if let Ok(f) = File::open(&path) {
            let len = f.metadata().map_err(io_at(&path))?.len();
            let mut r = BufReader::new(f);
            let mut offset = 0u64;
            loop {
                match read_frame(&mut r, LOG_KIND) {
                    Ok(None) => break,
                    Ok(Some(p)) => {
                        offset += p.len() as u64 + 48;
                        let (e, old) = read_entry(&path, offset, &p)?;
                        migrated += u64::from(old);
                        apply(&mut state, e);
                        entries += 1;
                    }
                    // A torn last entry (crash during an append): it never counted.
                    Err(FrameError::Truncated | FrameError::Checksum | FrameError::Magic)
                        if len.saturating_sub(offset) < (1 << 20) =>
                    {
                        tracing::warn!(offset, "cutting a torn entry off the coordinator store");
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(io_at(&path))?;
                        f.set_len(offset).map_err(io_at(&path))?;
                        f.sync_all().map_err(io_at(&path))?;
                        break;
                    }
                    Err(_) => {
                        return Err(StoreError::Corrupt {
                            path: path.clone(),
                            offset,
                        });
                    }
                }
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let store = FileStore {
            path,
            inner: Mutex::new(FileInner {
                log,
                state,
                entries,
            }),
        };
        if migrated > 0 {
            tracing::info!(
                entries = migrated,
                "migrated records from before the enums; rewriting the coordinator store"
            );
            store.compact(&mut store.inner.lock().expect("store lock"))?;
        }
        store.compact_if_stale()?;
        Ok(store)
    }

    fn append(&self, entries: &[StoreEntry], durable: bool) -> Result<(), StoreError> {
        let mut g = self.inner.lock().expect("store lock");
        self.write_locked(&mut g, entries, durable)?;
        drop(g);
        self.compact_if_stale()
    }

    /// Appends under the caller's lock, so a check made under the same lock still holds.
    fn write_locked(
        &self,
        g: &mut FileInner,
        entries: &[StoreEntry],
        durable: bool,
    ) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for e in entries {
            buf.extend(frame(LOG_KIND, &e.encode_to_vec()));
        }
        g.log.write_all(&buf).map_err(io_at(&self.path))?;
        if durable {
            g.log.sync_data().map_err(io_at(&self.path))?;
        }
        for e in entries {
            apply(&mut g.state, e.clone());
        }
        g.entries += entries.len() as u64;
        Ok(())
    }

    /// Rewrites the log with only live entries once most of it is stale.
    fn compact_if_stale(&self) -> Result<(), StoreError> {
        let mut g = self.inner.lock().expect("store lock");
        g.state.prune(crate::host::unix_ms_now() / 1000);
        let live = g.state.live();
        if g.entries < 1024 || g.entries < 4 * live {
            return Ok(());
        }
        self.compact(&mut g)
    }

    /// Rewrites the log with only the live entries (crash-safely: the old log stays whole until
    /// the new one replaces it).
    fn compact(&self, g: &mut FileInner) -> Result<(), StoreError> {
        let live = g.state.live();
        let mut buf = Vec::new();
        for p in g.state.pairs.values() {
            let e = StoreEntry {
                entry: Some(store_entry::Entry::Pair(p.clone())),
            };
            buf.extend(frame(LOG_KIND, &e.encode_to_vec()));
        }
        for (n, exp) in &g.state.used_tokens {
            let e = StoreEntry {
                entry: Some(store_entry::Entry::Token(UsedToken {
                    nonce: n.clone(),
                    expires_unix: *exp,
                })),
            };
            buf.extend(frame(LOG_KIND, &e.encode_to_vec()));
        }
        for c in g.state.certs.values() {
            let e = StoreEntry {
                entry: Some(store_entry::Entry::Cert(c.clone())),
            };
            buf.extend(frame(LOG_KIND, &e.encode_to_vec()));
        }
        crashsafe::write_atomic(&self.path, &buf).map_err(io_at(&self.path))?;
        g.log = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_at(&self.path))?;
        g.entries = live;
        Ok(())
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self.inner.lock().expect("store lock").state.clone())
    }

    fn put_pairs(&self, pairs: &[PairRecord], durable: bool) -> Result<(), StoreError> {
        let entries: Vec<StoreEntry> = pairs
            .iter()
            .map(|p| StoreEntry {
                entry: Some(store_entry::Entry::Pair(p.clone())),
            })
            .collect();
        self.append(&entries, durable)
    }

    fn delete_pair(&self, name: &str) -> Result<(), StoreError> {
        self.append(
            &[StoreEntry {
                entry: Some(store_entry::Entry::DeletedPair(name.to_string())),
            }],
            true,
        )
    }

    fn use_token(&self, nonce: &str, expires_unix: u64) -> Result<bool, StoreError> {
        // Checked and recorded under one lock: of many joins racing with one token, one wins.
        let mut g = self.inner.lock().expect("store lock");
        if g.state.used_tokens.contains_key(nonce) {
            return Ok(false);
        }
        self.write_locked(
            &mut g,
            &[StoreEntry {
                entry: Some(store_entry::Entry::Token(UsedToken {
                    nonce: nonce.to_string(),
                    expires_unix,
                })),
            }],
            true,
        )?;
        drop(g);
        self.compact_if_stale()?;
        Ok(true)
    }

    fn put_certs(&self, certs: &[IssuedCert]) -> Result<(), StoreError> {
        let entries: Vec<StoreEntry> = certs
            .iter()
            .map(|c| StoreEntry {
                entry: Some(store_entry::Entry::Cert(c.clone())),
            })
            .collect();
        self.append(&entries, true)
    }
}

/// An in-memory store for tests: [`MemStore::restart`] keeps only what was written durably.
#[cfg(test)]
#[derive(Default)]
pub struct MemStore {
    durable: Mutex<Snapshot>,
    volatile: Mutex<Snapshot>,
}

#[cfg(test)]
impl MemStore {
    /// What a restarted coordinator would find.
    pub fn restart(&self) -> MemStore {
        let d = self.durable.lock().expect("mem").clone();
        MemStore {
            volatile: Mutex::new(d.clone()),
            durable: Mutex::new(d),
        }
    }
}

#[cfg(test)]
impl Store for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self.volatile.lock().expect("mem").clone())
    }

    fn put_pairs(&self, pairs: &[PairRecord], durable: bool) -> Result<(), StoreError> {
        for p in pairs {
            self.volatile
                .lock()
                .expect("mem")
                .pairs
                .insert(p.name.clone(), p.clone());
            if durable {
                self.durable
                    .lock()
                    .expect("mem")
                    .pairs
                    .insert(p.name.clone(), p.clone());
            }
        }
        Ok(())
    }

    fn delete_pair(&self, name: &str) -> Result<(), StoreError> {
        self.volatile.lock().expect("mem").pairs.remove(name);
        self.durable.lock().expect("mem").pairs.remove(name);
        Ok(())
    }

    fn use_token(&self, nonce: &str, expires_unix: u64) -> Result<bool, StoreError> {
        let mut v = self.volatile.lock().expect("mem");
        if v.used_tokens.contains_key(nonce) {
            return Ok(false);
        }
        v.used_tokens.insert(nonce.into(), expires_unix);
        self.durable
            .lock()
            .expect("mem")
            .used_tokens
            .insert(nonce.into(), expires_unix);
        Ok(true)
    }

    fn put_certs(&self, certs: &[IssuedCert]) -> Result<(), StoreError> {
        for snap in [&self.volatile, &self.durable] {
            let mut g = snap.lock().expect("mem");
            for c in certs {
                g.certs.insert(c.serial.clone(), c.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::failover::{self, PairMachine};
    use crate::proto::state::Phase;
    use crate::proto::{PairState, Role};
    use crate::types::Side;

    fn pair(name: &str, epoch: u64) -> PairRecord {
        PairRecord {
            name: name.into(),
            epoch,
            state: PairState::Syncing.into(),
            ..Default::default()
        }
    }

    #[test]
    fn file_store_survives_reopen_and_compacts() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = FileStore::open(d.path()).unwrap();
            for e in 1..=3000u64 {
                s.put_pairs(&[pair("a", e), pair("b", e)], e % 100 == 0)
                    .unwrap();
            }
            s.delete_pair("b").unwrap();
            assert!(s.use_token("n1", u64::MAX).unwrap());
            assert!(!s.use_token("n1", u64::MAX).unwrap());
        }
        let size = std::fs::metadata(d.path().join("coordinator.log"))
            .unwrap()
            .len();
        assert!(size < 64 * 1024, "log was not compacted: {size} bytes");
        let s = FileStore::open(d.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.pairs["a"].epoch, 3000);
        assert!(!snap.pairs.contains_key("b"));
        assert!(
            !s.use_token("n1", u64::MAX).unwrap(),
            "a used token stays used across restarts"
        );
    }

    /// Issued certificates are read back (the latest entry per serial wins, so a revocation
    /// sticks), survive compaction while they can still be presented (valid, or expired within
    /// the longest renewal grace), and are dropped after.
    #[test]
    fn issued_certificates_are_kept_until_they_expire() {
        let d = tempfile::tempdir().unwrap();
        let now = crate::host::unix_ms_now() / 1000;
        let cert = |serial: &str, not_after_unix: u64, revoked: bool| IssuedCert {
            serial: serial.into(),
            pair: "p".into(),
            role: Role::Gpu.into(),
            machine: "m1".into(),
            not_after_unix,
            revoked,
            revoked_reason: String::new(),
        };
        {
            let s = FileStore::open(d.path()).unwrap();
            let past_grace = now + 1 - certs::MAX_RENEW_GRACE.as_secs();
            s.put_certs(&[
                cert("0a", now + 3600, false),
                cert("0b", past_grace, false),
                cert("0c", now - 60, false),
            ])
            .unwrap();
            s.put_certs(&[cert("0a", now + 3600, true)]).unwrap();
            for e in 1..=2000u64 {
                s.put_pairs(&[pair("a", e)], false).unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let s = FileStore::open(d.path()).unwrap();
        s.compact(&mut s.inner.lock().unwrap()).unwrap();
        drop(s);
        let snap = FileStore::open(d.path()).unwrap().load().unwrap();
        assert!(snap.certs["0a"].revoked, "the revocation was lost");
        assert!(
            !snap.certs.contains_key("0b"),
            "an expired certificate was kept"
        );
    }

    #[test]
    fn torn_tail_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = FileStore::open(d.path()).unwrap();
            s.put_pairs(&[pair("a", 5)], true).unwrap();
        }
        let p = d.path().join("coordinator.log");
        let mut bytes = std::fs::read(&p).unwrap();
        let whole = bytes.clone();
        bytes.extend_from_slice(&whole[..whole.len() / 2]);
        std::fs::write(&p, &bytes).unwrap();
        let s = FileStore::open(d.path()).unwrap();
        assert_eq!(s.load().unwrap().pairs["a"].epoch, 5);
    }

    /// The state and the primary were strings at field numbers 2 and 4, now reserved: such a
    /// record still decodes (nothing is misread as an enum), without them; the migration reads
    /// them from the same bytes.
    #[test]
    fn records_from_before_the_enums_decode_without_their_strings_and_are_migrated() {
        let mut old = vec![0x0a, 1, b'a', 0x12, 10];
        old.extend_from_slice(b"FailedOver");
        old.extend_from_slice(&[0x18, 7, 0x22, 3]);
        old.extend_from_slice(b"cpu");
        let mut rec = PairRecord::decode(&old[..]).unwrap();
        assert_eq!((rec.name.as_str(), rec.epoch), ("a", 7));
        assert_eq!(rec.state(), PairState::Unspecified);
        assert_eq!(rec.primary(), Role::Unspecified);
        assert!(legacy::migrate(&mut rec, &old).unwrap());
        assert_eq!((rec.name.as_str(), rec.epoch), ("a", 7));
        assert_eq!(rec.state(), PairState::FailedOver);
        assert_eq!(rec.primary(), Role::Cpu);
        // Migrated once: nothing is left to fill in.
        assert!(!legacy::migrate(&mut rec, &old).unwrap());
    }

    /// `tag` as a length-delimited field holding `v` (all short here: a one-byte length).
    fn ld(tag: u8, v: &[u8]) -> Vec<u8> {
        assert!(v.len() < 128);
        let mut out = vec![tag << 3 | 2, v.len() as u8];
        out.extend_from_slice(v);
        out
    }

    /// Writes a coordinator log holding these pair records (as bytes), one entry each.
    fn legacy_log(dir: &Path, records: &[Vec<u8>]) {
        let mut log = Vec::new();
        for r in records {
            log.extend(frame(LOG_KIND, &ld(1, r)));
        }
        std::fs::write(dir.join("coordinator.log"), log).unwrap();
    }

    /// A store written before the enums: a failed-over pair (the CPU primary, the failed GPU
    /// waiting to be destroyed) and one provisioning a new GPU. They load as they were, and the
    /// log is rewritten in the new form at once.
    #[test]
    fn a_failed_over_pair_from_before_the_enums_loads_failed_over_with_the_cpu_primary() {
        let d = tempfile::tempdir().unwrap();
        let failed_over = [
            ld(1, b"a"),
            vec![0x18, 7],
            ld(2, b"FailedOver"),
            ld(4, b"cpu"),
            ld(13, &[ld(1, b"sb-a-cpu-1"), ld(3, b"cpu")].concat()),
            ld(14, &[ld(1, b"sb-a-gpu-2"), ld(3, b"gpu")].concat()),
        ]
        .concat();
        let provisioning = [
            ld(1, b"b"),
            vec![0x18, 3],
            ld(2, b"Provisioning"),
            ld(4, b"cpu"),
            ld(
                10,
                &[
                    ld(1, b"gpu"),
                    vec![0x10, 2],
                    ld(3, b"boot"),
                    ld(4, &[ld(1, b"sb-b-gpu-3"), ld(3, b"gpu")].concat()),
                ]
                .concat(),
            ),
        ]
        .concat();
        legacy_log(d.path(), &[failed_over, provisioning]);
        for _reopened in 0..2 {
            let snap = FileStore::open(d.path()).unwrap().load().unwrap();
            let a = &snap.pairs["a"];
            assert_eq!(
                (a.state(), a.primary(), a.epoch),
                (PairState::FailedOver, Role::Cpu, 7)
            );
            assert_eq!(a.cpu_owned.as_ref().unwrap().role(), Role::Cpu);
            assert_eq!(a.teardown[0].role(), Role::Gpu);
            let m = PairMachine::resume(a.clone(), std::time::Instant::now());
            assert_eq!(m.state(), failover::PairState::FailedOver);
            assert_eq!(m.primary(), Side::Cpu);
            let b = &snap.pairs["b"];
            assert_eq!(
                (b.state(), b.primary()),
                (PairState::Provisioning, Role::Cpu)
            );
            let p = b.provision.as_ref().unwrap();
            assert_eq!(
                (p.role(), p.phase(), p.attempt),
                (Role::Gpu, Phase::Boot, 2)
            );
            assert_eq!(p.machine.as_ref().unwrap().role(), Role::Gpu);
        }
        let log = std::fs::read(d.path().join("coordinator.log")).unwrap();
        assert!(
            !log.windows(10).any(|w| w == b"FailedOver"),
            "the log still holds the old strings"
        );
    }

    /// An old string this build does not know is never guessed at: the store does not open,
    /// and says which pair.
    #[test]
    fn an_unknown_string_from_before_the_enums_refuses_the_load() {
        for record in [
            [ld(1, b"a"), ld(2, b"Sinking")].concat(),
            [ld(1, b"a"), ld(2, b"Syncing"), ld(4, b"tpu")].concat(),
            [
                ld(1, b"a"),
                ld(10, &[ld(1, b"gpu"), ld(3, b"warm")].concat()),
            ]
            .concat(),
        ] {
            let d = tempfile::tempdir().unwrap();
            legacy_log(d.path(), &[record]);
            let Err(e) = FileStore::open(d.path()) else {
                panic!("a record with an unknown old string loaded");
            };
            let e = crate::text::error_chain(&e);
            assert!(e.contains("pair a:"), "{e}");
            assert!(e.contains("does not know"), "{e}");
        }
    }

    #[test]
    fn mem_store_restart_keeps_durable_only() {
        let s = MemStore::default();
        s.put_pairs(&[pair("a", 1)], true).unwrap();
        s.put_pairs(&[pair("a", 2)], false).unwrap();
        assert_eq!(s.load().unwrap().pairs["a"].epoch, 2);
        assert_eq!(s.restart().load().unwrap().pairs["a"].epoch, 1);
    }

    /// Joins racing with one token (threads released together, round after round): exactly
    /// one of them may use it.
    #[test]
    fn a_token_used_by_many_at_once_is_used_once() {
        let d = tempfile::tempdir().unwrap();
        each_token_used_once(std::sync::Arc::new(FileStore::open(d.path()).unwrap()), 300);
    }

    /// Four threads released together try the same token, round after round: exactly one
    /// of them uses it each round (also run against etcd).
    pub(crate) fn each_token_used_once(s: std::sync::Arc<dyn Store>, rounds: usize) {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (s, b) = (s.clone(), barrier.clone());
                std::thread::spawn(move || {
                    (0..rounds)
                        .map(|r| {
                            b.wait();
                            s.use_token(&format!("n{r}"), u64::MAX).unwrap() as usize
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let won: Vec<Vec<usize>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for r in 0..rounds {
            assert_eq!(won.iter().map(|w| w[r]).sum::<usize>(), 1, "round {r}");
        }
    }
}
