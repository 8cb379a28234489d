//! Forgetting snapshots and pruning the packs nothing needs any more, crash-safely: a kill at
//! any point never loses a chunk a kept snapshot needs (ARCHITECTURE.md, "History", "Prune").
//!
//! Order: decide (retention) → delete forgotten snapshot files, fsync → compute live chunks
//! from the kept snapshots → delete packs holding no chunk that no other kept pack holds, fsync
//! → repack packs that are mostly dead: the new pack is installed durably before the old one is
//! deleted. Every durable step calls a hook, so tests can kill the process at each of them.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use crate::disk::crashsafe::fsync_dir;
use crate::history::HistoryError;
use crate::history::id::{ChunkId, PackId, SnapshotId};
use crate::history::index::{Index, PackMeta};
use crate::history::pack::{self, PackWriter, Stored};
use crate::history::record::PACK_TARGET;
use crate::history::retention::{self, Footprint, Retention};
use crate::history::snapshot::SnapshotInfo;
use crate::history::store::{State, Store, unix_ms};

/// What `forget` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Snapshots dropped by the time rules.
    pub forgotten: Vec<SnapshotId>,
    /// Snapshots dropped to fit the disk budget (the agent warns about these).
    pub for_budget: Vec<SnapshotId>,
    pub kept: usize,
    pub packs_deleted: usize,
    pub packs_written: usize,
    /// Bytes of packs before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// A durable step of a prune, reported to the hook right after it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    SnapshotDeleted(SnapshotId),
    SnapshotsSynced,
    PackDeleted(PackId),
    PacksSynced,
    /// A repacked pack is complete under `tmp/`, not yet in `packs/`.
    PackSealed(PackId),
    PackInstalled(PackId),
}

/// A pack is repacked when less than this fraction of its stored bytes is live.
const REPACK_BELOW: f64 = 0.5;

/// Chunks the kept snapshots need, counted per snapshot so one can be dropped for the budget.
struct Live<'a> {
    index: &'a Index,
    counts: HashMap<ChunkId, u32>,
    /// Each kept snapshot's distinct chunks, by its position in the list (budget only).
    per: HashMap<usize, Vec<ChunkId>>,
    bytes: u64,
}

impl Live<'_> {
    fn add(&mut self, chunks: &[ChunkId]) {
        for c in chunks {
            let n = self.counts.entry(*c).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.bytes += self
                    .index
                    .get(c)
                    .map_or(0, |(_, s)| u64::from(s.stored_len));
            }
        }
    }
}

impl Footprint for Live<'_> {
    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn drop_snapshot(&mut self, i: usize) {
        for c in self.per.remove(&i).unwrap_or_default() {
            if let Some(n) = self.counts.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&c);
                    self.bytes -= self
                        .index
                        .get(&c)
                        .map_or(0, |(_, s)| u64::from(s.stored_len));
                }
            }
        }
    }
}

/// What to do with the packs.
#[derive(Default)]
struct Plan {
    delete: Vec<PackId>,
    /// Packs to rewrite, with the live chunks to copy out of each.
    repack: Vec<(PackId, Vec<Stored>)>,
}

impl Store {
    /// Applies `retention` at time `now` and prunes the packs.
    pub fn forget(&self, retention: &Retention, now: SystemTime) -> Result<Pruned, HistoryError> {
        self.forget_with(retention, now, &mut |_| {})
    }

    /// [`Store::forget`], calling `hook` after each durable step (tests stop the process there).
    pub fn forget_with(
        &self,
        retention: &Retention,
        now: SystemTime,
        hook: &mut dyn FnMut(&Step),
    ) -> Result<Pruned, HistoryError> {
        let mut writer = self.writer();
        writer.runs.clear();
        let mut state = self.state_mut();
        let done = self.prune(&mut state, retention, now, hook);
        // The index may have lost chunks, even when a step failed part-way.
        if let Some(known) = writer.known.as_mut() {
            known.retain(|_, chunks| chunks.iter().all(|c| state.index.contains(c)));
        }
        done
    }

