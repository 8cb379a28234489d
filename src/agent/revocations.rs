//! The agent's copy of the coordinator's revocation list (ARCHITECTURE.md, "Trust"): kept in
//! `<state-dir>/revoked`, loaded before anything is served (so a restarted agent refuses a
//! replaced machine before it hears from the coordinator again), and replaced whole by each
//! `Revocations` command.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::replication::receive::Receiver;
use crate::trust::revocation::DenyList;

/// The list's file in the state directory.
pub const FILE: &str = "revoked";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The list saved by the last run (empty when there is none).
pub fn load(state_dir: &Path) -> anyhow::Result<DenyList> {
    let p = path(state_dir);
    DenyList::load(&p).with_context(|| {
        format!(
            "reading the revocation list {} (the coordinator sends it again: remove the file to start without it)",
            p.display()
        )
    })
}

/// Takes the coordinator's whole current list: every verifier of the agent's material refuses
/// those certificates from the next handshake on, the list is saved, and a replication session
/// whose sender is on it ends now.
pub fn apply(serials: Vec<String>, deny: &DenyList, state_dir: &Path, receiver: &Receiver) {
    match deny.replace(serials) {
        Ok(false) => {}
        Ok(true) => {
            tracing::info!(serials = deny.serials().len(), "revocation list updated");
            if let Err(e) = deny.save(&path(state_dir)) {
                tracing::error!(error = %e, "cannot save the revocation list");
            }
        }
        Err(e) => tracing::error!(error = %e, "revocation list from the coordinator refused"),
    }
    receiver.end_revoked();
}
