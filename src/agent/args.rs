//! The agents' command lines: the flags both agents take ([`AgentArgs`]), the ones only one side
//! takes ([`GpuArgs`], [`CpuArgs`]), and the one place where they become an [`AgentConfig`].
//!
//! Precedence is the same for every setting: a flag, then its `STANDBY_*` environment variable
//! (clap resolves those two), then the TOML file given with `--config`, then the default in
//! [`defaults`]. Resolution stops at the first bad setting; the binaries exit 64 with its message.
//!
//! Some flags mean slightly different things on each side (the workspace is the protected
//! directory on the GPU machine, the replica on the CPU standby): each binary rewords their help
//! with `mut_arg`; the doc comments here say what the flag is on either side. `display_order`
//! keeps each binary's `--help` in the order it always had, shared and side flags interleaved
//! (agent-gpu's `--once`, declared in the binary, is 10).

use std::path::PathBuf;

use crate::agent::config::{AgentConfig, BackupSettings};
use crate::backup::BucketConfig;
use crate::cli::{FileConfig, defaults, parse_duration};
use crate::history::Retention;
use crate::replication::continuous::LoopConfig;
use crate::trust::identity::Role;
use crate::trust::seal::BackupKey;

/// The flags both agents take.
#[derive(clap::Args, Debug, Default)]
pub struct AgentArgs {
    /// The workspace: the directory protected on the GPU machine, its replica on the CPU standby.
    #[arg(long, env = "STANDBY_WORKSPACE", display_order = 0)]
    pub workspace: Option<PathBuf>,
    /// Directory for the agent's own state (index or catalog, epoch, certificates).
    #[arg(long, env = "STANDBY_STATE_DIR", display_order = 1)]
    pub state_dir: Option<PathBuf>,
    /// Directory with static certificates (ca.pem, node.pem, node.key).
    #[arg(long, env = "STANDBY_TLS_DIR", display_order = 2)]
    pub tls_dir: Option<PathBuf>,
    /// The coordinator, as host:port; highly available coordinators comma-separated
    /// (`a:7700,b:7700,c:7700`): the agent heartbeats to whichever leads.
    #[arg(
        long,
        env = "STANDBY_COORDINATOR",
        display_order = 4,
        value_name = "HOST:PORT[,...]"
    )]
    pub coordinator: Option<String>,
    /// Single-use token from `coordinator token` (first start only).
    #[arg(long, env = "STANDBY_JOIN_TOKEN", display_order = 5)]
    pub join_token: Option<String>,
    /// Address this agent listens on.
    #[arg(long, env = "STANDBY_LISTEN", display_order = 6)]
    pub listen: Option<String>,
    /// Address others should use to reach this agent, when it differs from --listen (NAT).
    #[arg(long, env = "STANDBY_ADVERTISE", display_order = 7)]
    pub advertise: Option<String>,
    /// Serve this agent's own Prometheus metrics on ADDR (/metrics; managed agents; default:
    /// none).
    #[arg(long, env = "STANDBY_METRICS_LISTEN", display_order = 7)]
    pub metrics_listen: Option<String>,
    /// Machine name reported to the coordinator (default: the host name).
    #[arg(long, env = "STANDBY_MACHINE", display_order = 8)]
    pub machine: Option<String>,
    /// Heartbeat interval.
    #[arg(long, env = "STANDBY_HEARTBEAT_INTERVAL", display_order = 9)]
    pub heartbeat_interval: Option<String>,
    /// Command run (with sh -c, not waited for) when this machine becomes the primary: the
    /// CPU standby at a failover, a restored GPU at cutover (not a pair's first GPU, which is
    /// the primary from the start). Start the application here.
    #[arg(long, env = "STANDBY_ON_PROMOTE", display_order = 10)]
    pub on_promote: Option<String>,
    /// Command run (with sh -c, waited for) before this machine hands the primary role over:
    /// stop the application here.
    #[arg(long, env = "STANDBY_ON_DEMOTE", display_order = 15)]
    pub on_demote: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "STANDBY_CONFIG", display_order = 16)]
    pub config: Option<PathBuf>,
    /// Give files written into this machine's workspace by replication (the CPU's replica, a
    /// restored GPU) the setuid and setgid bits the sender's files have. Off: those bits are
    /// masked, so no file from the other machine becomes a setuid program here.
    #[arg(
        long,
        env = "STANDBY_KEEP_SETUID",
        display_order = 17,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub keep_setuid: Option<bool>,
    /// Most bytes per second this agent's replication stream may carry when it sends (`20MB`,
    /// `500KB`: per second; the GPU normally, the CPU during a restore). None: no limit.
    #[arg(long, env = "STANDBY_BWLIMIT", display_order = 18)]
    pub bwlimit: Option<String>,
}

