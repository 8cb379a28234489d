//! coordinator: certificate authority, pairing, failure detection, failover and recovery.

mod admin;
mod demo;
mod drill;
mod machines;
mod manual;
mod progress;

use std::path::{Path, PathBuf};

use crate::cli::{FileConfig, defaults, fail, init_logging, parse_or_exit, usage_error};
use crate::control::failover::{Policy, Timing};
use crate::control::provider::ProvisionConfig;
use crate::control::service;
use crate::trust::identity::{Identity, Role};
use crate::trust::pki::{Ca, San, server_sans};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

/// The Standby coordinator.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: crate::cli::LogArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CertRole {
    Gpu,
    Cpu,
    Admin,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum NodeRole {
    Gpu,
    Cpu,
}

impl From<NodeRole> for Role {
    fn from(r: NodeRole) -> Role {
        match r {
            NodeRole::Gpu => Role::Gpu,
            NodeRole::Cpu => Role::Cpu,
        }
    }
}

/// How admin verbs reach the coordinator.
#[derive(clap::Args, Debug, Clone)]
pub struct Remote {
    /// The coordinator, host:port; several, comma-separated: the first that answers, or the
    /// leader it names when it is a follower (highly available coordinators).
    #[arg(long, env = "STANDBY_SERVER", default_value = "127.0.0.1:7700")]
    pub server: String,
    /// An admin TLS directory (`coordinator init` writes one to <dir>/admin).
    #[arg(long, env = "STANDBY_ADMIN_TLS_DIR")]
    pub tls_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the certificate authority, an admin certificate, the server certificate and
    /// coordinator.toml under DIR.
    Init {
        #[arg(long, env = "STANDBY_DIR")]
        dir: PathBuf,
        /// A host name or IP address clients dial the coordinator by, for the server
        /// certificate besides localhost, 127.0.0.1, ::1 and this machine's host name
        /// (repeatable, or comma-separated).
        #[arg(long, env = "STANDBY_SAN", value_delimiter = ',')]
        san: Vec<San>,
    },
    /// Issue a static certificate: writes OUT/ca.pem, OUT/node.pem, OUT/node.key (mode 0600);
    /// or, with --server, issue the coordinator's own server certificate again.
    Cert(CertArgs),
    /// Run the coordinator.
    Serve(Box<ServeArgs>),
    /// The whole story on this machine: a pair on loopback, a workload, the GPU agent killed,
    /// failover, a new GPU provisioned, restored, verified and cut over, then a timeline.
    Demo(demo::DemoArgs),
    /// A deliberate failover of a live pair PAIR, measured phase by phase against targets
    /// (a table and JSON; exit 3 when a target is missed). It destroys the pair's healthy GPU
    /// machine and whatever runs there (a training job): run it in a maintenance window.
    Drill(Box<drill::DrillArgs>),
    /// Print a single-use, expiring join token for an agent of PAIR.
    Token {
        #[arg(long, env = "STANDBY_DIR")]
        dir: PathBuf,
        #[arg(long)]
        pair: String,
        #[arg(long, value_enum)]
        role: NodeRole,
        /// How long the token stays valid.
        #[arg(long, default_value = defaults::TOKEN_TTL)]
        ttl: String,
        /// Bind the token to this machine name (default: whichever machine joins with it first).
        #[arg(long)]
        machine: Option<String>,
    },
    /// Print a shell completion script (e.g. `coordinator completions bash >
    /// /etc/bash_completion.d/coordinator`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or with --dir write one page per command there
    /// (coordinator.1, coordinator-serve.1, ...).
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The machines the `local` provider started, which outlive the coordinator.
    Machines {
        #[command(subcommand)]
        cmd: machines::MachinesCmd,
    },
    // The admin verbs come last, as they always have in the help.
    #[command(flatten)]
    Admin(AdminCmd),
}

