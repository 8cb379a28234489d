//! The settings of `coordinator serve`, as the command line and `coordinator.toml` give them.

use std::path::PathBuf;
use std::time::Duration;

use crate::control::failover::{Policy, Timing};
use crate::control::notify::Webhook;
use crate::control::store::ha::HaOptions;
use crate::proto::BackupTarget;

/// Settings of `coordinator serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: String,
    pub metrics_listen: String,
    /// The read-only status page (plain HTTP; None: not served). It shows pair names and
    /// addresses: loopback or a private network (ARCHITECTURE.md, "Status page").
    pub status_listen: Option<String>,
    pub timing: Timing,
    /// How long the certificates issued to agents live (renewed at two thirds).
    pub cert_lifetime: Duration,
    /// How long after it expired an agent's certificate may still connect, to renew only.
    pub renew_grace: Duration,
    /// Where machines come from: "local", "vastai", "gcp", "command" or "none" (replacements
    /// join by hand).
    pub provider: String,
    /// Where CPU standbys come from, when not from `provider` ("" = the same).
    pub cpu_provider: String,
    pub policy: Policy,
    pub provision: crate::control::provider::ProvisionConfig,
    /// The coordinator's address as agents and new machines dial it ("" = the bound address,
    /// loopback when bound to all interfaces). With etcd it is the leader key's value: what
    /// followers name as the leader.
    pub advertise: String,
    /// `local` provider: where the agent binaries are, and extra arguments for them.
    pub local_bin_dir: Option<PathBuf>,
    pub local_agent_args: Vec<String>,
    pub vastai: crate::control::provider::vastai::VastSettings,
    pub gcp: crate::control::provider::gcp::GcpSettings,
    pub command: crate::control::provider::command::CommandSettings,
    /// Serve gRPC reflection (off by default: it maps the whole API for anyone).
    pub reflection: bool,
    /// Answer `grpc.health.v1` without a client certificate (off by default: only clients with
    /// a certificate of our CA, any role, are answered).
    pub public_health: bool,
    /// Where CPU standbys back their history up (`[backup]`; None: they are not told).
    pub backup: Option<BackupPlan>,
    /// `[[notify]]` webhooks, checked (ARCHITECTURE.md, "Notifications").
    pub notify: Vec<Webhook>,
    /// The state in etcd, with leader election (`--store etcd`); None: the file store under
    /// `<dir>/state` (ARCHITECTURE.md, "Highly available coordinators").
    pub ha: Option<HaOptions>,
}

/// The coordinator's `[backup]`: one bucket for the fleet, each pair below its own prefix
/// (`<url>/<pair>`). The key is the coordinator's `backup.key`; the bucket's access key comes
/// from the coordinator's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`). ARCHITECTURE.md, "Off-site backup".
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupPlan {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub virtual_hosted: bool,
    /// Upload bandwidth per CPU standby (`20MB`: per second); none: no limit.
    #[serde(default)]
    pub bandwidth: Option<String>,
}

impl BackupPlan {
    /// The target pairs' CPU agents are sent (each gets its pair's prefix and key), with the
    /// access key.
    pub(super) fn target(&self) -> anyhow::Result<BackupTarget> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        else {
            anyhow::bail!(
                "[backup] needs the bucket's access key in AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY (the coordinator's environment)"
            );
        };
        let bandwidth = match &self.bandwidth {
            Some(b) => {
                crate::cli::parse_size(b).map_err(|e| anyhow::anyhow!("[backup] bandwidth: {e}"))?
            }
            None => 0,
        };
        if !self.url.starts_with("s3://") {
            anyhow::bail!("[backup] url {:?} must start with s3://", self.url);
        }
        Ok(BackupTarget {
            url: self.url.trim_end_matches('/').to_string(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            virtual_hosted: self.virtual_hosted,
            access_key_id: id,
            secret_access_key: secret,
            session_token: env("AWS_SESSION_TOKEN").unwrap_or_default(),
            key_hex: String::new(),
            bandwidth,
        })
    }
}