/// The flags only agent-gpu takes: its static peer and how it sends.
#[derive(clap::Args, Debug, Default)]
pub struct GpuArgs {
    /// The paired agent-cpu of a static pair, as host:port.
    #[arg(long, env = "STANDBY_PEER", display_order = 3)]
    pub peer: Option<String>,
    /// Quiet time after the last change before a generation is sent.
    #[arg(long, env = "STANDBY_DEBOUNCE", display_order = 11)]
    pub debounce: Option<String>,
    /// Longest a change may wait while writes keep coming.
    #[arg(long, env = "STANDBY_MAX_DELAY", display_order = 12)]
    pub max_delay: Option<String>,
    /// Period of the quick-check rescan that catches anything inotify missed.
    #[arg(long, env = "STANDBY_RESCAN_INTERVAL", display_order = 13)]
    pub rescan_interval: Option<String>,
    /// zstd level for data on the wire (0 turns compression off).
    #[arg(long, env = "STANDBY_COMPRESS_LEVEL", display_order = 14)]
    pub compress_level: Option<i32>,
}

/// The flags only agent-cpu takes.
#[derive(clap::Args, Debug, Default)]
pub struct CpuArgs {
    /// Keep point-in-time history: a snapshot after each committed generation, in
    /// `<state-dir>/history` (`--history=false` turns it off).
    #[arg(
        long,
        env = "STANDBY_HISTORY",
        display_order = 20,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub history: Option<bool>,
    /// Keep every snapshot younger than this.
    #[arg(long, env = "STANDBY_KEEP_WITHIN", display_order = 21)]
    pub keep_within: Option<String>,
    /// Then the newest snapshot of each of this many hours.
    #[arg(long, env = "STANDBY_KEEP_HOURLY", display_order = 22)]
    pub keep_hourly: Option<u32>,
    /// Then the newest snapshot of each of this many days.
    #[arg(long, env = "STANDBY_KEEP_DAILY", display_order = 23)]
    pub keep_daily: Option<u32>,
    /// Disk budget of the history: bytes (`20GiB`, `500MB`) or a share of the filesystem
    /// holding the state directory (`25%`); over it, the oldest snapshots go first (a warning).
    #[arg(long, env = "STANDBY_HISTORY_BUDGET", display_order = 24)]
    pub history_budget: Option<String>,
    /// Off-site backup of the history: an S3-compatible bucket, `s3://bucket/prefix` (keys from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "STANDBY_BACKUP_URL", display_order = 25)]
    pub backup_url: Option<String>,
    /// The bucket's endpoint (R2, B2, GCS, MinIO); none for AWS S3.
    #[arg(long, env = "STANDBY_BACKUP_ENDPOINT", display_order = 26)]
    pub backup_endpoint: Option<String>,
    /// The bucket's region (`auto` for R2 and GCS).
    #[arg(long, env = "STANDBY_BACKUP_REGION", display_order = 27)]
    pub backup_region: Option<String>,
    /// The key the backup is encrypted with: the coordinator's `backup.key` (the bucket never
    /// sees it).
    #[arg(long, env = "STANDBY_BACKUP_KEY_FILE", display_order = 28)]
    pub backup_key_file: Option<PathBuf>,
    /// Upload bandwidth per second (`20MB`, `100MiB`); none: no limit.
    #[arg(long, env = "STANDBY_BACKUP_BANDWIDTH", display_order = 29)]
    pub backup_bandwidth: Option<String>,
    /// Virtual-hosted-style requests (AWS S3) instead of path style (R2, B2, GCS, MinIO).
    #[arg(
        long,
        env = "STANDBY_BACKUP_VIRTUAL_HOSTED",
        display_order = 30,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub backup_virtual_hosted: Option<bool>,
}

