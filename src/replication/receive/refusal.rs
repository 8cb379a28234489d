//! How the receiver says no: the statuses a sender gets back.

use std::io;

use tonic::Status;

/// A message the sender should never have sent.
pub(super) fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// A local i/o failure while `what`. A full disk is its own status: the sender can tell the
/// operator, and nothing was committed.
pub(super) fn status_io(what: &str, e: io::Error) -> Status {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        Status::resource_exhausted(format!(
            "receiver disk full while {what}: {e}; the generation is not committed and the previous one is intact"
        ))
    } else {
        Status::internal(format!("receiver i/o error while {what}: {e}"))
    }
}