/// The admin verbs: requests to a running coordinator, made with an admin certificate.
#[derive(Subcommand, Debug)]
enum AdminCmd {
    /// List pairs (state, epoch, primary, lag, machines).
    Pairs {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        json: bool,
    },
    /// Manage a pair.
    Pair {
        #[command(subcommand)]
        cmd: PairCmd,
    },
    /// Fail PAIR over to its CPU standby now.
    Failover {
        pair: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Recover PAIR now: provision a replacement (or retry a pending attempt at once).
    Recover {
        pair: String,
        #[command(flatten)]
        remote: Remote,
        /// Follow the recovery (with a restore progress bar) until the pair is Syncing.
        #[arg(long)]
        follow: bool,
        /// The pair lost both machines: provision a CPU standby, seed it from the pair's
        /// off-site backup (`[backup]`), then a GPU as after a failover. Refused while either
        /// agent is heard from. Both old machines are revoked for good.
        #[arg(long)]
        from_backup: bool,
        /// With --from-backup: `latest`, or a snapshot id (16 hex digits, `versions`).
        #[arg(long, requires = "from_backup", default_value = "latest")]
        snapshot: String,
    },
    /// Hibernate PAIR: final sync, then the GPU machine is destroyed; the CPU keeps the data.
    Hibernate {
        pair: String,
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        follow: bool,
    },
    /// Wake a hibernated PAIR: a new GPU machine is provisioned and restored.
    Wake {
        pair: String,
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        follow: bool,
    },
    /// List the snapshots PAIR's CPU standby keeps (asked through the coordinator).
    Versions {
        pair: String,
        #[command(flatten)]
        remote: Remote,
        /// Only snapshots holding this path (relative to the workspace), counted below it.
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Fetch files of a snapshot of PAIR's standby into a local directory, verified.
    Restore {
        pair: String,
        #[command(flatten)]
        remote: Remote,
        /// The newest snapshot at or before this time: RFC 3339 or how long ago (10m, 2h).
        #[arg(
            long,
            conflicts_with = "snapshot",
            required_unless_present = "snapshot"
        )]
        at: Option<String>,
        /// A snapshot id (or a unique prefix of one).
        #[arg(long)]
        snapshot: Option<String>,
        /// Only this path (relative to the workspace).
        #[arg(long)]
        path: Option<String>,
        /// The local directory to write into (made if missing).
        #[arg(long)]
        to: std::path::PathBuf,
    },
    /// Who leads (address and term), the coordinators sharing the state and the etcd
    /// endpoints, as the first coordinator that answers sees them (a follower names the leader).
    Status {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        json: bool,
    },
    /// Show events (transitions, warnings; heartbeat summaries with --heartbeats).
    Events {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        json: bool,
        /// Keep streaming new events.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        heartbeats: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PairCmd {
    /// Create a pair (agents holding its certificates can then join and heartbeat).
    Create {
        pair: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(clap::Args, Debug)]
struct CertArgs {
    #[arg(long, env = "STANDBY_DIR")]
    dir: PathBuf,
    /// The pair the certificate belongs to (for gpu and cpu).
    #[arg(long)]
    pair: Option<String>,
    #[arg(long, value_enum, required_unless_present_any = ["server", "renew"])]
    role: Option<CertRole>,
    /// For --role admin the admin's name (default "admin"); for gpu and cpu the machine the
    /// certificate names (default: the role).
    #[arg(long)]
    name: Option<String>,
    /// Output directory.
    #[arg(long, required_unless_present = "server")]
    out: Option<PathBuf>,
    /// Replace the coordinator's server certificate (DIR/server) with one for the default names
    /// and every --san (they replace the names it had); takes effect when the coordinator
    /// restarts.
    #[arg(long, conflicts_with_all = ["pair", "role", "name", "out"])]
    server: bool,
    /// Renew the certificate in --out (an admin's, or a static agent's): the same identity and
    /// names, a new key, --days from now. The old certificate stays valid until it expires.
    #[arg(long, requires = "out", conflicts_with_all = ["pair", "role", "name", "server", "san"])]
    renew: bool,
    /// A host name or IP address the certificate is also valid for (repeatable, or
    /// comma-separated; for --server and gpu or cpu certificates).
    #[arg(long, value_delimiter = ',')]
    san: Vec<San>,
    /// Validity in days [default: 365; 3650 with --server].
    #[arg(long)]
    days: Option<u32>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[arg(long, env = "STANDBY_DIR")]
    dir: PathBuf,
    /// gRPC address.
    #[arg(long, env = "STANDBY_LISTEN")]
    listen: Option<String>,
    /// Prometheus metrics address.
    #[arg(long, env = "STANDBY_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Address of the read-only status page (HTML at `/`, JSON at `/status.json`); off unless
    /// given. Plain HTTP without authentication: it shows pair names and machine addresses, so
    /// bind it to loopback or a private network.
    #[arg(long, env = "STANDBY_STATUS_LISTEN")]
    status_listen: Option<String>,
    /// Expected heartbeat interval of the agents.
    #[arg(long, env = "STANDBY_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Missed heartbeats before a pair is Suspect.
    #[arg(long, env = "STANDBY_SUSPECT_AFTER_MISSED")]
    suspect_after_missed: Option<u32>,
    /// Silence of the GPU agent (confirmed by the CPU) before failing over.
    #[arg(long, env = "STANDBY_FAILOVER_AFTER")]
    failover_after: Option<String>,
    /// Lifetime of certificates issued to agents ("24h", "20s"); they renew at two thirds.
    #[arg(long, env = "STANDBY_CERT_LIFETIME")]
    cert_lifetime: Option<String>,
    /// How long after its expiry an agent's certificate may still connect, to renew only.
    #[arg(long, env = "STANDBY_RENEW_GRACE")]
    renew_grace: Option<String>,
    /// Where replacement machines come from [default: local].
    #[arg(long, env = "STANDBY_PROVIDER", value_parser = provider_values())]
    provider: Option<String>,
    /// Where CPU standbys come from when not from --provider (e.g. --provider vastai
    /// --cpu-provider gcp).
    #[arg(long, env = "STANDBY_CPU_PROVIDER", value_parser = provider_values())]
    cpu_provider: Option<String>,
    /// Provision a replacement GPU as soon as a pair failed over.
    #[arg(long, env = "STANDBY_AUTO_RECOVER")]
    auto_recover: Option<bool>,
    /// How long a new machine has for its agent to join.
    #[arg(long, env = "STANDBY_BOOT_TIMEOUT")]
    boot_timeout: Option<String>,
    /// How long a failed offer, host or zone is not tried again.
    #[arg(long, env = "STANDBY_BLOCKLIST_FOR")]
    blocklist_for: Option<String>,
    /// Hibernate a pair whose GPU has been idle (0 % utilisation) this long ("0s": never).
    #[arg(long, env = "STANDBY_IDLE_HIBERNATE_AFTER")]
    idle_hibernate_after: Option<String>,
    /// The coordinator's address as new machines should dial it.
    #[arg(long, env = "STANDBY_ADVERTISE")]
    advertise: Option<String>,
    /// How often machines carrying this coordinator's labels but owned by no pair are destroyed.
    #[arg(long, env = "STANDBY_SWEEP_INTERVAL")]
    sweep_interval: Option<String>,
    /// First wait after a failed provisioning attempt (doubles each time, with jitter).
    #[arg(long, env = "STANDBY_BACKOFF_BASE")]
    backoff_base: Option<String>,
    /// vastai provider: API base URL.
    #[arg(long, env = "STANDBY_VASTAI_URL")]
    vastai_url: Option<String>,
    /// vastai provider: file holding the API key (default: the VAST_API_KEY variable).
    #[arg(long, env = "STANDBY_VASTAI_API_KEY_FILE")]
    vastai_api_key_file: Option<PathBuf>,
    /// URL new machines download agent-gpu from.
    #[arg(long, env = "STANDBY_AGENT_URL")]
    agent_url: Option<String>,
    /// SHA-256 (hex) of the agent-gpu at --agent-url; machines refuse a binary that differs.
    #[arg(long, env = "STANDBY_AGENT_SHA256")]
    agent_sha256: Option<String>,
    /// local provider: directory of the agent binaries (default: beside this program).
    #[arg(long, env = "STANDBY_AGENT_BIN_DIR")]
    agent_bin_dir: Option<PathBuf>,
    /// TOML configuration file (default: <dir>/coordinator.toml when it exists).
    #[arg(long, env = "STANDBY_CONFIG")]
    config: Option<PathBuf>,
    /// Serve gRPC reflection on the public listener (off by default).
    #[arg(long, env = "STANDBY_REFLECTION", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    reflection: Option<bool>,
    /// Answer grpc.health.v1 without a client certificate (default: only clients with a
    /// certificate of this CA, any role).
    #[arg(long, env = "STANDBY_PUBLIC_HEALTH", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    public_health: Option<bool>,
    /// Where the state lives: `file` (under --dir, one coordinator) or `etcd` (several
    /// coordinators on one etcd cluster, one of them leads) [default: file].
    #[arg(long, env = "STANDBY_STORE")]
    store: Option<StoreKind>,
    /// `--store etcd`: the members' client URLs, comma-separated (`https://` with --etcd-ca).
    #[arg(long, env = "STANDBY_ETCD", value_name = "URL[,URL...]")]
    etcd: Option<String>,
    /// `--store etcd`: CA certificate (PEM) of the etcd members' certificates.
    #[arg(long, env = "STANDBY_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// `--store etcd`: client certificate (PEM) when etcd asks for one (--client-cert-auth).
    #[arg(long, env = "STANDBY_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// `--store etcd`: the client certificate's key (PEM).
    #[arg(long, env = "STANDBY_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// `--store etcd`: every key lives below this prefix [default: /standby/v1].
    #[arg(long, env = "STANDBY_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// `--store etcd`: TTL of the leader's lease; a leader that cannot renew it for half this
    /// long stops leading [default: 6s].
    #[arg(long, env = "STANDBY_LEADER_LEASE")]
    leader_lease: Option<String>,
}

/// Where `serve` keeps the state.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    /// An append-only log under --dir (one coordinator).
    File,
    /// An etcd cluster shared by several coordinators, with leader election.
    Etcd,
}

pub fn main() {
    let cli: Cli = parse_or_exit();
    cli.log.apply();
    crate::trust::tls::install_default_provider();
    if let Err(e) = run(cli.cmd) {
        fail(&e);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

/// One handler per verb; each starts logging at its own level.
fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Init { dir, san } => {
            init_logging("warn");
            init(&dir, &san)
        }
        Cmd::Cert(a) => {
            init_logging("warn");
            cert(a)
        }
        Cmd::Serve(a) => serve(*a),
        Cmd::Drill(a) => {
            init_logging("warn");
            runtime().block_on(drill::run(*a))
        }
        Cmd::Demo(a) => {
            init_logging("error");
            demo::run(a)
        }
        Cmd::Token {
            dir,
            pair,
            role,
            ttl,
            machine,
        } => {
            init_logging("warn");
            let ttl = crate::cli::parse_duration(&ttl).unwrap_or_else(|e| usage_error(e));
            let machine = machine.as_deref();
            crate::control::service::mint_token(&dir, &pair, role.into(), machine, ttl)
                .map(|t| println!("{t}"))
        }
        Cmd::Admin(cmd) => {
            init_logging("warn");
            runtime().block_on(admin_verb(cmd))
        }
        Cmd::Machines { cmd } => {
            init_logging("warn");
            machines::run(cmd)
        }
        Cmd::Completions { shell } => manual::completions::<Cli>(shell),
        Cmd::Man { dir } => manual::man::<Cli>(dir.as_deref()),
    }
}

/// `coordinator serve`: the options are checked before logging starts (a usage error exits
/// 64); runs until SIGINT or SIGTERM.
fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let opts = serve_options(a).unwrap_or_else(|e| usage_error(e));
    init_logging("info");
    let files = crate::cli::raise_nofile_limit();
    tracing::debug!(files, "open file limit");
    runtime().block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            crate::cli::stop_signal().await;
            tracing::info!("stopping");
            stop.cancel();
        });
        crate::control::service::serve(opts, shutdown).await
    })
}