impl GpuArgs {
    /// agent-gpu's configuration: a static pair (`--peer` with `--tls-dir`) or a coordinator,
    /// never both.
    pub fn resolve(self, mut shared: AgentArgs) -> Result<AgentConfig, String> {
        let file = shared.file(Role::Gpu)?;
        let compress_level = compress_level(&file, self.compress_level)?;
        let peer = file.pick_opt(self.peer, "peer")?;
        let coordinator = file.pick_opt(shared.coordinator.take(), "coordinator")?;
        let tls_dir = file.pick_opt(shared.tls_dir.take(), "tls_dir")?;
        match (&peer, &coordinator) {
            (Some(_), Some(_)) => {
                return Err("give either --peer (static pair) or --coordinator, not both".into());
            }
            (None, None) => return Err("--peer (static pair) or --coordinator is required".into()),
            (Some(_), None) if tls_dir.is_none() => {
                return Err("a static pair needs --tls-dir".into());
            }
            _ => {}
        }
        let on_promote = shared.on_promote.take();
        let on_demote = shared.on_demote.take();
        let base = shared.resolve(&file, Role::Gpu, tls_dir, coordinator)?;
        Ok(AgentConfig {
            peer,
            loop_cfg: LoopConfig {
                debounce: file.pick_duration(self.debounce, "debounce", defaults::DEBOUNCE)?,
                max_delay: file.pick_duration(self.max_delay, "max_delay", defaults::MAX_DELAY)?,
                rescan_interval: file.pick_duration(
                    self.rescan_interval,
                    "rescan_interval",
                    defaults::RESCAN_INTERVAL,
                )?,
            },
            compress_level,
            on_promote: file.pick(on_promote, "on_promote", String::new)?,
            on_demote: file.pick(on_demote, "on_demote", String::new)?,
            ..base
        })
    }
}

impl CpuArgs {
    /// agent-cpu's configuration: static certificates or a coordinator (or both).
    pub fn resolve(self, mut shared: AgentArgs) -> Result<AgentConfig, String> {
        let file = shared.file(Role::Cpu)?;
        let tls_dir = file.pick_opt(shared.tls_dir.take(), "tls_dir")?;
        let coordinator = file.pick_opt(shared.coordinator.take(), "coordinator")?;
        if tls_dir.is_none() && coordinator.is_none() {
            return Err("--tls-dir (static pair) or --coordinator is required".into());
        }
        let on_promote = shared.on_promote.take();
        let on_demote = shared.on_demote.take();
        let base = shared.resolve(&file, Role::Cpu, tls_dir, coordinator)?;
        let history = self.retention(&file, &base.state_dir)?;
        let backup = self.backup(&file)?;
        if backup.is_some() && history.is_none() {
            return Err("--backup-url backs up the history: it needs --history".into());
        }
        Ok(AgentConfig {
            on_promote: file.pick(on_promote, "on_promote", String::new)?,
            on_demote: file.pick(on_demote, "on_demote", String::new)?,
            history,
            backup,
            ..base
        })
    }

    /// The off-site backup, when a bucket is given; its key is read here, so a missing or bad
    /// key stops the agent at start.
    fn backup(&self, file: &FileConfig) -> Result<Option<BackupSettings>, String> {
        let Some(url) = file.pick_opt(self.backup_url.clone(), "backup_url")? else {
            return Ok(None);
        };
        let mut bucket = BucketConfig::new(&url);
        bucket.bucket_and_prefix().map_err(|e| e.to_string())?;
        bucket.endpoint = file.pick_opt(self.backup_endpoint.clone(), "backup_endpoint")?;
        bucket.region = file.pick_opt(self.backup_region.clone(), "backup_region")?;
        bucket.virtual_hosted =
            file.pick(self.backup_virtual_hosted, "backup_virtual_hosted", || {
                false
            })?;
        let key_file: PathBuf = file
            .pick_opt(self.backup_key_file.clone(), "backup_key_file")?
            .ok_or("--backup-url needs --backup-key-file (the coordinator's backup.key)")?;
        let key = BackupKey::load(&key_file)
            .map_err(|e| format!("--backup-key-file {}: {e}", key_file.display()))?;
        let rate_limit = file
            .pick_opt(self.backup_bandwidth.clone(), "backup_bandwidth")?
            .map(|b| crate::cli::parse_size(&b).map_err(|e| format!("--backup-bandwidth: {e}")))
            .transpose()?;
        Ok(Some(BackupSettings {
            bucket,
            key,
            rate_limit,
            credentials: None,
        }))
    }

