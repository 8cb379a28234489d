//! How long each string of an agent's report may be. A report that breaks a limit is refused
//! whole (the service answers INVALID_ARGUMENT naming the field and ends the stream): nothing of
//! it is stored, shown or used. Honest agents never trip these: their machine name is checked
//! when they start, and their free-text fields are cut to [`FREE_TEXT_MAX`] before sending (`crate::text::truncate`).

use crate::proto::AgentReport;
use crate::trust::identity::check_name;

/// The longest `advertise` (a host:port, or a URL).
pub const ADVERTISE_MAX: usize = 255;
/// The longest `workspace` (a path; PATH_MAX).
pub const WORKSPACE_MAX: usize = 4096;
/// The longest free-text field: `last_error`, `gpu.fatal_reason`, `peer.probe_error`.
pub const FREE_TEXT_MAX: usize = crate::text::REPORT_TEXT_MAX;
/// The longest `root`: a blake3 digest in hex.
pub const ROOT_MAX: usize = 64;
/// The longest backup snapshot name in `seed` (`latest`, or 16 hex digits).
pub const SNAPSHOT_MAX: usize = 16;

/// A report field over its limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("report field {field}: {why}")]
pub struct Oversized {
    pub field: &'static str,
    pub why: String,
}

/// Checks every string of `r` against its limit; the first one broken is named.
pub fn check_report(r: &AgentReport) -> Result<(), Oversized> {
    check_name(&r.machine).map_err(|_| Oversized {
        field: "machine",
        why: format!(
            "must be 1 to 63 letters, digits, '-', '_' or '.' starting with a letter or digit \
             ({} bytes given)",
            r.machine.len()
        ),
    })?;
    let gpu = r.gpu.as_ref();
    let peer = r.peer.as_ref();
    let history = r.history.as_ref();
    let seed = r.seed.as_ref();
    let fields: [(&'static str, &str, usize); 11] = [
        ("advertise", &r.advertise, ADVERTISE_MAX),
        ("workspace", &r.workspace, WORKSPACE_MAX),
        ("last_error", &r.last_error, FREE_TEXT_MAX),
        ("root", &r.root, ROOT_MAX),
        (
            "gpu.fatal_reason",
            gpu.map_or("", |g| g.fatal_reason.as_str()),
            FREE_TEXT_MAX,
        ),
        (
            "peer.probe_error",
            peer.map_or("", |p| p.probe_error.as_str()),
            FREE_TEXT_MAX,
        ),
        (
            "history.last_error",
            history.map_or("", |h| h.last_error.as_str()),
            FREE_TEXT_MAX,
        ),
        (
            "history.backup_last_error",
            history.map_or("", |h| h.backup_last_error.as_str()),
            FREE_TEXT_MAX,
        ),
        (
            "seed.asked",
            seed.map_or("", |s| s.asked.as_str()),
            SNAPSHOT_MAX,
        ),
        (
            "seed.snapshot",
            seed.map_or("", |s| s.snapshot.as_str()),
            SNAPSHOT_MAX,
        ),
        (
            "seed.error",
            seed.map_or("", |s| s.error.as_str()),
            FREE_TEXT_MAX,
        ),
    ];
    for (field, value, max) in fields {
        if value.len() > max {
            return Err(Oversized {
                field,
                why: format!("{} bytes, at most {max}", value.len()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GpuHealth, PeerContact};

    fn honest() -> AgentReport {
        AgentReport {
            machine: "sb-1234abcd-p-gpu-1".into(),
            advertise: "203.0.113.7:41022".into(),
            workspace: "/workspace".into(),
            last_error: "connection refused".into(),
            root: "ab".repeat(32),
            gpu: Some(GpuHealth {
                fatal_reason: "Xid 79".into(),
                ..Default::default()
            }),
            peer: Some(PeerContact {
                probe_error: "timed out".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_honest_report_passes_and_each_field_at_its_limit_too() {
        assert_eq!(check_report(&honest()), Ok(()));
        let r = AgentReport {
            machine: "m".repeat(63),
            advertise: "a".repeat(ADVERTISE_MAX),
            workspace: "/".repeat(WORKSPACE_MAX),
            last_error: "e".repeat(FREE_TEXT_MAX),
            ..honest()
        };
        assert_eq!(check_report(&r), Ok(()));
    }

    #[test]
    fn each_oversized_field_is_named() {
        let over = |f: fn(&mut AgentReport)| {
            let mut r = honest();
            f(&mut r);
            check_report(&r).unwrap_err().field
        };
        assert_eq!(over(|r| r.machine = "m".repeat(64)), "machine");
        assert_eq!(over(|r| r.machine = String::new()), "machine");
        assert_eq!(over(|r| r.machine = "gpu 1\n".into()), "machine");
        assert_eq!(over(|r| r.machine = "-gpu".into()), "machine");
        assert_eq!(over(|r| r.advertise = "a".repeat(256)), "advertise");
        assert_eq!(over(|r| r.workspace = "w".repeat(4097)), "workspace");
        assert_eq!(over(|r| r.last_error = "e".repeat(1025)), "last_error");
        assert_eq!(over(|r| r.root = "0".repeat(65)), "root");
        assert_eq!(
            over(|r| r.gpu.as_mut().unwrap().fatal_reason = "x".repeat(1025)),
            "gpu.fatal_reason"
        );
        assert_eq!(
            over(|r| r.peer.as_mut().unwrap().probe_error = "x".repeat(1025)),
            "peer.probe_error"
        );
        let e = check_report(&AgentReport {
            advertise: "a".repeat(300),
            ..honest()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "report field advertise: 300 bytes, at most 255"
        );
    }
}
