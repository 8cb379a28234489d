//! An agent from start to stop, whichever its role: [`open`] gets the identity and the replica,
//! [`run`] serves until a stop signal (endpoint, control socket, node, and the coordinator link
//! when one manages it), [`sync_once`] is agent-gpu's `--once`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::config::AgentConfig;
use crate::agent::managed::{self, Managed};
use crate::agent::metrics::{AgentLabel, AgentMetrics};
use crate::agent::node::{Mode, Node, NodeOptions};
use crate::agent::socket::{self, InjectedFault};
use crate::agent::{backups, endpoint, join, revocations, snapshots, versions};
use crate::disk::statedir::{self, StateLock};
use crate::history::Store;
use crate::replication::continuous::{self, Control, Target};
use crate::replication::receive::{Receiver, ReceiverOptions};
use crate::replication::send::{Report, Sender, SenderOptions};
use crate::trust::identity::Role;
use crate::trust::tls::{self, Expect, TlsMaterial};
use crate::types::Epoch;

/// The agent's identity and its opened replica.
pub struct Opened {
    pub material: TlsMaterial,
    pub pair: String,
    /// The machine the certificate names.
    pub machine: String,
    pub peer: Expect,
    pub receiver: Receiver,
    pub lock: StateLock,
}

/// Joins (or loads certificates), locks the state directory, loads the revocation list and
/// opens the replica state, all before anything is served.
pub async fn open(cfg: &AgentConfig) -> anyhow::Result<Opened> {
    let mut material = join::identity(cfg).await?;
    let pair = material.identity.pair().expect("node identity").to_string();
    let machine = material
        .identity
        .machine()
        .expect("node identity")
        .to_string();
    if machine != cfg.machine {
        tracing::info!(certificate = %machine, configured = %cfg.machine, "this agent is the machine its certificate names");
    }
    let peer = Expect::Seat {
        pair: pair.clone(),
        role: cfg.role.peer(),
    };
    let lock = statedir::lock(&cfg.state_dir)?;
    material.deny = revocations::load(&cfg.state_dir)?;
    let opts = ReceiverOptions {
        workspace: cfg.workspace.clone(),
        state_dir: cfg.state_dir.clone(),
        sender: peer.clone(),
        deny: material.deny.clone(),
        // A CPU standby seeded by hand reuses what it holds; a GPU sends first.
        adopt: cfg.role == Role::Cpu,
        accepting: cfg.role == Role::Cpu,
        keep_setuid: cfg.keep_setuid,
    };
    let receiver = tokio::task::spawn_blocking(move || Receiver::open(opts))
        .await?
        .context("opening the replica")?;
    // Every pair starts at epoch 1 (the sender's first session raises its own 0 to 1 too), so
    // a receiver holds it before any hello: from then on only the coordinator raises it.
    receiver
        .raise_epoch(FIRST_EPOCH)
        .await
        .context("persisting the first epoch")?;
    Ok(Opened {
        material,
        pair,
        machine,
        peer,
        receiver,
        lock,
    })
}

/// The history store's directory in the state directory.
pub const HISTORY_DIR: &str = "history";

/// The epoch every pair starts at.
const FIRST_EPOCH: Epoch = Epoch(1);

/// Runs an agent until it is told to stop: serves its endpoint (health, and replication into
/// it when it receives), its control socket, heartbeats and commands when a coordinator
/// manages it, and replication in whichever direction its mode says.
pub async fn run(mut cfg: AgentConfig, o: Opened) -> anyhow::Result<()> {
    let Opened {
        material,
        pair,
        machine,
        peer,
        receiver,
        lock: _lock,
    } = o;
    // Reports and logs name the machine the certificate names (the coordinator checks it).
    cfg.machine = machine;
    log_ready(&cfg, &receiver);
    let shutdown = stop_on_signal();
    tokio::spawn(crate::host::trim_when_idle(shutdown.clone()));
    let history = open_history(&cfg, &receiver, &shutdown).await?;
    let router = tls::server_builder()
        .add_service(receiver.service())
        .add_optional_service(
            history
                .as_ref()
                .map(|(store, _)| versions::service(store.clone(), receiver.clone())),
        );
    let (addr, endpoint) =
        endpoint::serve(&cfg.listen, &material, router, shutdown.clone()).await?;
    std::fs::write(cfg.state_dir.join("listen.addr"), addr.to_string())?;
    let options = node_options(&cfg, &pair, &peer, &material);
    let initial = initial_mode(&cfg, &peer);
    let (node, ctl_tx, driver) = Node::start(options, receiver, initial, shutdown.clone());
    let fault: InjectedFault = Arc::new(Mutex::new(None));
    let store = history.as_ref().map(|(store, _)| store.clone());
    let ctl = spawn_socket(&cfg, (&node, store), ctl_tx, fault.clone(), &shutdown);
    let metrics = serve_metrics(&cfg, &pair, &shutdown).await?;
    if let Some(url) = &cfg.coordinator {
        let m = Managed {
            url: url.clone(),
            tls: material.clone(),
            cert_dir: join::cert_dir(&cfg),
            node,
            fault,
            listen_port: addr.port(),
            history: history.map(|(_, recorder)| recorder),
            metrics,
        };
        managed::start(&cfg, m, &shutdown)?;
    }
    tracing::info!(%addr, pair = %pair, role = cfg.role.as_str(), "agent running");
    crate::systemd::ready_until(&shutdown);
    shutdown.cancelled().await;
    drain(driver, ctl, endpoint).await;
    Ok(())
}