    /// [`Store::forget_with`] with the writer and the state held.
    fn prune(
        &self,
        state: &mut State,
        retention: &Retention,
        now: SystemTime,
        hook: &mut dyn FnMut(&Step),
    ) -> Result<Pruned, HistoryError> {
        if let Some((file, reason)) = state
            .damaged
            .iter()
            .find(|(f, _)| f.starts_with(self.snapshots_dir()))
        {
            // Its chunks would look dead: deleting them could destroy a snapshot that is only
            // unreadable for now.
            return Err(HistoryError::BadSnapshot {
                path: file.clone(),
                reason: format!("{reason}; prune refuses to run until it is replaced or removed"),
            });
        }
        let infos = state.snapshots.clone();
        let times: Vec<u64> = infos.iter().map(|s| s.time_ms).collect();
        let mut keep = retention::by_time(&times, unix_ms(now), retention);
        // Live chunks are read before the forgotten snapshots are deleted (the budget needs
        // them to decide), from the kept snapshots only, which no step changes.
        let (live, for_budget) = self.live(state, &infos, &mut keep, retention.budget_bytes)?;
        let mut done = Pruned {
            bytes_before: state.index.stored_bytes(),
            ..Default::default()
        };
        for (i, info) in infos.iter().enumerate().filter(|(i, _)| !keep[*i]) {
            if for_budget.contains(&i) {
                done.for_budget.push(info.id);
            } else {
                done.forgotten.push(info.id);
            }
        }
        self.delete_snapshots(state, &keep, hook)?;
        done.kept = state.snapshots.len();
        let plan = plan(&state.index, &live);
        done.packs_deleted += self.delete_packs(state, &plan.delete, hook)?;
        let (written, deleted) = self.repack(state, plan.repack, hook)?;
        done.packs_written = written;
        done.packs_deleted += deleted;
        done.bytes_after = state.index.stored_bytes();
        Ok(done)
    }

    /// Live chunks of the kept snapshots; with a budget, also drops snapshots to fit it
    /// (returned as positions, and cleared in `keep`).
    fn live(
        &self,
        state: &State,
        infos: &[SnapshotInfo],
        keep: &mut [bool],
        budget: u64,
    ) -> Result<(HashSet<ChunkId>, Vec<usize>), HistoryError> {
        let mut live = Live {
            index: &state.index,
            counts: HashMap::new(),
            per: HashMap::new(),
            bytes: 0,
        };
        for (i, info) in infos.iter().enumerate().filter(|(i, _)| keep[*i]) {
            let snap = self.load(state, info.id)?;
            let mut chunks: Vec<ChunkId> = snap
                .paths
                .iter()
                .flat_map(|p| p.chunks.iter().copied())
                .chain(snap.body.iter().copied())
                .collect();
            chunks.sort_unstable();
            chunks.dedup();
            live.add(&chunks);
            if budget > 0 {
                live.per.insert(i, chunks);
            }
        }
        let dropped = retention::by_budget(keep, budget, &mut live);
        for &i in &dropped {
            keep[i] = false;
        }
        Ok((live.counts.into_keys().collect(), dropped))
    }

    fn delete_snapshots(
        &self,
        state: &mut State,
        keep: &[bool],
        hook: &mut dyn FnMut(&Step),
    ) -> Result<(), HistoryError> {
        let dir = self.snapshots_dir();
        let gone: Vec<SnapshotId> = state
            .snapshots
            .iter()
            .zip(keep)
            .filter(|(_, k)| !**k)
            .map(|(s, _)| s.id)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        for id in &gone {
            let path = self.snapshot_path(id);
            std::fs::remove_file(&path).map_err(HistoryError::io("deleting", &path))?;
            state.snapshots.retain(|s| s.id != *id);
            hook(&Step::SnapshotDeleted(*id));
        }
        // Durable before any pack goes: a snapshot that came back after a crash would need them.
        fsync_dir(&dir).map_err(HistoryError::io("syncing", &dir))?;
        hook(&Step::SnapshotsSynced);
        Ok(())
    }

    fn delete_packs(
        &self,
        state: &mut State,
        gone: &[PackId],
        hook: &mut dyn FnMut(&Step),
    ) -> Result<usize, HistoryError> {
        if gone.is_empty() {
            return Ok(0);
        }
        for (n, id) in gone.iter().enumerate() {
            let path = self.pack_path(id);
            if let Err(e) = std::fs::remove_file(&path) {
                state.index.remove(&gone[..n]);
                return Err(HistoryError::io("deleting", &path)(e));
            }
            hook(&Step::PackDeleted(*id));
        }
        state.index.remove(gone);
        let dir = self.packs_dir();
        fsync_dir(&dir).map_err(HistoryError::io("syncing", &dir))?;
        hook(&Step::PacksSynced);
        Ok(gone.len())
    }

