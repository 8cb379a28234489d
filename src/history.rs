//! Point-in-time history of a replica: content-defined chunks keyed by blake3, packed,
//! deduplicated, kept by a restic-like retention (ARCHITECTURE.md, "History").
//!
//! On disk (a contract with the backup layer and the agent):
//! ```text
//! <dir>/packs/<64 hex>.pack      immutable; named by the blake3 of the whole file
//! <dir>/snapshots/<16 hex>.snap  immutable; id = first 8 bytes of blake3(file), hex
//! <dir>/tmp/                     partial writes; cleared on open
//! ```
//! Every pack ends with a footer listing its chunks, so the chunk index is rebuilt from footers
//! alone on [`Store::open`]: there is no index file to keep consistent, and a directory holding
//! only some snapshots and the packs they need opens and restores.
//!
//! Modules, from the bottom up: `id` (names of things), [`chunker`] (FastCDC), `pack` (the pack
//! format), `snapshot` (the snapshot format), `index` (chunk → pack), [`retention`] (which
//! snapshots to keep, pure), then [`Store`] and its operations: `record`, `restore`, `verify`,
//! `prune`.
//!
//! Driving it:
//! ```text
//! let store = Store::open(dir)?;
//! store.record(replica, &manifest, SystemTime::now())?;   // after each committed generation
//! store.forget(&retention, SystemTime::now())?;           // now and then
//! store.restore(store.find(&Selector::Latest)?.id, None, to)?;
//! ```

pub mod chunker;
mod error;
mod id;
mod index;
mod pack;
mod prune;
mod record;
mod restore;
pub mod retention;
mod snapshot;
mod store;
pub mod unpack;
mod verify;

pub use error::HistoryError;
pub use id::{ChunkId, PackId, SnapshotId};
pub use prune::{Pruned, Step};
pub use record::{Changed, Hint, Phases, Recorded};
pub use restore::{Piece, RestoreSummary, Streamed};
pub use retention::Retention;
pub use snapshot::SnapshotInfo;
pub use store::{Selector, Store, StoreStats};
pub use unpack::{UnpackError, Unpacker};
pub use verify::{Problem, VerifyReport};

#[cfg(test)]
mod tests;
