//! What an agent runs when a coordinator manages it: the heartbeat link (with the renewal
//! request in its reports), the CPU's probe of its GPU peer, and the dispatch of the
//! coordinator's commands: to the node, the probe, the renewal and the revocation list. A
//! command from an older coordinator term than the newest seen is refused (`disk::term`).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::backups;
use crate::agent::config::AgentConfig;
use crate::agent::link::{self, LinkOptions, ReportFn};
use crate::agent::metrics::AgentMetrics;
use crate::agent::node::Node;
use crate::agent::probe::{self, ProbeTarget};
use crate::agent::renewal::Renewal;
use crate::agent::report::Reporter;
use crate::agent::revocations;
use crate::agent::seed::Seeder;
use crate::agent::snapshots::Recorder;
use crate::agent::socket::InjectedFault;
use crate::disk::term::{TermStore, Verdict};
use crate::proto::Command;
use crate::proto::command::Cmd;
use crate::trust::identity::Role;
use crate::trust::tls::TlsMaterial;

/// The running agent's parts the managed tasks share.
pub struct Managed {
    /// The coordinator, as host:port.
    pub url: String,
    pub tls: TlsMaterial,
    /// The directory the certificate was loaded from (a renewal replaces it there).
    pub cert_dir: PathBuf,
    pub node: Node,
    pub fault: InjectedFault,
    /// The port the endpoint is bound to (reported, for the peer to reach it).
    pub listen_port: u16,
    /// A CPU standby's history recorder (its figures go into each report).
    pub history: Option<Recorder>,
    /// The agent's own metrics, updated with each report (None: not served).
    pub metrics: Option<Arc<AgentMetrics>>,
}

/// Spawns the link, the probe (CPU agent) and the command dispatcher; they stop with
/// `shutdown`. Fails only when the newest term seen cannot be read.
pub fn start(cfg: &AgentConfig, m: Managed, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let terms = TermStore::open(&cfg.state_dir)?;
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let probe = probe::Shared::default();
    let (probe_tx, probe_rx) = watch::channel(None::<ProbeTarget>);
    if cfg.role == Role::Cpu {
        tokio::spawn(probe::run(
            probe_rx,
            m.tls.clone(),
            cfg.heartbeat,
            probe.clone(),
            shutdown.clone(),
        ));
    }
    let seeder = (cfg.role == Role::Cpu).then(|| {
        Seeder::new(
            m.node.receiver().clone(),
            &cfg.state_dir,
            cfg.backup.clone(),
            shutdown.clone(),
        )
    });
    let reporter = Arc::new(Reporter::new(
        cfg,
        m.listen_port,
        m.node.clone(),
        probe,
        m.fault,
        (m.history.clone(), seeder.clone()),
    ));
    let renewal = Arc::new(Renewal::new(m.cert_dir, &m.tls));
    let report: ReportFn = {
        let renewal = renewal.clone();
        let (metrics, keys) = (m.metrics, m.tls.keys.clone());
        Arc::new(move || {
            let mut r = reporter.report();
            if let Some(metrics) = &metrics {
                metrics.observe(&r, reporter.bytes_sent_total(), keys.facts().not_after_unix);
            }
            r.csr_pem = renewal.csr(crate::host::unix_ms_now() as i64 / 1000);
            r
        })
    };
    let offsite = m.history.map(|recorder| Offsite {
        recorder,
        state_dir: cfg.state_dir.clone(),
        own: cfg.backup.is_some(),
        started: std::sync::Mutex::new(None),
        shutdown: shutdown.clone(),
    });
    let dispatcher = Dispatcher {
        probe: probe_tx,
        node: m.node,
        renewal,
        tls: m.tls.clone(),
        state_dir: cfg.state_dir.clone(),
        offsite,
        seeder,
        terms,
    };
    let node = dispatcher.node.clone();
    let opts = LinkOptions {
        url: m.url,
        tls: m.tls,
        interval: cfg.heartbeat,
        on_revoked: Arc::new(move || node.revoked()),
    };
    tokio::spawn(link::run(opts, report, cmd_tx, shutdown.clone()));
    tokio::spawn(dispatcher.run(cmd_rx));
    Ok(())
}

/// Where the coordinator's commands go.
struct Dispatcher {
    probe: watch::Sender<Option<ProbeTarget>>,
    node: Node,
    renewal: Arc<Renewal>,
    tls: TlsMaterial,
    state_dir: PathBuf,
    /// A standby's history, which the coordinator may have backed up off-site.
    offsite: Option<Offsite>,
    /// A CPU standby's seed from the off-site backup.
    seeder: Option<Seeder>,
    /// The newest coordinator term seen.
    terms: TermStore,
}

/// The off-site backup the coordinator asks a standby for.
struct Offsite {
    recorder: Recorder,
    state_dir: PathBuf,
    /// The agent has a backup of its own (flags, file): it keeps that one.
    own: bool,
    /// The bucket the coordinator's backup went to, once started.
    started: std::sync::Mutex<Option<String>>,
    shutdown: CancellationToken,
}

