//! agent-cpu: the CPU standby. Receives the GPU machine's workspace generation by generation,
//! verified and crash-consistent; probes its GPU peer; becomes the primary when promoted.

use std::path::PathBuf;

use crate::agent::args::{AgentArgs, CpuArgs};
use crate::agent::{runtime, socket};
use crate::backup::{Bucket, BucketConfig, Pick};
use crate::cli::{fail, init_logging, parse_or_exit, usage_error};
use crate::trust::tls;
use anyhow::Context;
use clap::{Parser, Subcommand};

/// The CPU standby of a Standby pair.
///
/// Either a static pair (`--tls-dir`) or managed by a coordinator (`--coordinator`, with a
/// `--join-token` the first time). Every setting can also come from a `STANDBY_*` environment
/// variable or a TOML file (`--config`); a flag wins over the environment, which wins over the
/// file.
#[derive(Parser, Debug)]
#[command(name = "agent-cpu", version)]
#[command(mut_arg("workspace", |a| a.help(
    "Directory that holds the replica of the GPU machine's workspace")))]
#[command(mut_arg("state_dir", |a| a.help(
    "Directory for the agent's own state (catalog, epoch, certificates). Keep it on the same \
     filesystem as the workspace so staged files can be renamed into place")))]
#[command(mut_arg("listen", |a| a.help("Address to listen on for replication")))]
#[command(mut_arg("advertise", |a| a.help(
    "Address the GPU agent should use, when it differs from --listen (NAT, public IP)")))]
#[command(mut_arg("heartbeat_interval", |a| a.help("Heartbeat (and GPU probe) interval")))]
#[command(mut_arg("on_demote", |a| a.help(
    "Command run (with sh -c, waited for) before this machine hands the primary role back to \
     a restored GPU machine: stop the application here")))]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    log: crate::cli::LogArgs,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    cpu: CpuArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the history: read back every chunk every kept snapshot needs and verify its hash.
    /// Asks the running agent (through its control socket), or opens the store itself when no
    /// agent runs. Exits 1 when anything is wrong, naming each problem.
    Verify {
        #[arg(long, env = "STANDBY_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Disaster recovery from the bucket alone: a snapshot's files into --to (its store rebuilt
    /// on the way, kept with --store). Credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
    RestoreBackup(RestoreBackupArgs),
}

/// `restore-backup`'s flags.
#[derive(clap::Args, Debug)]
struct RestoreBackupArgs {
    /// The bucket and prefix, s3://bucket/prefix.
    #[arg(long, env = "STANDBY_BACKUP_URL")]
    url: String,
    /// The provider's endpoint (R2, B2, GCS, MinIO); none for AWS S3.
    #[arg(long, env = "STANDBY_BACKUP_ENDPOINT")]
    endpoint: Option<String>,
    /// The bucket's region (`auto` for R2 and GCS).
    #[arg(long, env = "STANDBY_BACKUP_REGION")]
    region: Option<String>,
    /// Virtual-hosted-style requests (AWS S3) instead of path style.
    #[arg(long)]
    virtual_hosted: bool,
    /// The coordinator's backup.key (or STANDBY_BACKUP_KEY, 64 hex digits).
    #[arg(long, required_unless_present = "key")]
    key_file: Option<PathBuf>,
    #[arg(long, env = "STANDBY_BACKUP_KEY", hide_env_values = true, hide = true)]
    key: Option<String>,
    /// The pair, when the backup was handed out by a coordinator (`[backup]`): its key is
    /// derived from the coordinator's `backup.key` for that pair.
    #[arg(long)]
    pair: Option<String>,
    /// `latest`, or a snapshot id (16 hex digits).
    #[arg(long, default_value = "latest")]
    snapshot: String,
    /// Where the snapshot's files go: a new or empty directory (a workspace).
    #[arg(long, required_unless_present = "store_only")]
    to: Option<PathBuf>,
    /// Where the snapshot store is rebuilt from the bucket (a new or empty directory, or one
    /// an interrupted restore left); a temporary one beside --to when not given.
    #[arg(long, required_if_eq("store_only", "true"))]
    store: Option<PathBuf>,
    /// Only rebuild the store (to seed a standby's `<state-dir>/history`), no files.
    #[arg(long)]
    store_only: bool,
}

pub fn main() {
    crate::host::tune_allocator();
    let cli: Cli = parse_or_exit();
    cli.log.apply();
    if let Some(cmd) = cli.cmd {
        init_logging("warn");
        tls::install_default_provider();
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        if let Err(e) = rt.block_on(command(cmd)) {
            fail(&e);
        }
        return;
    }
    let cfg = cli
        .cpu
        .resolve(cli.agent)
        .unwrap_or_else(|e| usage_error(e));
    init_logging("info");
    tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let run = async {
        let opened = runtime::open(&cfg).await?;
        runtime::run(cfg, opened).await
    };
    if let Err(e) = rt.block_on(run) {
        fail(&e);
    }
}