async fn admin_verb(cmd: AdminCmd) -> anyhow::Result<()> {
    match cmd {
        AdminCmd::Pairs { remote, json } => admin::pairs(&remote, json).await,
        AdminCmd::Status { remote, json } => admin::coordinator_status(&remote, json).await,
        AdminCmd::Pair {
            cmd: PairCmd::Create { pair, remote },
        } => admin::create(&remote, &pair).await,
        AdminCmd::Failover { pair, remote } => {
            admin::action(&remote, &pair, admin::Verb::Failover, false).await
        }
        AdminCmd::Recover {
            pair,
            remote,
            follow,
            from_backup,
            snapshot,
        } => {
            let from_backup = from_backup.then_some(snapshot);
            admin::action(&remote, &pair, admin::Verb::Recover { from_backup }, follow).await
        }
        AdminCmd::Hibernate {
            pair,
            remote,
            follow,
        } => admin::action(&remote, &pair, admin::Verb::Hibernate, follow).await,
        AdminCmd::Wake {
            pair,
            remote,
            follow,
        } => admin::action(&remote, &pair, admin::Verb::Wake, follow).await,
        AdminCmd::Events {
            remote,
            json,
            follow,
            heartbeats,
        } => admin::events(&remote, json, follow, heartbeats).await,
        AdminCmd::Versions {
            pair,
            remote,
            path,
            json,
        } => admin::versions(&remote, &pair, &path.unwrap_or_default(), json).await,
        AdminCmd::Restore {
            pair,
            remote,
            at,
            snapshot,
            path,
            to,
        } => {
            let at_unix_ms = match at {
                Some(t) => crate::cli::parse_time(&t, std::time::SystemTime::now())
                    .unwrap_or_else(|e| usage_error(e)),
                None => 0,
            };
            let selector =
                crate::agent::versions::selector(snapshot.unwrap_or_default(), at_unix_ms);
            admin::restore(&remote, &pair, &selector, &path.unwrap_or_default(), &to).await
        }
    }
}

