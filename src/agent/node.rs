//! An agent's runtime, the same for both roles: one replica state and the mode the coordinator
//! (or a static configuration) puts the agent in.
//!
//! Replication runs in whichever direction the pair needs: normally the GPU sends and the CPU
//! receives; during a restore the CPU sends to a new GPU that receives; at cutover the CPU
//! freezes (its `on_demote` hook, a final catch-up) and the roles flip back at a higher epoch.
//! Both directions use the same [`ReplicaState`](crate::replication::receive::ReplicaState): the manifest
//! the two machines last agreed on, so after a flip the new sender starts from what the other
//! side already holds instead of sending everything again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::proto::AgentMode;
use crate::proto::command::Cmd;
use crate::replication::continuous::{self, Control, LoopConfig, Target};
use crate::replication::receive::Receiver;
use crate::replication::send::{Sender, SenderFigures, SenderOptions};
use crate::text::hex;
use crate::trust::tls::TlsMaterial;
use crate::types::Epoch;

/// What the agent does now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Neither sends nor accepts (a managed agent before the coordinator speaks).
    Idle,
    /// Accepts replication from the peer at this epoch (None: the epoch it already has).
    Receive(Option<Epoch>),
    /// Replicates the workspace to a peer.
    Send(Target),
    /// The primary with nobody to replicate to (a CPU after failover).
    Primary(Epoch),
    /// Another machine is the primary: neither sends nor accepts.
    Fenced(Epoch, String),
}

impl Mode {
    /// The mode as heartbeats report it.
    pub fn kind(&self) -> AgentMode {
        match self {
            Mode::Idle => AgentMode::Idle,
            Mode::Receive(_) => AgentMode::Receive,
            Mode::Send(_) => AgentMode::Send,
            Mode::Primary(_) => AgentMode::Primary,
            Mode::Fenced(..) => AgentMode::Fenced,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Receive(_) => "receive",
            Mode::Send(_) => "send",
            Mode::Primary(_) => "primary",
            Mode::Fenced(..) => "fenced",
        }
    }
}

pub struct NodeOptions {
    pub pair: String,
    pub workspace: PathBuf,
    pub sender: SenderOptions,
    pub tls: TlsMaterial,
    pub loop_cfg: LoopConfig,
    pub on_promote: String,
    pub on_demote: String,
}

struct Inner {
    opts: NodeOptions,
    receiver: Receiver,
    figures: Arc<Mutex<SenderFigures>>,
    mode: watch::Sender<Mode>,
    frozen_epoch: AtomicU64,
    freezing: AtomicBool,
    ctl: mpsc::Sender<Control>,
}

/// A handle on the running agent; cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// The parts of a heartbeat report that depend on the mode.
#[derive(Clone, Debug, Default)]
pub struct NodeReport {
    pub mode: AgentMode,
    pub epoch: u64,
    pub generation: u64,
    pub root: String,
    pub frozen_epoch: u64,
    pub workspace_bytes: u64,
    pub bytes_total: u64,
    pub connected: bool,
    pub fenced: bool,
    pub sender: SenderFigures,
}

impl Node {
    /// Starts the runtime in `mode` over an opened receiver. Returns the handle and the
    /// channel flush requests go to (the control socket's).
    pub fn start(
        opts: NodeOptions,
        receiver: Receiver,
        mode: Mode,
        shutdown: CancellationToken,
    ) -> (Node, mpsc::Sender<Control>, tokio::task::JoinHandle<()>) {
        let (ctl_tx, ctl_rx) = mpsc::channel(64);
        let (mode_tx, mode_rx) = watch::channel(mode);
        let node = Node {
            inner: Arc::new(Inner {
                opts,
                receiver,
                figures: Arc::new(Mutex::new(SenderFigures::default())),
                mode: mode_tx,
                frozen_epoch: AtomicU64::new(0),
                freezing: AtomicBool::new(false),
                ctl: ctl_tx.clone(),
            }),
        };
        let h = tokio::spawn(node.clone().drive(mode_rx, ctl_rx, shutdown));
        (node, ctl_tx, h)
    }

    pub fn figures(&self) -> Arc<Mutex<SenderFigures>> {
        self.inner.figures.clone()
    }

