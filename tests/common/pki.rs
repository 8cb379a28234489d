//! Certificates for tests: a CA with the node certificates of static pairs, and join tokens
//! minted by a coordinator directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use standby::trust::identity::{Identity, Role};
use standby::trust::pki::Ca;

use super::COORDINATOR;

/// A CA and the certificates of one or more pairs, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
        standby::trust::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        ca.save(&dir.path().join("ca")).unwrap();
        Pki { dir, ca }
    }

    /// Writes the certificate of `pair`/`role` and returns its TLS directory.
    pub fn node(&self, pair: &str, role: Role) -> PathBuf {
        let out = self.dir.path().join(format!("{pair}-{role}"));
        if !out.exists() {
            self.ca
                .issue(
                    &Identity::node(pair, role, role.as_str()).unwrap(),
                    standby::trust::pki::days(30),
                    &[],
                )
                .unwrap()
                .write_dir(&out)
                .unwrap();
        }
        out
    }
}

/// `coordinator token` for the coordinator directory `dir`.
pub fn join_token(dir: &Path, pair: &str, role: &str, ttl: &str) -> String {
    let out = Command::new(COORDINATOR)
        .args(["token", "--dir"])
        .arg(dir)
        .args(["--pair", pair, "--role", role, "--ttl", ttl])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