    /// Copies the live chunks of mostly dead packs into new packs, installs them durably, then
    /// deletes the old ones. A pack with a chunk that does not read back is left alone (verify
    /// reports it). Returns packs written and deleted.
    fn repack(
        &self,
        state: &mut State,
        repack: Vec<(PackId, Vec<Stored>)>,
        hook: &mut dyn FnMut(&Step),
    ) -> Result<(usize, usize), HistoryError> {
        let mut writer: Option<PackWriter> = None;
        let mut copied = Vec::new();
        let mut written = 0;
        for (old, chunks) in repack {
            let Some(data) = self.read_live(&old, &chunks) else {
                continue;
            };
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(PackWriter::create(&self.tmp_dir())?),
            };
            for (s, stored) in chunks.iter().zip(data) {
                w.add_stored(s.id, &stored, s.raw_len as usize, s.coding)?;
            }
            copied.push(old);
            if w.len() >= PACK_TARGET {
                self.install_repacked(state, writer.take(), hook)?;
                written += 1;
            }
        }
        if writer.as_ref().is_some_and(|w| !w.is_empty()) {
            self.install_repacked(state, writer.take(), hook)?;
            written += 1;
        }
        let deleted = self.delete_packs(state, &copied, hook)?;
        Ok((written, deleted))
    }

    /// The stored bytes of `chunks` in `pack`, each verified; `None` if any does not read back.
    fn read_live(&self, pack: &PackId, chunks: &[Stored]) -> Option<Vec<Vec<u8>>> {
        let path = self.pack_path(pack);
        let read = || -> Result<Vec<Vec<u8>>, HistoryError> {
            let f = std::fs::File::open(&path).map_err(HistoryError::io("opening", &path))?;
            chunks
                .iter()
                .map(|s| {
                    let stored = pack::read_stored(&f, &path, s)?;
                    pack::decode(stored.clone(), &path, s)?;
                    Ok(stored)
                })
                .collect()
        };
        read()
            .inspect_err(|e| tracing::warn!(error = %e, "pack not repacked"))
            .ok()
    }

    fn install_repacked(
        &self,
        state: &mut State,
        writer: Option<PackWriter>,
        hook: &mut dyn FnMut(&Step),
    ) -> Result<(), HistoryError> {
        let Some(writer) = writer else { return Ok(()) };
        let sealed = writer.seal()?;
        hook(&Step::PackSealed(sealed.id));
        sealed.install(&self.packs_dir())?;
        hook(&Step::PackInstalled(sealed.id));
        state.index.add(
            sealed.id,
            PackMeta {
                size: sealed.size,
                chunks: sealed.chunks,
            },
        );
        Ok(())
    }
}

/// Decides which packs go and which are rewritten. Packs are taken fullest first (by live
/// fraction); a pack is needed only if it holds a live chunk no pack taken before it holds.
/// So after an interrupted repack the new, fully live pack covers its chunks and the old one is
/// deleted the next time; a pack is never deleted while it alone holds a live chunk.
fn plan(index: &Index, live: &HashSet<ChunkId>) -> Plan {
    let mut packs: Vec<(f64, PackId, &PackMeta)> = index
        .packs()
        .map(|(id, meta)| {
            let total: u64 = meta.chunks.iter().map(|c| u64::from(c.stored_len)).sum();
            let alive: u64 = meta
                .chunks
                .iter()
                .filter(|c| live.contains(&c.id))
                .map(|c| u64::from(c.stored_len))
                .sum();
            let fraction = if total == 0 {
                0.0
            } else {
                alive as f64 / total as f64
            };
            (fraction, *id, meta)
        })
        .collect();
    packs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut covered: HashSet<ChunkId> = HashSet::new();
    let mut plan = Plan::default();
    for (fraction, id, meta) in packs {
        let first: Vec<Stored> = meta
            .chunks
            .iter()
            .filter(|c| live.contains(&c.id) && !covered.contains(&c.id))
            .cloned()
            .collect();
        if first.is_empty() {
            plan.delete.push(id);
            continue;
        }
        covered.extend(first.iter().map(|c| c.id));
        if fraction < REPACK_BELOW {
            plan.repack.push((id, first));
        }
    }
    plan
}