    /// The history's retention, or None when history is off.
    fn retention(
        &self,
        file: &FileConfig,
        state_dir: &std::path::Path,
    ) -> Result<Option<Retention>, String> {
        if !file.pick(self.history, "history", || true)? {
            return Ok(None);
        }
        let budget = file.pick(self.history_budget.clone(), "history_budget", || {
            defaults::HISTORY_BUDGET.to_string()
        })?;
        let hours = file.pick(self.keep_hourly, "keep_hourly", || defaults::KEEP_HOURLY)?;
        let days = file.pick(self.keep_daily, "keep_daily", || defaults::KEEP_DAILY)?;
        Ok(Some(Retention {
            keep_all_for: file.pick_duration(
                self.keep_within.clone(),
                "keep_within",
                defaults::KEEP_WITHIN,
            )?,
            hourly_for: std::time::Duration::from_secs(u64::from(hours) * 3600),
            daily_for: std::time::Duration::from_secs(u64::from(days) * 86_400),
            budget_bytes: budget_bytes(&budget, state_dir)?,
        }))
    }
}

/// The keys both agents read from `--config` (the side's own keys follow).
const SHARED_KEYS: [&str; 14] = [
    "workspace",
    "state_dir",
    "tls_dir",
    "coordinator",
    "join_token",
    "listen",
    "advertise",
    "machine",
    "heartbeat_interval",
    "on_promote",
    "on_demote",
    "keep_setuid",
    "bwlimit",
    "metrics_listen",
];

/// agent-gpu's own keys.
const GPU_KEYS: [&str; 5] = [
    "peer",
    "debounce",
    "max_delay",
    "rescan_interval",
    "compress_level",
];

/// agent-cpu's own keys.
const CPU_KEYS: [&str; 11] = [
    "history",
    "keep_within",
    "keep_hourly",
    "keep_daily",
    "history_budget",
    "backup_url",
    "backup_endpoint",
    "backup_region",
    "backup_key_file",
    "backup_bandwidth",
    "backup_virtual_hosted",
];

impl AgentArgs {
    /// The `--config` file, refused when it sets a key this side does not read.
    fn file(&self, role: Role) -> Result<FileConfig, String> {
        let file = FileConfig::load(self.config.as_deref())?;
        let own: &[&str] = match role {
            Role::Gpu => &GPU_KEYS,
            Role::Cpu => &CPU_KEYS,
        };
        file.deny_unknown(&[&SHARED_KEYS[..], own].concat())?;
        Ok(file)
    }

    /// The settings both sides resolve alike; the side-specific ones get their defaults here
    /// and are overridden by the caller (who already took `tls_dir` and `coordinator`).
    fn resolve(
        self,
        file: &FileConfig,
        role: Role,
        tls_dir: Option<PathBuf>,
        coordinator: Option<String>,
    ) -> Result<AgentConfig, String> {
        let listen = match role {
            Role::Gpu => defaults::GPU_LISTEN,
            Role::Cpu => defaults::CPU_LISTEN,
        };
        let machine = file.pick(self.machine, "machine", crate::host::name)?;
        let advertise = file.pick(self.advertise, "advertise", String::new)?;
        if coordinator.is_some() {
            reportable(&machine, &advertise)?;
        }
        let metrics_listen = file.pick_opt(self.metrics_listen, "metrics_listen")?;
        if metrics_listen.is_some() && coordinator.is_none() {
            // Its figures are those of the heartbeats, which a static pair does not send:
            // zeros would look like a healthy pair.
            return Err(
                "--metrics-listen needs --coordinator (a static pair sends no heartbeats \
                        to fill the metrics from)"
                    .into(),
            );
        }
        Ok(AgentConfig {
            role,
            workspace: required(file, self.workspace, "workspace")?,
            state_dir: required(file, self.state_dir, "state_dir")?,
            tls_dir,
            peer: None,
            coordinator,
            join_token: file.pick_opt(self.join_token, "join_token")?,
            listen: file.pick(self.listen, "listen", || listen.to_string())?,
            metrics_listen,
            advertise,
            machine,
            heartbeat: file.pick_duration(
                self.heartbeat_interval,
                "heartbeat_interval",
                defaults::HEARTBEAT,
            )?,
            loop_cfg: default_loop(),
            compress_level: defaults::COMPRESS_LEVEL,
            bwlimit: bwlimit(file, self.bwlimit)?,
            on_promote: String::new(),
            on_demote: String::new(),
            keep_setuid: file.pick(self.keep_setuid, "keep_setuid", || false)?,
            history: None,
            backup: None,
        })
    }
}