/// The keys `coordinator.toml` may set; `[provision]`, `[gcp]`, `[command]` and `[backup]`
/// refuse unknown keys themselves.
const CONFIG_KEYS: [&str; 39] = [
    "listen",
    "metrics_listen",
    "advertise",
    "cert_lifetime",
    "renew_grace",
    "provider",
    "cpu_provider",
    "provision.gpu",
    "provision.cpu",
    "sweep_interval",
    "agent_bin_dir",
    "agent_url",
    "agent_sha256",
    "gcp",
    "command",
    "reflection",
    "public_health",
    "backup",
    "notify",
    "status_listen",
    "heartbeat_interval",
    "suspect_after_missed",
    "failover_after",
    "auto_recover",
    "boot_timeout",
    "blocklist_for",
    "idle_hibernate_after",
    "backoff_base",
    "vastai.url",
    "vastai.api_key_file",
    "vastai.image",
    "vastai.disk_gb",
    "store",
    "etcd",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_prefix",
    "leader_lease",
];

/// The providers `--provider` and `--cpu-provider` name, each with its line of `--help`.
const PROVIDERS: [(&str, &str); 5] = [
    (
        "local",
        "agent processes on this host, under DIR/machines (the demo, tests, one big host; stop them with `machines stop-all`)",
    ),
    (
        "vastai",
        "Vast.ai GPU instances (VAST_API_KEY or --vastai-api-key-file)",
    ),
    (
        "gcp",
        "Google Compute Engine Spot VMs, CPU standbys only ([gcp] in the TOML file)",
    ),
    (
        "command",
        "your own create/destroy/list programs ([command] in the TOML file)",
    ),
    (
        "none",
        "no provider: replacements join by hand with a token",
    ),
];

