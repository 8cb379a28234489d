//! The coordinator's own files of secrets: its server certificate and the join-token key, both
//! under `--dir`, made on first use.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::trust::identity::Role;
use crate::trust::pki::Ca;
use crate::trust::tls::TlsMaterial;
use crate::trust::token::Token;

/// The coordinator's own TLS directory, under its directory.
pub const SERVER_TLS_DIR: &str = "server";

/// The coordinator's own TLS directory (identity `standby://coordinator`, the default host
/// names), issued on demand.
pub fn server_tls(dir: &Path, ca: &Ca) -> anyhow::Result<TlsMaterial> {
    let d = dir.join(SERVER_TLS_DIR);
    if !d.join(crate::trust::pki::CERT_FILE).exists() {
        ca.issue_server(&[])?.write_dir(&d)?;
    }
    Ok(TlsMaterial::load(&d)?)
}

/// The key that signs join tokens (created on first use, mode 0600).
pub fn token_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let p = dir.join("token.key");
    match std::fs::read(&p) {
        Ok(k) if k.len() == 32 => Ok(k),
        Ok(_) => anyhow::bail!("{} is not a 32-byte key", p.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k: [u8; 32] = rand::random();
            crate::trust::pki::write_private(&p, &k)?;
            Ok(k.to_vec())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Mints a join token for `pair`/`role` valid for `ttl`, bound to `machine` when given
/// (otherwise to whichever machine joins with it first).
pub fn mint_token(
    dir: &Path,
    pair: &str,
    role: Role,
    machine: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    crate::trust::identity::check_name(pair)?;
    if let Some(m) = machine {
        crate::trust::identity::check_name(m)?;
    }
    let ca = Ca::load(dir)?;
    let key = token_key(dir)?;
    let exp = crate::host::unix_ms_now() / 1000 + ttl.as_secs().max(1);
    let t = Token::new(pair, role, exp, &ca.fingerprint());
    let t = match machine {
        Some(m) => t.bound_to(m),
        None => t,
    };
    Ok(t.sign(&key))
}