/// `--history-budget` in bytes: a size, or a share of the filesystem holding the state
/// directory (its nearest existing ancestor, on a first start).
fn budget_bytes(s: &str, state_dir: &std::path::Path) -> Result<u64, String> {
    let bad = || format!("--history-budget {s:?}: give bytes (20GiB, 500MB) or a share (25%)");
    if let Some(pct) = s.trim().strip_suffix('%') {
        let pct: f64 = pct.trim().parse().map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&pct) {
            return Err(bad());
        }
        let on = state_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(std::path::Path::new("/"));
        let size = crate::disk::fsx::filesystem_bytes(on)
            .map_err(|e| format!("--history-budget {s}: size of {}: {e}", on.display()))?;
        return Ok((size as f64 * pct / 100.0) as u64);
    }
    crate::cli::parse_size(s).map_err(|_| bad())
}

/// The longest `--advertise` a coordinator accepts in a report.
const ADVERTISE_MAX: usize = 255;

/// A managed agent's machine name and advertised address as the coordinator accepts them in a
/// report (a report breaking a limit is refused whole): said at start, not at each heartbeat.
fn reportable(machine: &str, advertise: &str) -> Result<(), String> {
    crate::trust::identity::check_name(machine).map_err(|_| {
        format!(
            "machine name {machine:?} (--machine, default the host name): 1 to 63 letters, \
             digits, '-', '_' or '.', starting with a letter or digit"
        )
    })?;
    if advertise.len() > ADVERTISE_MAX {
        return Err(format!("--advertise is longer than {ADVERTISE_MAX} bytes"));
    }
    Ok(())
}

/// A setting without a default: the flag, else the file, else a usage error naming the flag.
fn required(file: &FileConfig, flag: Option<PathBuf>, key: &str) -> Result<PathBuf, String> {
    file.pick_opt(flag, key)?
        .ok_or_else(|| format!("--{} is required", key.replace('_', "-")))
}

/// `--bwlimit` in bytes per second (None: no limit).
fn bwlimit(file: &FileConfig, flag: Option<String>) -> Result<Option<u64>, String> {
    let Some(s) = file.pick_opt(flag, "bwlimit")? else {
        return Ok(None);
    };
    let n = crate::cli::parse_size(&s).map_err(|e| format!("--bwlimit {s:?}: {e}"))?;
    if n == 0 {
        return Err(format!(
            "--bwlimit {s:?}: give a positive rate (leave it out for none)"
        ));
    }
    Ok(Some(n))
}

fn compress_level(file: &FileConfig, flag: Option<i32>) -> Result<i32, String> {
    let level = file.pick(flag, "compress_level", || defaults::COMPRESS_LEVEL)?;
    if !(0..=19).contains(&level) {
        return Err(format!("--compress-level must be 0..=19, not {level}"));
    }
    Ok(level)
}