/// The providers as clap's possible values, so `serve --help` lists each with its meaning.
fn provider_values() -> clap::builder::PossibleValuesParser {
    PROVIDERS
        .iter()
        .map(|(name, help)| clap::builder::PossibleValue::new(name).help(help))
        .collect::<Vec<_>>()
        .into()
}

/// A provider name from the configuration file, checked as clap checks the flag's.
fn provider(name: String) -> Result<String, String> {
    if PROVIDERS.iter().any(|(p, _)| *p == name) {
        Ok(name)
    } else {
        let names: Vec<&str> = PROVIDERS.iter().map(|(p, _)| *p).collect();
        Err(format!(
            "unknown provider {name:?} (one of {})",
            names.join(", ")
        ))
    }
}

fn serve_options(a: ServeArgs) -> Result<crate::control::service::ServeOptions, String> {
    let file = a.config.clone().or_else(|| {
        let p = a.dir.join("coordinator.toml");
        p.exists().then_some(p)
    });
    let f = FileConfig::load(file.as_deref())?;
    f.deny_unknown(&CONFIG_KEYS)?;
    let timing = timing(&f, &a)?;
    Ok(crate::control::service::ServeOptions {
        listen: f.pick(a.listen.clone(), "listen", || {
            format!("0.0.0.0:{}", defaults::COORDINATOR_PORT)
        })?,
        metrics_listen: f.pick(a.metrics_listen.clone(), "metrics_listen", || {
            format!("0.0.0.0:{}", defaults::METRICS_PORT)
        })?,
        status_listen: f.pick_opt(a.status_listen.clone(), "status_listen")?,
        timing,
        cert_lifetime: f.pick_duration(
            a.cert_lifetime.clone(),
            "cert_lifetime",
            defaults::CERT_LIFETIME,
        )?,
        renew_grace: f.pick_duration(
            a.renew_grace.clone(),
            "renew_grace",
            defaults::RENEW_GRACE,
        )?,
        provider: provider(f.pick(a.provider.clone(), "provider", || "local".into())?)?,
        cpu_provider: match f.pick(a.cpu_provider.clone(), "cpu_provider", String::new)? {
            p if p.is_empty() => p,
            p => provider(p)?,
        },
        policy: policy(&f, &a)?,
        provision: ProvisionConfig {
            gpu: f.get("provision.gpu")?.unwrap_or_default(),
            cpu: f.get("provision.cpu")?.unwrap_or_default(),
            sweep_interval: f.pick_duration(a.sweep_interval.clone(), "sweep_interval", "60s")?,
            ..ProvisionConfig::default()
        },
        advertise: f.pick(a.advertise.clone(), "advertise", String::new)?,
        local_bin_dir: f.pick_opt(a.agent_bin_dir.clone(), "agent_bin_dir")?,
        local_agent_args: Vec::new(),
        vastai: vastai(&f, &a)?,
        gcp: f.get("gcp")?.unwrap_or_default(),
        command: f.get("command")?.unwrap_or_default(),
        reflection: f.pick(a.reflection, "reflection", || false)?,
        public_health: f.pick(a.public_health, "public_health", || false)?,
        backup: f.get("backup")?,
        notify: notify(&f)?,
        ha: ha(&f, &a)?,
        dir: a.dir,
    })
}