/// One generation to the static peer `peer_url`, durable there when this returns (agent-gpu's
/// `--once`).
pub async fn sync_once(
    cfg: &AgentConfig,
    opened: Opened,
    peer_url: &str,
) -> anyhow::Result<Report> {
    let target = Target {
        url: peer_url.to_string(),
        identity: opened.peer.clone(),
        epoch: None,
    };
    let opts = sender_options(cfg);
    let guard = opened.receiver.state().lock_owned().await;
    let figures = Arc::new(Mutex::new(Default::default()));
    let mut sender =
        tokio::task::spawn_blocking(move || Sender::new(opts, guard, figures)).await??;
    Ok(continuous::once(&mut sender, &opened.material, &target).await?)
}

/// A CPU standby keeps history (unless turned off): its store, and the recorder that adds a
/// snapshot after each committed generation.
async fn open_history(
    cfg: &AgentConfig,
    receiver: &Receiver,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(Arc<Store>, snapshots::Recorder)>> {
    let Some(retention) = cfg.history.clone() else {
        return Ok(None);
    };
    let dir = cfg.state_dir.join(HISTORY_DIR);
    let store = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir))
            .await?
            .context("opening the history store")?
    };
    let store = Arc::new(store);
    let recorder = snapshots::start(store.clone(), receiver.clone(), retention, shutdown.clone())
        .context("starting the history's recorder")?;
    if let Some(b) = &cfg.backup {
        backups::start(
            b,
            (&dir, &cfg.state_dir),
            recorder.changed(),
            recorder.shared_figures(),
            shutdown.clone(),
        )
        .context("starting the off-site backup")?;
    }
    Ok(Some((store, recorder)))
}

fn log_ready(cfg: &AgentConfig, receiver: &Receiver) {
    let f = receiver.figures();
    tracing::info!(
        role = cfg.role.as_str(),
        workspace = %cfg.workspace.display(),
        generation = %f.generation,
        epoch = %f.epoch,
        entries = f.entries,
        "replica state ready"
    );
}

/// The agent's own `/metrics` on `--metrics-listen`, its address written to
/// `<state>/metrics.addr` (None: not asked for). Its figures come from the heartbeat reports, so
/// only a managed agent fills them.
async fn serve_metrics(
    cfg: &AgentConfig,
    pair: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<AgentMetrics>>> {
    let Some(addr) = &cfg.metrics_listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-listen {addr}: cannot bind"))?;
    let bound = listener.local_addr()?;
    crate::disk::crashsafe::write_atomic(
        &cfg.state_dir.join("metrics.addr"),
        bound.to_string().as_bytes(),
    )?;
    let metrics = Arc::new(AgentMetrics::new(AgentLabel {
        pair: pair.to_string(),
        role: cfg.role.as_str().to_string(),
        machine: cfg.machine.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }));
    let m = metrics.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::exposition::serve(listener, move || m.encode(), stop).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "serving metrics");
    Ok(Some(metrics))
}

/// The cancellation root: cancelled on SIGINT or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::cli::stop_signal().await;
        tracing::info!("stopping");
        stop.cancel();
    });
    shutdown
}

fn sender_options(cfg: &AgentConfig) -> SenderOptions {
    let mut opts = SenderOptions::new(cfg.workspace.clone(), cfg.state_dir.clone());
    opts.compress_level = cfg.compress_level;
    opts.bandwidth = cfg
        .bwlimit
        .map(|b| std::sync::Arc::new(crate::rate::RateLimit::new(b)));
    opts.machine = cfg.machine.clone();
    opts
}

fn node_options(
    cfg: &AgentConfig,
    pair: &str,
    seat: &Expect,
    material: &TlsMaterial,
) -> NodeOptions {
    NodeOptions {
        pair: pair.to_string(),
        seat: seat.clone(),
        workspace: cfg.workspace.clone(),
        sender: sender_options(cfg),
        tls: material.clone(),
        loop_cfg: cfg.loop_cfg.clone(),
        on_promote: cfg.on_promote.clone(),
        on_demote: cfg.on_demote.clone(),
    }
}

/// A GPU of a static pair sends from the start; a managed GPU waits for the coordinator; a CPU
/// receives.
fn initial_mode(cfg: &AgentConfig, peer: &Expect) -> Mode {
    match (cfg.role, &cfg.peer) {
        (Role::Gpu, Some(url)) => Mode::Send(Target {
            url: url.clone(),
            identity: peer.clone(),
            epoch: None,
        }),
        (Role::Gpu, None) => Mode::Idle,
        _ => Mode::Receive(None),
    }
}

fn spawn_socket(
    cfg: &AgentConfig,
    (node, history): (&Node, Option<Arc<Store>>),
    ctl_tx: tokio::sync::mpsc::Sender<Control>,
    fault: InjectedFault,
    shutdown: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let state_dir = cfg.state_dir.clone();
    let parts = (node.clone(), history);
    let shutdown = shutdown.clone();
    tokio::spawn(async move { socket::serve(&state_dir, parts, ctl_tx, fault, shutdown).await })
}

/// After the stop: gives the node, the control socket and the endpoint a few seconds each to
/// finish (the node answers pending flushes, the socket removes itself).
async fn drain(
    driver: JoinHandle<()>,
    ctl: JoinHandle<std::io::Result<()>>,
    endpoint: JoinHandle<()>,
) {
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(2), ctl).await {
        tracing::warn!(error = %e, "control socket");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint).await;
}