/// The replication loop's timing when nothing sets it (agent-cpu has no flags for it).
fn default_loop() -> LoopConfig {
    LoopConfig {
        debounce: parse_duration(defaults::DEBOUNCE).expect("default"),
        max_delay: parse_duration(defaults::MAX_DELAY).expect("default"),
        rescan_interval: parse_duration(defaults::RESCAN_INTERVAL).expect("default"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn shared(dir: &std::path::Path) -> AgentArgs {
        AgentArgs {
            workspace: Some(dir.join("ws")),
            state_dir: Some(dir.join("state")),
            ..Default::default()
        }
    }

    #[test]
    fn metrics_are_served_only_by_a_managed_agent() {
        let d = tempfile::tempdir().unwrap();
        let gpu = || GpuArgs {
            peer: Some("cpu:7701".into()),
            ..Default::default()
        };
        let args = |coordinator: Option<&str>| AgentArgs {
            coordinator: coordinator.map(Into::into),
            metrics_listen: Some("127.0.0.1:0".into()),
            tls_dir: Some(d.path().join("tls")),
            ..shared(d.path())
        };
        let e = gpu().resolve(args(None)).unwrap_err();
        assert!(e.contains("--metrics-listen needs --coordinator"), "{e}");
        let cpu = CpuArgs::default()
            .resolve(args(Some("coord:7700")))
            .unwrap();
        assert_eq!(cpu.metrics_listen.as_deref(), Some("127.0.0.1:0"));
    }

    #[test]
    fn bwlimit_is_a_positive_size_per_second() {
        let d = tempfile::tempdir().unwrap();
        let with = |b: Option<&str>| {
            let shared = AgentArgs {
                coordinator: Some("coord:7700".into()),
                bwlimit: b.map(String::from),
                ..shared(d.path())
            };
            CpuArgs::default().resolve(shared)
        };
        assert_eq!(with(None).unwrap().bwlimit, None);
        assert_eq!(with(Some("20MB")).unwrap().bwlimit, Some(20_000_000));
        for bad in ["0", "fast", "-1MB"] {
            let e = with(Some(bad)).unwrap_err();
            assert!(e.contains("--bwlimit"), "{bad}: {e}");
        }
    }

    #[test]
    fn history_budget_and_switch() {
        let d = tempfile::tempdir().unwrap();
        let args = |cpu: CpuArgs| {
            let shared = AgentArgs {
                coordinator: Some("coord:7700".into()),
                ..shared(d.path())
            };
            cpu.resolve(shared)
        };
        let off = CpuArgs {
            history: Some(false),
            ..Default::default()
        };
        assert!(args(off).unwrap().history.is_none());
        let sized = CpuArgs {
            history_budget: Some("2GiB".into()),
            keep_within: Some("10m".into()),
            ..Default::default()
        };
        let h = args(sized).unwrap().history.unwrap();
        assert_eq!(h.budget_bytes, 2 << 30);
        assert_eq!(h.keep_all_for, Duration::from_secs(600));
        for bad in ["lots", "150%", "-3%"] {
            let cpu = CpuArgs {
                history_budget: Some(bad.into()),
                ..Default::default()
            };
            let e = args(cpu).unwrap_err();
            assert!(e.contains("--history-budget"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_flag_wins_over_the_file_which_wins_over_the_default() {
        let d = tempfile::tempdir().unwrap();
        let toml = d.path().join("agent.toml");
        std::fs::write(
            &toml,
            "debounce = \"500ms\"\nmax_delay = \"3s\"\nmachine = \"m1\"\n",
        )
        .unwrap();
        let gpu = GpuArgs {
            peer: Some("cpu:7701".into()),
            debounce: Some("2s".into()),
            ..Default::default()
        };
        let args = AgentArgs {
            tls_dir: Some(d.path().join("tls")),
            config: Some(toml),
            ..shared(d.path())
        };
        let c = gpu.resolve(args).unwrap();
        assert_eq!(c.role, Role::Gpu);
        assert_eq!(c.loop_cfg.debounce, Duration::from_secs(2));
        assert_eq!(c.loop_cfg.max_delay, Duration::from_secs(3));
        assert_eq!(c.loop_cfg.rescan_interval, Duration::from_secs(60));
        assert_eq!(c.machine, "m1");
        assert_eq!(c.listen, defaults::GPU_LISTEN);
        assert_eq!(c.compress_level, defaults::COMPRESS_LEVEL);
        assert_eq!(c.heartbeat, Duration::from_secs(1));
        assert!(!c.keep_setuid, "setuid bits are masked unless asked");
    }

    #[test]
    fn the_gpu_takes_both_hooks_from_flags_or_its_file() {
        let d = tempfile::tempdir().unwrap();
        let toml = d.path().join("agent.toml");
        std::fs::write(&toml, "on_promote = \"start-training\"\n").unwrap();
        let args = AgentArgs {
            coordinator: Some("coord:7700".into()),
            on_demote: Some("stop-training".into()),
            config: Some(toml),
            ..shared(d.path())
        };
        let c = GpuArgs::default().resolve(args).unwrap();
        assert_eq!(
            (c.on_promote.as_str(), c.on_demote.as_str()),
            ("start-training", "stop-training")
        );
    }

    #[test]
    fn keep_setuid_is_layered_like_every_setting() {
        let d = tempfile::tempdir().unwrap();
        let toml = d.path().join("agent.toml");
        std::fs::write(&toml, "keep_setuid = true\n").unwrap();
        let resolve = |flag: Option<bool>, config: Option<PathBuf>| {
            let args = AgentArgs {
                coordinator: Some("coord:7700".into()),
                keep_setuid: flag,
                config,
                ..shared(d.path())
            };
            CpuArgs::default().resolve(args).unwrap().keep_setuid
        };
        assert!(!resolve(None, None));
        assert!(resolve(None, Some(toml.clone())));
        assert!(!resolve(Some(false), Some(toml)));
        assert!(resolve(Some(true), None));
    }

    #[test]
    fn the_gpu_needs_exactly_one_way_to_its_peer() {
        let d = tempfile::tempdir().unwrap();
        let both = GpuArgs {
            peer: Some("cpu:7701".into()),
            ..Default::default()
        };
        let args = AgentArgs {
            coordinator: Some("coord:7700".into()),
            ..shared(d.path())
        };
        assert!(both.resolve(args).unwrap_err().contains("not both"));
        let none = GpuArgs::default().resolve(shared(d.path())).unwrap_err();
        assert!(none.contains("is required"), "{none}");
        let static_pair = GpuArgs {
            peer: Some("cpu:7701".into()),
            ..Default::default()
        };
        let e = static_pair.resolve(shared(d.path())).unwrap_err();
        assert!(e.contains("--tls-dir"), "{e}");
        let loud = GpuArgs {
            compress_level: Some(20),
            ..Default::default()
        };
        assert!(
            loud.resolve(shared(d.path()))
                .unwrap_err()
                .contains("0..=19")
        );
    }

    #[test]
    fn the_cpu_takes_its_hooks_and_the_loop_defaults() {
        let d = tempfile::tempdir().unwrap();
        let args = AgentArgs {
            coordinator: Some("coord:7700".into()),
            on_promote: Some("start-app".into()),
            on_demote: Some("stop-app".into()),
            ..shared(d.path())
        };
        let cpu = CpuArgs::default();
        let c = cpu.resolve(args).unwrap();
        assert_eq!(c.role, Role::Cpu);
        assert_eq!(
            (c.on_promote.as_str(), c.on_demote.as_str()),
            ("start-app", "stop-app")
        );
        assert_eq!(c.listen, defaults::CPU_LISTEN);
        assert_eq!(c.loop_cfg.debounce, Duration::from_millis(250));
        assert!(c.peer.is_none());
        let h = c.history.expect("history is kept by default");
        assert_eq!(h.hourly_for, Duration::from_secs(48 * 3600));
        assert_eq!(h.daily_for, Duration::from_secs(14 * 86_400));
        assert_eq!(h.keep_all_for, Duration::from_secs(3600));
        assert!(h.budget_bytes > 0, "a quarter of the disk");
        let e = CpuArgs::default().resolve(shared(d.path())).unwrap_err();
        assert!(
            e.contains("--tls-dir (static pair) or --coordinator"),
            "{e}"
        );
        let no_workspace = AgentArgs {
            workspace: None,
            coordinator: Some("coord:7700".into()),
            ..shared(d.path())
        };
        let e = CpuArgs::default().resolve(no_workspace).unwrap_err();
        assert_eq!(e, "--workspace is required");
    }

    #[test]
    fn a_managed_agent_needs_a_machine_name_and_address_the_coordinator_accepts() {
        let d = tempfile::tempdir().unwrap();
        let managed = |machine: &str, advertise: &str| AgentArgs {
            coordinator: Some("coord:7700".into()),
            machine: Some(machine.into()),
            advertise: Some(advertise.into()),
            ..shared(d.path())
        };
        assert!(CpuArgs::default().resolve(managed("cpu-1", "")).is_ok());
        let e = CpuArgs::default()
            .resolve(managed(&"m".repeat(64), ""))
            .unwrap_err();
        assert!(e.contains("machine name"), "{e}");
        let e = CpuArgs::default()
            .resolve(managed("cpu 1", ""))
            .unwrap_err();
        assert!(e.contains("machine name"), "{e}");
        let e = CpuArgs::default()
            .resolve(managed("cpu-1", &"a".repeat(256)))
            .unwrap_err();
        assert!(e.contains("--advertise"), "{e}");
        // A static pair reports to no one.
        let args = AgentArgs {
            tls_dir: Some(d.path().join("tls")),
            machine: Some("any name at all".into()),
            ..shared(d.path())
        };
        assert!(CpuArgs::default().resolve(args).is_ok());
    }
}
