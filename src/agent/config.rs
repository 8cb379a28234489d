//! What an agent runs with, whichever its role: built once from the command line by
//! [`crate::agent::args`], read by the [`runtime`](crate::agent::runtime) and the tasks it starts.

use std::path::PathBuf;
use std::time::Duration;

use crate::backup::{BucketConfig, Credentials};
use crate::history::Retention;
use crate::replication::continuous::LoopConfig;
use crate::trust::identity::Role;
use crate::trust::seal::BackupKey;

/// Everything an agent needs to run.
#[derive(Debug)]
pub struct AgentConfig {
    pub role: Role,
    pub workspace: PathBuf,
    pub state_dir: PathBuf,
    pub tls_dir: Option<PathBuf>,
    /// Static pair (GPU): the CPU agent to replicate to.
    pub peer: Option<String>,
    pub coordinator: Option<String>,
    pub join_token: Option<String>,
    pub listen: String,
    /// Where the agent's own `/metrics` is served (None: nowhere).
    pub metrics_listen: Option<String>,
    pub advertise: String,
    pub machine: String,
    pub heartbeat: Duration,
    pub loop_cfg: LoopConfig,
    pub compress_level: i32,
    /// Bytes per second the replication stream may carry when this agent sends (None: any).
    pub bwlimit: Option<u64>,
    pub on_promote: String,
    pub on_demote: String,
    /// Keep the sender's setuid and setgid bits on replicated files (masked when false).
    pub keep_setuid: bool,
    /// A CPU standby's history and its retention (None: no history kept).
    pub history: Option<Retention>,
    /// The history's off-site backup (None: none).
    pub backup: Option<BackupSettings>,
}

/// Where and how the history is backed up off-site (ARCHITECTURE.md, "Off-site backup").
#[derive(Debug, Clone)]
pub struct BackupSettings {
    pub bucket: BucketConfig,
    pub key: BackupKey,
    /// Upload bytes per second (None: no limit).
    pub rate_limit: Option<u64>,
    /// The bucket's access key as the coordinator sent it (None: from the environment).
    pub credentials: Option<Credentials>,
}