/// `--store etcd` and its options (None: the file store); a usage error when etcd options come
/// without it or it comes without endpoints.
fn ha(f: &FileConfig, a: &ServeArgs) -> Result<Option<crate::control::service::HaOptions>, String> {
    let kind = f.pick(a.store, "store", || StoreKind::File)?;
    let endpoints: Vec<String> = f
        .pick(a.etcd.clone(), "etcd", String::new)?
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let ca = f.pick_opt(a.etcd_ca.clone(), "etcd_ca")?;
    let cert = f.pick_opt(a.etcd_cert.clone(), "etcd_cert")?;
    let key = f.pick_opt(a.etcd_key.clone(), "etcd_key")?;
    let prefix = f.pick(a.etcd_prefix.clone(), "etcd_prefix", || {
        "/standby/v1".into()
    })?;
    let lease = f.pick_duration(a.leader_lease.clone(), "leader_lease", "6s")?;
    if kind == StoreKind::File {
        if !endpoints.is_empty() || ca.is_some() || cert.is_some() || key.is_some() {
            return Err("--etcd and its options need --store etcd".into());
        }
        return Ok(None);
    }
    if endpoints.is_empty() {
        return Err("--store etcd needs --etcd URL[,URL...]".into());
    }
    if cert.is_some() != key.is_some() {
        return Err("--etcd-cert and --etcd-key go together".into());
    }
    if (cert.is_some() && ca.is_none()) || lease < std::time::Duration::from_secs(2) {
        return Err("--etcd-cert needs --etcd-ca; --leader-lease is at least 2s".into());
    }
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(format!(
            "--etcd-prefix {prefix:?} must start with / and name something"
        ));
    }
    if !cfg!(feature = "etcd") {
        return Err(crate::control::service::NO_ETCD.into());
    }
    let mut etcd = crate::control::service::EtcdConfig::new(endpoints);
    etcd.prefix = prefix;
    etcd.tls = ca.map(|ca| crate::control::service::EtcdTls { ca, cert, key });
    Ok(Some(crate::control::service::HaOptions { etcd, lease }))
}

