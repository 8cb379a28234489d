//! Opening the replica before serving: the stage directory, the catalog, the roll-forward of a
//! generation that committed but was not fully applied, and the adoption of a seeded workspace.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::apply::{Policy, apply_record, clear_stage, prepare_stage, sync_applied};
use super::{CATALOG, OpenError, ReceiverOptions};
use crate::disk::epoch::EpochStore;
use crate::disk::fsx::{self, Root};
use crate::proto::Entry;
use crate::replication::catalog::{Catalog, Loaded};
use crate::replication::manifest::{Kind, Manifest};
use crate::replication::scan::{STAGE_DIR_NAME, open_regular};
use crate::types::{Generation, RelPath};

/// Everything `Receiver::open` found or made on disk.
pub(super) struct Opened {
    pub root: Root,
    pub stage_path: PathBuf,
    pub stage: OwnedFd,
    pub manifest: Manifest,
    pub catalog: Catalog,
    pub epoch: EpochStore,
}

/// Prepares the directories, recovers the catalog and the workspace, and opens the epoch.
pub(super) fn open(opts: &ReceiverOptions) -> Result<Opened, OpenError> {
    std::fs::create_dir_all(&opts.workspace)?;
    std::fs::create_dir_all(&opts.state_dir)?;
    std::fs::set_permissions(&opts.state_dir, std::fs::Permissions::from_mode(0o700))?;
    let stage_path = stage_dir(&opts.workspace, &opts.state_dir)?;
    let root = Root::open(&opts.workspace)?;
    let stage = fsx::open_dir_path(&stage_path)?;
    prepare_stage(stage.as_fd())?;
    let fresh = opts.adopt && !catalog_exists(&opts.state_dir);
    let loaded = Catalog::open(&opts.state_dir, CATALOG)?;
    let (mut manifest, mut catalog) = recover(&root, &stage, loaded, opts.policy())?;
    if fresh {
        manifest = adopt(&opts.workspace, &stage_path)?;
        if !manifest.is_empty() {
            tracing::info!(
                entries = manifest.len(),
                bytes = manifest.total_bytes(),
                "adopted the existing workspace as generation 0"
            );
        }
        catalog.reset(&manifest)?;
    }
    let epoch = EpochStore::open(&opts.state_dir)?;
    Ok(Opened {
        root,
        stage_path,
        stage,
        manifest,
        catalog,
        epoch,
    })
}

/// The stage lives in the state directory when that is on the workspace's filesystem (renames
/// into place must not cross filesystems), else in a reserved directory of the workspace.
fn stage_dir(workspace: &Path, state_dir: &Path) -> io::Result<PathBuf> {
    let stage_path = if same_device(workspace, state_dir)? {
        state_dir.join("stage")
    } else {
        workspace.join(STAGE_DIR_NAME)
    };
    std::fs::create_dir_all(&stage_path)?;
    std::fs::set_permissions(&stage_path, std::fs::Permissions::from_mode(0o700))?;
    Ok(stage_path)
}

fn same_device(a: &Path, b: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(a)?.dev() == std::fs::metadata(b)?.dev())
}

fn catalog_exists(state_dir: &Path) -> bool {
    state_dir.join(format!("{CATALOG}.log")).exists()
        || state_dir.join(format!("{CATALOG}.snap")).exists()
}

/// Rolls forward the last committed generation if its application was cut short, then clears
/// what generations that never committed left in the stage.
fn recover(
    root: &Root,
    stage: &OwnedFd,
    loaded: Loaded,
    bits: Policy,
) -> Result<(Manifest, Catalog), OpenError> {
    let manifest = loaded.manifest;
    let mut catalog = loaded.catalog;
    if let Some(rec) = loaded.unapplied {
        tracing::info!(
            generation = rec.generation,
            "rolling forward a committed generation"
        );
        apply_record(root, stage.as_fd(), &rec, &manifest, bits)?;
        sync_applied(root, &rec, &manifest)?;
        catalog.mark_applied(Generation(rec.generation))?;
        catalog.sync()?;
    }
    let cleared = clear_stage(stage.as_fd())?;
    if cleared > 0 {
        tracing::info!(
            cleared,
            "discarded staged files of a generation that never committed"
        );
    }
    Ok((manifest, catalog))
}

/// Builds generation 0 from what is already in the workspace (hashing every file), so a sender
/// can reuse it as delta bases instead of sending everything again.
pub(super) fn adopt(workspace: &Path, stage_path: &Path) -> io::Result<Manifest> {
    use crate::replication::scan::{Exclude, Scope, walk};
    let ex = Exclude::new(workspace, stage_path);
    let (mut w, _) = walk(workspace, &Scope::Full, &ex);
    let started_ns = crate::host::unix_ms_now() as i64 * 1_000_000;
    crate::replication::attrs::fill(workspace, &mut w, &Manifest::new(), started_ns);
    let hashed: Vec<(RelPath, Entry)> = w
        .entries
        .par_iter()
        .filter_map(|(p, st)| {
            let mut e = st.entry();
            if st.kind == Kind::File {
                match hash_regular(&p.to_path(workspace)) {
                    Ok(Some(hash)) => e.blake3 = hash.as_bytes().to_vec(),
                    Ok(None) => return None,
                    Err(err) => {
                        tracing::warn!(path = %p, error = %err, "cannot read while adopting; leaving it out");
                        return None;
                    }
                }
            }
            Some((p.clone(), e))
        })
        .collect();
    let mut m = Manifest::new();
    for (p, e) in hashed {
        m.insert(p, e);
    }
    Ok(m)
}

/// The blake3 of a regular file, opened without blocking (`None`: not a regular file any more,
/// see [`open_regular`]).
fn hash_regular(path: &Path) -> io::Result<Option<blake3::Hash>> {
    let Some(f) = open_regular(path)? else {
        return Ok(None);
    };
    let mut h = blake3::Hasher::new();
    h.update_reader(f)?;
    Ok(Some(h.finalize()))
}