    pub fn receiver(&self) -> &Receiver {
        &self.inner.receiver
    }

    pub fn mode(&self) -> Mode {
        self.inner.mode.borrow().clone()
    }

    /// Puts the agent in `mode` (no-op when it already is).
    pub fn set_mode(&self, mode: Mode) {
        self.inner.mode.send_if_modified(|m| {
            if *m == mode {
                false
            } else {
                tracing::info!(from = m.name(), to = mode.name(), "mode");
                *m = mode;
                true
            }
        });
    }

    /// Acts on a command from the coordinator. `peer` is the identity the peer's certificate
    /// must carry when this agent sends to it.
    pub fn command(&self, cmd: Cmd, peer: &crate::trust::identity::Identity) {
        match cmd {
            Cmd::SetPeer(p) => self.set_mode(Mode::Send(Target {
                url: p.url,
                identity: peer.clone(),
                epoch: Some(Epoch(p.epoch)),
            })),
            Cmd::Receive(r) => self.set_mode(Mode::Receive(Some(Epoch(r.epoch)))),
            Cmd::Promote(p) => self.set_mode(Mode::Primary(Epoch(p.epoch))),
            Cmd::Fence(f) => {
                if !matches!(self.mode(), Mode::Fenced(..)) {
                    tracing::error!(epoch = f.epoch, reason = %f.reason, "fenced by the coordinator: not sending, not accepting");
                }
                self.set_mode(Mode::Fenced(Epoch(f.epoch), f.reason))
            }
            Cmd::Freeze(f) => self.freeze(Epoch(f.epoch)),
            Cmd::Probe(_) => {}
        }
    }