/// Heartbeats and failure detection; failover needs at least one heartbeat of silence.
fn timing(f: &FileConfig, a: &ServeArgs) -> Result<Timing, String> {
    let timing = Timing {
        heartbeat: f.pick_duration(
            a.heartbeat_interval.clone(),
            "heartbeat_interval",
            defaults::HEARTBEAT,
        )?,
        suspect_after_missed: f.pick(a.suspect_after_missed, "suspect_after_missed", || {
            defaults::SUSPECT_AFTER_MISSED
        })?,
        failover_after: f.pick_duration(
            a.failover_after.clone(),
            "failover_after",
            defaults::FAILOVER_AFTER,
        )?,
    };
    if timing.suspect_after_missed == 0 || timing.failover_after < timing.heartbeat {
        return Err(
            "failover_after must be at least one heartbeat, suspect_after_missed at least 1".into(),
        );
    }
    Ok(timing)
}

/// Recovery: automatic or not, boot timeout, blocklisting, idle hibernation, back-off.
fn policy(f: &FileConfig, a: &ServeArgs) -> Result<Policy, String> {
    Ok(Policy {
        auto_recover: f.pick(a.auto_recover, "auto_recover", || true)?,
        boot_timeout: f.pick_duration(
            a.boot_timeout.clone(),
            "boot_timeout",
            defaults::BOOT_TIMEOUT,
        )?,
        blocklist_for: f.pick_duration(
            a.blocklist_for.clone(),
            "blocklist_for",
            defaults::BLOCKLIST_FOR,
        )?,
        idle_hibernate_after: Some(f.pick_duration(
            a.idle_hibernate_after.clone(),
            "idle_hibernate_after",
            "0s",
        )?)
        .filter(|d| !d.is_zero()),
        backoff_base: f.pick_duration(a.backoff_base.clone(), "backoff_base", "5s")?,
        ..Policy::default()
    })
}

/// `[[notify]]` webhooks, checked now so a bad one is a usage error before any port is bound.
fn notify(f: &FileConfig) -> Result<Vec<crate::control::notify::Webhook>, String> {
    let configs: Vec<crate::control::notify::WebhookConfig> = f.get("notify")?.unwrap_or_default();
    crate::control::notify::Webhook::all(&configs).map_err(|e| e.to_string())
}

/// The vastai provider's settings; the API key from its file, else `VAST_API_KEY`.
fn vastai(
    f: &FileConfig,
    a: &ServeArgs,
) -> Result<crate::control::provider::vastai::VastSettings, String> {
    Ok(crate::control::provider::vastai::VastSettings {
        url: f.pick(a.vastai_url.clone(), "vastai.url", || {
            "https://console.vast.ai".to_string()
        })?,
        key: match f.pick_opt(a.vastai_api_key_file.clone(), "vastai.api_key_file")? {
            Some(p) => std::fs::read_to_string(&p)
                .map_err(|e| format!("reading {}: {e}", p.display()))?
                .trim()
                .to_string(),
            None => std::env::var("VAST_API_KEY").unwrap_or_default(),
        },
        image: f.get("vastai.image")?.unwrap_or_default(),
        disk_gb: f.get("vastai.disk_gb")?.unwrap_or(0),
        agent_url: f.pick(a.agent_url.clone(), "agent_url", String::new)?,
        agent_sha256: f.pick(a.agent_sha256.clone(), "agent_sha256", String::new)?,
    })
}

fn init(dir: &Path, sans: &[San]) -> anyhow::Result<()> {
    let fingerprint = init_quiet(dir, sans)?;
    println!("CA fingerprint (sha256): {fingerprint}");
    let backup = crate::trust::seal::BackupKey::load_or_create(dir)?;
    println!(
        "backup key fingerprint: {} (keep {} with ca.key: backups cannot be read without it)",
        backup.fingerprint(),
        dir.join(crate::trust::seal::KEY_FILE).display()
    );
    println!("admin certificate: {}", dir.join("admin").display());
    println!("server certificate for: {}", names(&server_sans(sans)));
    Ok(())
}

