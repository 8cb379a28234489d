//! coordinator: certificate authority, pairing, failure detection, failover and recovery.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use standby::cli::{defaults, fail, init_logging, parse_or_exit};
use standby::identity::{Identity, Role};
use standby::pki::Ca;

/// The Standby coordinator.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CertRole {
    Gpu,
    Cpu,
    Admin,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the certificate authority, an admin certificate and coordinator.toml under DIR.
    Init {
        #[arg(long, env = "STANDBY_DIR")]
        dir: PathBuf,
    },
    /// Issue a static certificate: writes OUT/ca.pem, OUT/node.pem, OUT/node.key (mode 0600).
    Cert {
        #[arg(long, env = "STANDBY_DIR")]
        dir: PathBuf,
        /// The pair the certificate belongs to (for gpu and cpu).
        #[arg(long)]
        pair: Option<String>,
        #[arg(long, value_enum)]
        role: CertRole,
        /// Admin name (for --role admin; default "admin").
        #[arg(long)]
        name: Option<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = defaults::CERT_DAYS)]
        days: u32,
    },
}

fn main() {
    let cli: Cli = parse_or_exit();
    init_logging("warn");
    standby::tls::install_default_provider();
    let r = match cli.cmd {
        Cmd::Init { dir } => init(&dir),
        Cmd::Cert {
            dir,
            pair,
            role,
            name,
            out,
            days,
        } => cert(&dir, pair, role, name, &out, days),
    };
    if let Err(e) = r {
        fail(&e);
    }
}

fn init(dir: &Path) -> anyhow::Result<()> {
    if dir.join("ca.key").exists() {
        bail!(
            "{} already holds a CA; refusing to replace it (every certificate depends on it)",
            dir.display()
        );
    }
    standby::pki::create_private_dir(dir)?;
    let ca = Ca::generate()?;
    ca.save(dir)?;
    let admin = ca.issue(&Identity::admin("admin")?, defaults::CERT_DAYS)?;
    admin.write_dir(&dir.join("admin"))?;
    let toml = format!(
        "# Standby coordinator configuration. Every key can also be given as a flag or a\n\
         # STANDBY_* environment variable (which win over this file).\n\
         listen = \"0.0.0.0:{}\"\n\
         metrics_listen = \"0.0.0.0:{}\"\n\
         provider = \"local\"\n\
         heartbeat_interval = \"1s\"\n\
         suspect_after_missed = 2\n\
         failover_after = \"3s\"\n",
        defaults::COORDINATOR_PORT,
        defaults::METRICS_PORT
    );
    let cfg = dir.join("coordinator.toml");
    if !cfg.exists() {
        std::fs::write(&cfg, toml).with_context(|| format!("writing {}", cfg.display()))?;
    }
    println!("CA fingerprint (sha256): {}", ca.fingerprint());
    println!("admin certificate: {}", dir.join("admin").display());
    Ok(())
}

fn cert(
    dir: &Path,
    pair: Option<String>,
    role: CertRole,
    name: Option<String>,
    out: &Path,
    days: u32,
) -> anyhow::Result<()> {
    let ca = Ca::load(dir).with_context(|| {
        format!(
            "loading the CA from {} (run `coordinator init` first)",
            dir.display()
        )
    })?;
    let id = match role {
        CertRole::Admin => Identity::admin(name.as_deref().or(pair.as_deref()).unwrap_or("admin"))?,
        CertRole::Gpu | CertRole::Cpu => {
            let Some(pair) = pair else {
                standby::cli::usage_error("--pair is required for gpu and cpu certificates");
            };
            Identity::node(
                &pair,
                if matches!(role, CertRole::Gpu) {
                    Role::Gpu
                } else {
                    Role::Cpu
                },
            )?
        }
    };
    ca.issue(&id, days)?.write_dir(out)?;
    println!("{} -> {}", id, out.display());
    Ok(())
}
