//! What the engine needs to create machines: the providers named by `--provider` and
//! `--cpu-provider`, and the address new machines dial.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::ServeOptions;
use crate::control::engine::{Dial, Provisioning};
use crate::control::provider::ProvisionConfig;
use crate::control::store::Store;
use crate::trust::pki::Ca;

type DynProvider = Arc<dyn crate::control::provider::Provider>;

/// The provider called `name`, built from the options (None for "none").
fn make_provider(name: &str, opts: &ServeOptions) -> anyhow::Result<Option<DynProvider>> {
    let dir = &opts.dir;
    Ok(match name {
        "none" | "" => None,
        "local" => {
            let mut l = crate::control::provider::local::Local::new(
                dir.join("machines"),
                opts.local_bin_dir
                    .clone()
                    .unwrap_or_else(crate::control::provider::local::Local::default_bin_dir),
                opts.timing.heartbeat,
            );
            l.extra_args = opts.local_agent_args.clone();
            Some(Arc::new(l))
        }
        "vastai" => {
            let p = crate::control::provider::vastai::VastAi::new(opts.vastai.clone())?;
            Some(Arc::new(p))
        }
        "gcp" => {
            let creds = crate::control::provider::gcp::Gcp::credentials_path(&opts.gcp)?;
            Some(Arc::new(crate::control::provider::gcp::Gcp::new(
                opts.gcp.clone(),
                &creds,
            )?))
        }
        "command" => Some(Arc::new(
            crate::control::provider::command::CommandProvider::new(opts.command.clone())?,
        )),
        other => anyhow::bail!("unknown provider {other:?} (local, vastai, gcp, command, none)"),
    })
}
/// What the engine needs to create machines (None with the provider `none`: replacements join
/// by hand).
pub(super) fn provisioning(
    opts: &ServeOptions,
    addr: SocketAddr,
    store: &Arc<dyn Store>,
    ca: &Ca,
    token_key: &[u8],
) -> anyhow::Result<Option<Provisioning>> {
    let Some((gpu, cpu)) = providers(opts)? else {
        return Ok(None);
    };
    Ok(Some(Provisioning {
        gpu,
        cpu,
        cfg: provision_config(opts),
        dial: Dial {
            own: coordinator_url(opts, addr),
            group: store.clone(),
        },
        token_key: token_key.to_vec(),
        fingerprint: ca.fingerprint(),
    }))
}

/// The GPU and the CPU providers: both or neither.
fn providers(opts: &ServeOptions) -> anyhow::Result<Option<(DynProvider, DynProvider)>> {
    let gpu = make_provider(&opts.provider, opts)?;
    let cpu = match opts.cpu_provider.as_str() {
        "" => gpu.clone(),
        name if name == opts.provider => gpu.clone(),
        name => make_provider(name, opts)?,
    };
    match (gpu, cpu) {
        (Some(gpu), Some(cpu)) => Ok(Some((gpu, cpu))),
        (None, None) => Ok(None),
        _ => anyhow::bail!(
            "--provider none and --cpu-provider must go together (a pair provisions both roles or neither)"
        ),
    }
}

/// The coordinator as new machines dial it: `--advertise`, else the bound address (loopback
/// when bound to all interfaces).
pub(super) fn coordinator_url(opts: &ServeOptions, addr: SocketAddr) -> String {
    if !opts.advertise.is_empty() {
        opts.advertise.clone()
    } else if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

fn provision_config(opts: &ServeOptions) -> ProvisionConfig {
    let mut cfg = opts.provision.clone();
    if [opts.provider.as_str(), opts.cpu_provider.as_str()].contains(&"command") {
        // The scripts' own limit answers first, with their output in the error.
        let own = opts
            .command
            .timeout
            .unwrap_or(crate::control::provider::command::DEFAULT_TIMEOUT);
        cfg.call_timeout = cfg.call_timeout.max(own + Duration::from_secs(15));
    }
    cfg
}