/// Creates the CA, the admin certificate, the server certificate (also valid for `sans`) and
/// coordinator.toml; returns the CA's fingerprint.
pub(crate) fn init_quiet(dir: &Path, sans: &[San]) -> anyhow::Result<String> {
    if dir.join("ca.key").exists() {
        bail!(
            "{} already holds a CA; refusing to replace it (every certificate depends on it)",
            dir.display()
        );
    }
    crate::trust::pki::create_private_dir(dir)?;
    let ca = Ca::generate()?;
    ca.save(dir)?;
    let admin = ca.issue(
        &Identity::admin("admin")?,
        crate::trust::pki::days(defaults::CERT_DAYS),
        &[],
    )?;
    admin.write_dir(&dir.join("admin"))?;
    ca.issue_server(sans)?
        .write_dir(&dir.join(service::SERVER_TLS_DIR))?;
    service::token_key(dir)?;
    crate::trust::seal::BackupKey::load_or_create(dir)?;
    let toml = format!(
        "# Standby coordinator configuration. Every key can also be given as a flag or a\n\
         # STANDBY_* environment variable (which win over this file).\n\
         listen = \"0.0.0.0:{}\"\n\
         metrics_listen = \"0.0.0.0:{}\"\n\
         heartbeat_interval = \"{}\"\n\
         suspect_after_missed = {}\n\
         failover_after = \"{}\"\n",
        defaults::COORDINATOR_PORT,
        defaults::METRICS_PORT,
        defaults::HEARTBEAT,
        defaults::SUSPECT_AFTER_MISSED,
        defaults::FAILOVER_AFTER,
    );
    let cfg = dir.join("coordinator.toml");
    if !cfg.exists() {
        std::fs::write(&cfg, toml).with_context(|| format!("writing {}", cfg.display()))?;
    }
    Ok(ca.fingerprint())
}

/// `coordinator cert`: a static node or admin certificate, or the server certificate again.
fn cert(a: CertArgs) -> anyhow::Result<()> {
    let ca = Ca::load(&a.dir).with_context(|| {
        format!(
            "loading the CA from {} (run `coordinator init` first)",
            a.dir.display()
        )
    })?;
    if a.server {
        return server_cert(&a, &ca);
    }
    if let (true, Some(out)) = (a.renew, a.out.as_deref()) {
        let days = crate::trust::pki::days(a.days.unwrap_or(defaults::CERT_DAYS));
        let id = crate::trust::pki::renew_dir(&ca, out, days)
            .with_context(|| format!("renewing the certificate in {}", out.display()))?;
        println!("{id} renewed -> {}", out.display());
        return Ok(());
    }
    let (Some(role), Some(out)) = (a.role, a.out.as_deref()) else {
        usage_error("--role and --out are required (or --server)");
    };
    let id = match role {
        CertRole::Admin if !a.san.is_empty() => {
            usage_error("--san is for --server and gpu or cpu certificates, not admin ones")
        }
        CertRole::Admin => {
            Identity::admin(a.name.as_deref().or(a.pair.as_deref()).unwrap_or("admin"))?
        }
        CertRole::Gpu | CertRole::Cpu => {
            let Some(pair) = &a.pair else {
                usage_error("--pair is required for gpu and cpu certificates");
            };
            let role = if matches!(role, CertRole::Gpu) {
                Role::Gpu
            } else {
                Role::Cpu
            };
            let machine = a.name.clone().unwrap_or_else(|| role.to_string());
            Identity::node(pair, role, &machine)?
        }
    };
    let days = a.days.unwrap_or(defaults::CERT_DAYS);
    ca.issue(&id, crate::trust::pki::days(days), &a.san)?
        .write_dir(out)?;
    println!("{} -> {}", id, out.display());
    Ok(())
}

/// `coordinator cert --server`: the server certificate for the default names and `--san`,
/// replacing the one in DIR/server (a coordinator that moved to a new address).
fn server_cert(a: &CertArgs, ca: &Ca) -> anyhow::Result<()> {
    let out = a.dir.join(service::SERVER_TLS_DIR);
    let cert = match a.days {
        Some(days) => ca.issue(
            &Identity::Coordinator,
            crate::trust::pki::days(days),
            &server_sans(&a.san),
        )?,
        None => ca.issue_server(&a.san)?,
    };
    cert.write_dir(&out)?;
    println!("{} -> {}", Identity::Coordinator, out.display());
    println!("server certificate for: {}", names(&server_sans(&a.san)));
    println!("restart the coordinator to serve it");
    Ok(())
}

fn names(sans: &[San]) -> String {
    sans.iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