    /// Cutover or hibernation: the `on_demote` hook stops the application, then a final sync
    /// makes everything written so far durable on the peer; `frozen_epoch` then says so.
    fn freeze(&self, epoch: Epoch) {
        if self.inner.frozen_epoch.load(Ordering::SeqCst) >= epoch.0 {
            return;
        }
        let Mode::Send(_) = self.mode() else {
            tracing::warn!(%epoch, mode = self.mode().name(), "freeze asked while not sending; ignored");
            return;
        };
        if self.inner.freezing.swap(true, Ordering::SeqCst) {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            let o = &node.inner.opts;
            tracing::warn!(%epoch, "freezing: handing the primary role over");
            if !o.on_demote.trim().is_empty() {
                let st = crate::agent::runtime::run_hook_wait(
                    "on_demote",
                    &o.on_demote,
                    &o.pair,
                    epoch.0,
                    &o.workspace,
                    Duration::from_secs(300),
                )
                .await;
                if let Err(e) = st {
                    tracing::warn!(error = %e, "on_demote hook failed; freezing anyway");
                }
            }
            // Two barriers: the second proves nothing changed after the first.
            let mut ok = false;
            for _ in 0..20 {
                let before = node.inner.figures.lock().expect("figures").root.clone();
                match node.flush(Duration::from_secs(600)).await {
                    Ok(_) => {
                        let after = node.inner.figures.lock().expect("figures").root.clone();
                        if after == before {
                            ok = true;
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "final sync failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                if !matches!(node.mode(), Mode::Send(_)) {
                    break;
                }
            }
            if ok {
                node.inner.frozen_epoch.fetch_max(epoch.0, Ordering::SeqCst);
                tracing::warn!(%epoch, "frozen: everything written here is durable on the peer");
            }
            node.inner.freezing.store(false, Ordering::SeqCst);
        });
    }

    /// Waits until everything written before the call is durable on the peer.
    pub async fn flush(&self, timeout: Duration) -> Result<u64, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .ctl
            .send(Control::Flush {
                asked: std::time::Instant::now(),
                reply: tx,
            })
            .await
            .map_err(|_| "agent stopping".to_string())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("agent stopping".into()),
            Err(_) => Err(format!("not durable after {timeout:?}")),
        }
    }

    /// The mode-dependent part of a heartbeat.
    pub fn report(&self) -> NodeReport {
        let mode = self.mode();
        let f = self.inner.figures.lock().expect("figures").clone();
        let frozen_epoch = self.inner.frozen_epoch.load(Ordering::SeqCst);
        let rf = self.inner.receiver.figures();
        if let Mode::Send(_) = mode {
            NodeReport {
                mode: mode.kind(),
                epoch: f.epoch,
                generation: f.last_durable_generation,
                root: f.root.clone(),
                frozen_epoch,
                workspace_bytes: f.workspace_bytes,
                bytes_total: f.workspace_bytes,
                connected: f.connected,
                fenced: f.fenced,
                sender: f,
            }
        } else {
            NodeReport {
                mode: mode.kind(),
                epoch: rf.epoch.0,
                generation: rf.generation.0,
                root: hex(&rf.root),
                frozen_epoch,
                workspace_bytes: rf.bytes,
                bytes_total: rf.bytes,
                connected: rf.session_active,
                fenced: matches!(mode, Mode::Fenced(..)),
                sender: f,
            }
        }
    }

    async fn drive(
        self,
        mut mode_rx: watch::Receiver<Mode>,
        mut ctl_rx: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) {
        let inner = self.inner.clone();
        let mut hooked: Option<Epoch> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mode = mode_rx.borrow_and_update().clone();
            let recv = &inner.receiver;
            match mode.clone() {
                Mode::Send(t) => {
                    recv.set_accepting(false);
                    let guard = recv.state().lock_owned().await;
                    let (opts, figures) = (inner.opts.sender.clone(), inner.figures.clone());
                    let sender =
                        tokio::task::spawn_blocking(move || Sender::new(opts, guard, figures))
                            .await;
                    let sender = match sender {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "cannot start sending; retrying");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "sender task failed");
                            break;
                        }
                    };
                    inner.figures.lock().expect("figures").fenced = false;
                    let (ttx, trx) = watch::channel(Some(t));
                    let stop = shutdown.child_token();
                    let fwd = {
                        let mut rx = mode_rx.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            while rx.changed().await.is_ok() {
                                let m = rx.borrow_and_update().clone();
                                match m {
                                    Mode::Send(t2) => {
                                        let _ = ttx.send(Some(t2));
                                    }
                                    _ => {
                                        stop.cancel();
                                        break;
                                    }
                                }
                            }
                        })
                    };
                    let sender = continuous::run(
                        sender,
                        inner.opts.tls.clone(),
                        trx,
                        inner.opts.loop_cfg.clone(),
                        &mut ctl_rx,
                        stop,
                    )
                    .await;
                    fwd.abort();
                    drop(sender);
                    recv.refresh_figures().await;
                    continue;
                }
                Mode::Receive(e) => {
                    if let Some(e) = e
                        && let Err(err) = recv.raise_epoch(e).await
                    {
                        tracing::error!(error = %err, "cannot persist the epoch; not accepting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    inner.figures.lock().expect("figures").fenced = false;
                    recv.set_accepting(true);
                }
                Mode::Primary(e) => {
                    recv.set_accepting(false);
                    // Durable before anything else: from now on data of older epochs is refused.
                    if let Err(err) = recv.raise_epoch(e).await {
                        tracing::error!(error = %err, "cannot persist the new epoch; not promoting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    recv.refresh_figures().await;
                    if hooked != Some(e) {
                        hooked = Some(e);
                        tracing::warn!(epoch = %e, "promoted: this machine is the primary now");
                        let o = &inner.opts;
                        crate::agent::runtime::run_hook(
                            "on_promote",
                            &o.on_promote,
                            &o.pair,
                            e.0,
                            &o.workspace,
                        );
                    }
                }
                Mode::Fenced(..) => {
                    recv.set_accepting(false);
                    inner.figures.lock().expect("figures").fenced = true;
                }
                Mode::Idle => recv.set_accepting(false),
            }
            // Wait for the next mode; flushes cannot be answered meanwhile.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = mode_rx.changed() => {
                        if r.is_err() {
                            return;
                        }
                        break;
                    }
                    c = ctl_rx.recv() => match c {
                        Some(Control::Flush { reply, .. }) => {
                            let _ = reply.send(Err(format!(
                                "not replicating: this agent is in {} mode",
                                mode.name()
                            )));
                        }
                        None => return,
                    },
                }
            }
        }
    }
}