impl Offsite {
    /// Starts the backup the coordinator names, once; a later, different target waits for a
    /// restart (said in the log).
    fn take(&self, t: &crate::proto::BackupTarget) {
        if self.own {
            tracing::debug!("the coordinator offers a backup; this agent keeps its own");
            return;
        }
        let mut started = self.started.lock().expect("offsite");
        if let Some(url) = started.as_ref() {
            if *url != t.url {
                tracing::warn!(running = %url, offered = %t.url, "the coordinator names another backup bucket: restart the agent to take it");
            }
            return;
        }
        let Some(settings) = backups::from_coordinator(t) else {
            return;
        };
        let store = self.state_dir.join(crate::agent::runtime::HISTORY_DIR);
        match backups::start(
            &settings,
            (&store, &self.state_dir),
            self.recorder.changed(),
            self.recorder.shared_figures(),
            self.shutdown.clone(),
        ) {
            Ok(()) => *started = Some(t.url.clone()),
            Err(e) => tracing::warn!(error = %e, "the coordinator's backup could not start"),
        }
    }
}

impl Dispatcher {
    /// Hands each command to the node, except the probe target (to the probe), a renewed
    /// certificate and the revocation list. Any other command but `Receive` also stops the
    /// probe: only a standby that receives watches a GPU.
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(c) = commands.recv().await {
            if !self.admit(c.term) {
                continue;
            }
            let Some(cmd) = c.cmd else { continue };
            match cmd {
                Cmd::Probe(p) => self.probe(p),
                Cmd::Renewed(r) => self.renewed(r.cert_pem).await,
                Cmd::Revocations(r) => self.revocations(r.serials).await,
                Cmd::Backup(b) => self.backup(&b),
                Cmd::Seed(s) => self.seed(s),
                other => {
                    if !matches!(other, Cmd::Receive(_)) {
                        let _ = self.probe.send(None);
                    }
                    self.node.command(other);
                }
            }
        }
    }

    /// Whether a command of `term` may be acted on: not when an older term than the newest
    /// seen (a deposed leader), nor when a newer one cannot be persisted first.
    fn admit(&mut self, term: u64) -> bool {
        match self.terms.admit(term) {
            Ok(Verdict::Current) => true,
            Ok(Verdict::Stale { newest }) => {
                tracing::warn!(
                    term,
                    newest,
                    "refusing a command from an older coordinator term (a deposed leader)"
                );
                false
            }
            Err(e) => {
                tracing::error!(term, error = %e, "cannot persist the coordinator's term; command refused");
                false
            }
        }
    }

    /// The coordinator's backup for this pair: the history's uploads go there, and a seed
    /// comes from there.
    fn backup(&self, b: &crate::proto::BackupTarget) {
        if let Some(s) = &self.seeder {
            s.offer(b);
        }
        match &self.offsite {
            Some(o) => o.take(b),
            None => {
                tracing::warn!("the coordinator offers a backup, but this agent keeps no history")
            }
        }
    }

    /// A seed from the backup: the node takes its epoch (or refuses it); only then it starts.
    fn seed(&self, s: crate::proto::Seed) {
        let asked = s.snapshot.clone();
        let _ = self.probe.send(None);
        self.node.command(Cmd::Seed(s));
        let seeding = matches!(self.node.mode(), crate::agent::node::Mode::Seeding(_));
        match (&self.seeder, seeding) {
            (Some(seeder), true) => seeder.start(&asked),
            (None, _) => tracing::warn!("a seed was asked of a GPU agent; ignored"),
            (_, false) => {}
        }
    }

    /// Takes a renewed certificate (written and synced off the async threads).
    async fn renewed(&self, cert_pem: String) {
        let renewal = self.renewal.clone();
        let r = tokio::task::spawn_blocking(move || renewal.renewed(&cert_pem)).await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "renewed certificate not taken; asking again"),
            Err(e) => tracing::error!(error = %e, "renewal task failed"),
        }
    }

    /// Takes the coordinator's revocation list (saved off the async threads).
    async fn revocations(&self, serials: Vec<String>) {
        let (deny, dir) = (self.tls.deny.clone(), self.state_dir.clone());
        let receiver = self.node.receiver().clone();
        let r = tokio::task::spawn_blocking(move || {
            revocations::apply(serials, &deny, &dir, &receiver)
        })
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "revocation task failed");
        }
        if self.tls.deny.contains(&self.tls.facts().serial) {
            self.node.revoked();
        }
    }

    /// Probes the GPU at the address and machine the coordinator names.
    fn probe(&self, p: crate::proto::ProbeTarget) {
        let expect = match self.node.peer_expect(&p.machine) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "probe target refused");
                return;
            }
        };
        let target = ProbeTarget { url: p.url, expect };
        if self.probe.borrow().as_ref() != Some(&target) {
            tracing::info!(gpu = %target.url, expect = %target.expect, "probing the GPU agent");
            let _ = self.probe.send(Some(target));
        }
    }
}
