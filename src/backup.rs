//! Off-site backup of the snapshot store to an S3-compatible bucket, sealed on this machine
//! with the coordinator's backup key, and disaster recovery from the bucket alone
//! (ARCHITECTURE.md, "Off-site backup"). A layer above `history`'s files and below `agent`;
//! `control` never uses it (the coordinator holds the key, never the data).
//!
//! - [`layout`]: the store's files as the backup sees them, and the entry head inside each
//!   object.
//! - [`bucket`]: the bucket (`object_store`'s S3 backend, path style by default).
//! - [`journal`]: what this machine has put in the bucket, durably.
//! - [`upload`]: the mirror pass: upload what is missing, packs before snapshots, then delete,
//!   snapshots before packs.
//! - [`restore`]: bucket → a fresh store directory, verified object by object.

pub mod bucket;
pub mod journal;
pub mod layout;
pub mod restore;
pub mod upload;

pub use bucket::{Bucket, BucketConfig, BucketError, Credentials};
pub use restore::{Pick, RestoreError, Restored, restore, snapshots};
pub use upload::{Figures, Mirror, UploadError, UploadOptions};