async fn command(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Verify { state_dir } => verify(&state_dir).await,
        Cmd::RestoreBackup(args) => restore_backup(args).await,
    }
}

/// `agent-cpu restore-backup`: the store from the bucket, then (unless `--store-only`) the
/// snapshot's files.
async fn restore_backup(args: RestoreBackupArgs) -> anyhow::Result<()> {
    let RestoreBackupArgs {
        url,
        endpoint,
        region,
        virtual_hosted,
        key_file,
        key,
        pair,
        snapshot,
        to,
        store,
        store_only,
    } = args;
    let pick: Pick = snapshot.parse().unwrap_or_else(|e| usage_error(e));
    if let (Some(to), false) = (&to, store_only) {
        check_new_or_empty(to)?;
    }
    let key = match (key_file, key) {
        (Some(path), _) => crate::trust::seal::BackupKey::load(&path)?,
        (None, Some(hex)) => crate::trust::seal::BackupKey::from_hex(&hex)?,
        (None, None) => usage_error("give --key-file or STANDBY_BACKUP_KEY"),
    };
    let key = match &pair {
        Some(p) => key.for_pair(p),
        None => key,
    };
    let mut cfg = BucketConfig::new(&url);
    cfg.endpoint = endpoint;
    cfg.region = region;
    cfg.virtual_hosted = virtual_hosted;
    let bucket = Bucket::open(&cfg)?;
    let scratch = match (&store, &to) {
        (None, Some(to)) => Some(scratch_beside(to)?),
        _ => None,
    };
    let store_dir = store
        .clone()
        .or_else(|| scratch.as_ref().map(|t| t.path().to_path_buf()))
        .expect("clap requires --store or --to");
    let r = crate::backup::restore(&bucket, &key, &pick, &store_dir, 4)
        .await
        .with_context(|| format!("restoring {url} into {}", store_dir.display()))?;
    let mut report = serde_json::json!({
        "snapshot": r.snapshot.id(),
        "snapshot_time_ns": r.snapshot.mtime_ns,
        "packs": r.packs,
        "bytes": r.bytes,
        "store": store,
    });
    if let (Some(to), false) = (&to, store_only) {
        report["files"] = files_from(&store_dir, r.snapshot.id(), to)?;
        report["to"] = serde_json::json!(to);
    }
    println!("{report}");
    Ok(())
}

/// The files go only into a new or empty directory: a restore never mixes with, or replaces,
/// what is there.
fn check_new_or_empty(to: &std::path::Path) -> anyhow::Result<()> {
    let mut entries = match std::fs::read_dir(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("--to {}: {e}", to.display()),
        Ok(d) => d,
    };
    if entries.next().is_some() {
        anyhow::bail!(
            "refusing to restore into {}: it is not empty; give a new or empty directory",
            to.display()
        );
    }
    Ok(())
}

/// A scratch directory for the store on the filesystem of `to` (whose parent is made).
fn scratch_beside(to: &std::path::Path) -> anyhow::Result<tempfile::TempDir> {
    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent)?;
    Ok(tempfile::Builder::new()
        .prefix(".standby-restore-store-")
        .tempdir_in(parent)?)
}

/// The snapshot's files from the rebuilt store into `to`, each verified; what was written.
fn files_from(
    store: &std::path::Path,
    id: &str,
    to: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let store = crate::history::Store::open(store)?;
    let snap = store.find(&crate::history::Selector::Id(id.to_string()))?;
    let done = store
        .restore(snap.id, None, to)
        .with_context(|| format!("writing snapshot {id} into {}", to.display()))?;
    Ok(serde_json::to_value(done)?)
}

/// `agent-cpu verify`: by the running agent, else here.
async fn verify(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let report = match socket::request(state_dir, &socket::Request::Verify).await {
        Ok(r) if r.ok => r.result.unwrap_or_default(),
        Ok(r) => return Err(r.into_error("verify").into()),
        Err(_) => {
            let dir = state_dir.join(runtime::HISTORY_DIR);
            if !dir.is_dir() {
                anyhow::bail!(
                    "no history in {} (is this a standby's state directory?)",
                    dir.display()
                );
            }
            let store = crate::history::Store::open(&dir)?;
            socket::verify_json(&tokio::task::spawn_blocking(move || store.verify()).await??)
        }
    };
    println!("{report}");
    if report["ok"] != true {
        std::process::exit(1);
    }
    Ok(())
}
