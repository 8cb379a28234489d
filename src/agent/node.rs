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

use crate::agent::hooks::{run_hook, run_hook_wait};
use crate::proto::AgentMode;
use crate::proto::command::Cmd;
use crate::replication::continuous::{self, Control, LoopConfig, Target};
use crate::replication::receive::{Expected, Receiver};
use crate::replication::send::{Sender, SenderFigures, SenderOptions};
use crate::text::hex;
use crate::trust::identity::Identity;
use crate::trust::tls::{Expect, TlsMaterial};
use crate::types::Epoch;

/// What the agent does now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Neither sends nor accepts (a managed agent before the coordinator speaks).
    Idle,
    /// Accepts replication from the machine and at the epoch the coordinator named (None: from
    /// the peer seat at the durable epoch, a static pair).
    Receive(Option<Named>),
    /// Replicates the workspace to a peer.
    Send(Target),
    /// The primary with nobody to replicate to (a CPU after failover).
    Primary(Epoch),
    /// Another machine is the primary: neither sends nor accepts.
    Fenced(Epoch, String),
    /// A new standby of a pair rebuilt from its backup: fills its empty replica from the bucket
    /// (`agent::seed`) at this epoch; neither sends nor accepts meanwhile.
    Seeding(Epoch),
}

/// The sender a `Receive` command names (its machine, or any machine of the peer seat when
/// the coordinator does not say) and the exact epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub epoch: Epoch,
    pub sender: Expect,
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
            Mode::Seeding(_) => AgentMode::Seeding,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Receive(_) => "receive",
            Mode::Send(_) => "send",
            Mode::Primary(_) => "primary",
            Mode::Fenced(..) => "fenced",
            Mode::Seeding(_) => "seeding",
        }
    }
}

pub struct NodeOptions {
    pub pair: String,
    /// The peer's seat (its pair and role); the coordinator's commands name the machine in it.
    pub seat: Expect,
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
    /// The last coordinator command refused (reported as the heartbeat's `last_error` until a
    /// command is accepted).
    refused: Mutex<Option<String>>,
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
    /// What went wrong last: a refused command, else the sender's last error while sending.
    pub last_error: String,
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
                refused: Mutex::new(None),
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

    /// Acts on a command from the coordinator, unless its epoch is below the durable one (a
    /// command from before a failover, replayed or forged) or it names an invalid machine:
    /// that is refused, logged and reported.
    pub fn command(&self, cmd: Cmd) {
        let r = check_epoch(&cmd, self.durable_epoch()).and_then(|()| self.apply(cmd));
        if let Err(why) = &r {
            tracing::warn!(error = %why, "coordinator command refused");
        }
        *self.inner.refused.lock().expect("refused") = r.err();
    }

    fn apply(&self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::SetPeer(p) => self.set_mode(Mode::Send(Target {
                identity: self.peer_expect(&p.machine)?,
                url: p.url,
                epoch: Some(Epoch(p.epoch)),
            })),
            Cmd::Receive(r) => self.set_mode(Mode::Receive(Some(Named {
                epoch: Epoch(r.epoch),
                sender: self.peer_expect(&r.peer)?,
            }))),
            Cmd::Promote(p) => self.set_mode(Mode::Primary(Epoch(p.epoch))),
            Cmd::Fence(f) => {
                if !matches!(self.mode(), Mode::Fenced(..)) {
                    tracing::error!(epoch = f.epoch, reason = %f.reason, "fenced by the coordinator: not sending, not accepting");
                }
                self.set_mode(Mode::Fenced(Epoch(f.epoch), f.reason))
            }
            Cmd::Freeze(f) => self.freeze(Epoch(f.epoch)),
            Cmd::Seed(s) => self.set_mode(Mode::Seeding(Epoch(s.epoch))),
            // Probes, renewal and revocation lists are handled beside the node (`managed`).
            Cmd::Probe(_) | Cmd::Renewed(_) | Cmd::Revocations(_) | Cmd::Backup(_) => {}
        }
        Ok(())
    }

    /// The coordinator revoked this machine's certificate (it was failed over from or replaced):
    /// fenced for good, at the durable epoch — it neither sends nor accepts any more.
    pub fn revoked(&self) {
        if matches!(self.mode(), Mode::Fenced(..)) {
            return;
        }
        let reason = "this machine's certificate was revoked by the coordinator (the machine was failed over from or replaced)";
        tracing::error!(reason, "fenced: not sending, not accepting");
        self.set_mode(Mode::Fenced(self.durable_epoch(), reason.to_string()));
    }

    /// A channel to the standby this agent replicates to (for its history), while it sends.
    pub fn standby_channel(&self) -> Result<tonic::transport::Channel, String> {
        let Mode::Send(target) = self.mode() else {
            return Err(format!(
                "this agent is {}, not replicating to a standby now; its history is reachable \
                 while it sends",
                self.mode().name()
            ));
        };
        let cfg = self
            .inner
            .opts
            .tls
            .client_config(target.identity.clone())
            .map_err(|e| e.to_string())?;
        crate::trust::tls::connect_lazy(&target.url, cfg).map_err(|e| e.to_string())
    }

    /// The workspace this agent protects.
    pub fn workspace(&self) -> &std::path::Path {
        &self.inner.opts.workspace
    }

    /// The durable epoch (the receiver's, or the sender's while it holds the replica).
    pub fn durable_epoch(&self) -> Epoch {
        let sent = self.inner.figures.lock().expect("figures").epoch;
        Epoch(sent.max(self.inner.receiver.figures().epoch.0))
    }

    /// Who the peer must be: exactly `machine` of the peer seat, or ("") any machine of it.
    pub fn peer_expect(&self, machine: &str) -> Result<Expect, String> {
        peer_expect(&self.inner.opts.seat, machine)
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
        tokio::spawn(self.clone().hand_over(epoch));
    }

    async fn hand_over(self, epoch: Epoch) {
        tracing::warn!(%epoch, "freezing: handing the primary role over");
        self.demote_hook(epoch).await;
        if self.final_sync().await {
            self.inner.frozen_epoch.fetch_max(epoch.0, Ordering::SeqCst);
            tracing::warn!(%epoch, "frozen: everything written here is durable on the peer");
        }
        self.inner.freezing.store(false, Ordering::SeqCst);
    }

    /// Runs `on_demote` and waits for it; a failed hook does not stop the freeze.
    async fn demote_hook(&self, epoch: Epoch) {
        let o = &self.inner.opts;
        if o.on_demote.trim().is_empty() {
            return;
        }
        let st = run_hook_wait(
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

    /// Flushes until two barriers in a row end at the same root: the second proves nothing
    /// changed after the first. Gives up after 20 tries, or when the agent stops sending.
    async fn final_sync(&self) -> bool {
        for _ in 0..20 {
            let before = self.sender_root();
            match self.flush(Duration::from_secs(600)).await {
                Ok(_) => {
                    if self.sender_root() == before {
                        return true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "final sync failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if !matches!(self.mode(), Mode::Send(_)) {
                return false;
            }
        }
        false
    }

    fn sender_root(&self) -> String {
        self.inner.figures.lock().expect("figures").root.clone()
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
                last_error: self.refused().or(f.last_error.clone()).unwrap_or_default(),
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
                last_error: self.refused().unwrap_or_default(),
                sender: f,
            }
        }
    }

    fn refused(&self) -> Option<String> {
        self.inner.refused.lock().expect("refused").clone()
    }

    /// Puts the agent in each mode it is given, one at a time, until `shutdown`.
    async fn drive(
        self,
        mut mode_rx: watch::Receiver<Mode>,
        mut ctl_rx: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) {
        // The epoch whose `on_promote` hook has run: a repeated Promote does not run it again.
        let mut hooked: Option<Epoch> = None;
        let mut prev: Option<Mode> = None;
        while !shutdown.is_cancelled() {
            let mode = mode_rx.borrow_and_update().clone();
            if let Some(epoch) = promoted_by_sending(prev.as_ref(), &mode) {
                self.run_on_promote(epoch, &mut hooked);
            }
            prev = Some(mode.clone());
            let next = match mode.clone() {
                Mode::Send(t) => self.send(t, &mode_rx, &mut ctl_rx, &shutdown).await,
                Mode::Receive(e) => self.receive(e).await,
                Mode::Primary(e) => self.promote(e, &mut hooked).await,
                Mode::Fenced(..) => self.fence(),
                Mode::Seeding(e) => self.seeding(e).await,
                Mode::Idle => {
                    self.inner.receiver.set_accepting(false);
                    Next::Wait
                }
            };
            match next {
                Next::Again => {}
                Next::Stop => return,
                Next::Wait => {
                    if !next_mode(&mode, &mut mode_rx, &mut ctl_rx, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Replicates to `target`, and to the targets that follow while the mode stays Send, until
    /// the mode changes or the agent stops; the sending loop answers the flushes meanwhile.
    async fn send(
        &self,
        target: Target,
        mode_rx: &watch::Receiver<Mode>,
        ctl_rx: &mut mpsc::Receiver<Control>,
        shutdown: &CancellationToken,
    ) -> Next {
        let recv = &self.inner.receiver;
        recv.set_accepting(false);
        let sender = match self.start_sender().await {
            Ok(s) => s,
            Err(next) => return next,
        };
        self.inner.figures.lock().expect("figures").fenced = false;
        let (ttx, trx) = watch::channel(Some(target));
        let stop = shutdown.child_token();
        let fwd = tokio::spawn(forward_targets(mode_rx.clone(), ttx, stop.clone()));
        let o = &self.inner.opts;
        let sender =
            continuous::run(sender, o.tls.clone(), trx, o.loop_cfg.clone(), ctl_rx, stop).await;
        fwd.abort();
        drop(sender);
        recv.refresh_figures().await;
        Next::Again
    }

    /// A sender over the replica state (locked while it sends).
    async fn start_sender(&self) -> Result<Sender, Next> {
        let guard = self.inner.receiver.state().lock_owned().await;
        let (opts, figures) = (self.inner.opts.sender.clone(), self.inner.figures.clone());
        match tokio::task::spawn_blocking(move || Sender::new(opts, guard, figures)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot start sending; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                Err(Next::Again)
            }
            Err(e) => {
                tracing::error!(error = %e, "sender task failed");
                Err(Next::Stop)
            }
        }
    }

    /// Accepts replication from the sender the coordinator named, at its epoch (persisted
    /// first), or in a static pair from the peer seat at the durable epoch.
    async fn receive(&self, named: Option<Named>) -> Next {
        let recv = &self.inner.receiver;
        let expected = match named {
            None => Expected::seat(self.inner.opts.seat.clone()),
            Some(n) => {
                if let Err(err) = recv.raise_epoch(n.epoch).await {
                    tracing::error!(error = %err, "cannot persist the epoch; not accepting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return Next::Again;
                }
                Expected {
                    sender: n.sender,
                    epoch: Some(n.epoch),
                }
            }
        };
        self.inner.figures.lock().expect("figures").fenced = false;
        recv.expect(expected);
        recv.set_accepting(true);
        Next::Wait
    }

    /// Becomes the primary at `epoch`; runs `on_promote` once per epoch.
    async fn promote(&self, epoch: Epoch, hooked: &mut Option<Epoch>) -> Next {
        let recv = &self.inner.receiver;
        recv.set_accepting(false);
        // Durable before anything else: from now on data of older epochs is refused.
        if let Err(err) = recv.raise_epoch(epoch).await {
            tracing::error!(error = %err, "cannot persist the new epoch; not promoting");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Next::Again;
        }
        recv.refresh_figures().await;
        self.run_on_promote(epoch, hooked);
        Next::Wait
    }

    /// Runs `on_promote` once per epoch (a repeated command does not run it again).
    fn run_on_promote(&self, epoch: Epoch, hooked: &mut Option<Epoch>) {
        if *hooked != Some(epoch) {
            *hooked = Some(epoch);
            tracing::warn!(%epoch, "promoted: this machine is the primary now");
            let o = &self.inner.opts;
            run_hook("on_promote", &o.on_promote, &o.pair, epoch.0, &o.workspace);
        }
    }

    /// Takes the seed's epoch durably and accepts nothing: the seeder (`agent::seed`) fills the
    /// replica under its lock.
    async fn seeding(&self, epoch: Epoch) -> Next {
        let recv = &self.inner.receiver;
        recv.set_accepting(false);
        if let Err(err) = recv.raise_epoch(epoch).await {
            tracing::error!(error = %err, "cannot persist the seed's epoch");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Next::Again;
        }
        self.inner.figures.lock().expect("figures").fenced = false;
        Next::Wait
    }

    fn fence(&self) -> Next {
        self.inner.receiver.set_accepting(false);
        self.inner.figures.lock().expect("figures").fenced = true;
        Next::Wait
    }
}

/// The epoch at which this agent became the primary by starting to send right after it
/// received: a restored GPU at cutover (or a CPU standby that missed its `Promote` while it was
/// disconnected and is told to restore the new GPU). A GPU that starts sending from `Idle` (a
/// pair's first GPU, or an agent restarted while already primary) is not promoted: it was the
/// primary already. `Promote` itself is handled by `promote`.
fn promoted_by_sending(prev: Option<&Mode>, mode: &Mode) -> Option<Epoch> {
    match (prev, mode) {
        (Some(Mode::Receive(Some(_))), Mode::Send(t)) => t.epoch,
        _ => None,
    }
}

/// A command's epoch must not be below the durable one.
fn check_epoch(cmd: &Cmd, durable: Epoch) -> Result<(), String> {
    match command_epoch(cmd) {
        Some(e) if e < durable => Err(format!(
            "refused {} at epoch {e}: this agent is at epoch {durable}",
            command_name(cmd)
        )),
        _ => Ok(()),
    }
}

/// Exactly `machine` of `seat`, or ("", the coordinator does not say) any machine of it.
fn peer_expect(seat: &Expect, machine: &str) -> Result<Expect, String> {
    let Expect::Seat { pair, role } = seat else {
        return Ok(seat.clone());
    };
    if machine.is_empty() {
        return Ok(seat.clone());
    }
    Identity::node(pair, *role, machine)
        .map(Expect::Exactly)
        .map_err(|e| format!("the coordinator named an invalid peer machine: {e}"))
}

/// The epoch a coordinator command carries (none for those without one).
fn command_epoch(cmd: &Cmd) -> Option<Epoch> {
    match cmd {
        Cmd::SetPeer(p) => Some(Epoch(p.epoch)),
        Cmd::Receive(r) => Some(Epoch(r.epoch)),
        Cmd::Promote(p) => Some(Epoch(p.epoch)),
        Cmd::Fence(f) => Some(Epoch(f.epoch)),
        Cmd::Freeze(f) => Some(Epoch(f.epoch)),
        Cmd::Seed(s) => Some(Epoch(s.epoch)),
        Cmd::Probe(_) | Cmd::Renewed(_) | Cmd::Revocations(_) | Cmd::Backup(_) => None,
    }
}

fn command_name(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::SetPeer(_) => "SetPeer",
        Cmd::Receive(_) => "Receive",
        Cmd::Promote(_) => "Promote",
        Cmd::Fence(_) => "Fence",
        Cmd::Freeze(_) => "Freeze",
        Cmd::Probe(_) => "Probe",
        Cmd::Renewed(_) => "Renewed",
        Cmd::Revocations(_) => "Revocations",
        Cmd::Backup(_) => "Backup",
        Cmd::Seed(_) => "Seed",
    }
}

/// What the driver does once it has entered a mode.
enum Next {
    /// Stay in the mode until it changes.
    Wait,
    /// Enter the current mode again now (the sending loop ended, or a step failed and waited).
    Again,
    /// Stop driving (the sender's task failed).
    Stop,
}

/// While the mode stays Send, passes each new target on to the sending loop; any other mode
/// stops the loop.
async fn forward_targets(
    mut mode_rx: watch::Receiver<Mode>,
    targets: watch::Sender<Option<Target>>,
    stop: CancellationToken,
) {
    while mode_rx.changed().await.is_ok() {
        let m = mode_rx.borrow_and_update().clone();
        match m {
            Mode::Send(t) => {
                let _ = targets.send(Some(t));
            }
            _ => {
                stop.cancel();
                break;
            }
        }
    }
}

/// Waits for the next mode; meanwhile flushes are refused, since nothing is being replicated.
/// False when the agent stops.
async fn next_mode(
    mode: &Mode,
    mode_rx: &mut watch::Receiver<Mode>,
    ctl_rx: &mut mpsc::Receiver<Control>,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            r = mode_rx.changed() => return r.is_ok(),
            c = ctl_rx.recv() => match c {
                Some(Control::Flush { reply, .. }) => {
                    let _ = reply.send(Err(format!(
                        "not replicating: this agent is in {} mode",
                        mode.name()
                    )));
                }
                None => return false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Fence, Freeze, ProbeTarget, Promote, Receive, SetPeer};
    use crate::trust::identity::Role;

    fn with_epoch(e: u64) -> Vec<Cmd> {
        vec![
            Cmd::SetPeer(SetPeer {
                url: "127.0.0.1:1".into(),
                epoch: e,
                machine: "m".into(),
            }),
            Cmd::Receive(Receive {
                epoch: e,
                peer: "m".into(),
            }),
            Cmd::Promote(Promote { epoch: e }),
            Cmd::Fence(Fence {
                epoch: e,
                reason: "r".into(),
            }),
            Cmd::Freeze(Freeze { epoch: e }),
        ]
    }

    #[test]
    fn sending_right_after_receiving_is_a_promotion_and_nothing_else_is() {
        let seat = Expect::Seat {
            pair: "p".into(),
            role: Role::Cpu,
        };
        let send = |e: u64| {
            Mode::Send(Target {
                url: "127.0.0.1:1".into(),
                identity: seat.clone(),
                epoch: Some(Epoch(e)),
            })
        };
        let receive = Mode::Receive(Some(Named {
            epoch: Epoch(2),
            sender: seat.clone(),
        }));
        // A restored GPU at cutover: received at epoch 2, sends at 3.
        assert_eq!(
            promoted_by_sending(Some(&receive), &send(3)),
            Some(Epoch(3))
        );
        // A pair's first GPU, a restarted primary, a sender re-targeted: not promoted.
        assert_eq!(promoted_by_sending(None, &send(1)), None);
        assert_eq!(promoted_by_sending(Some(&Mode::Idle), &send(1)), None);
        assert_eq!(promoted_by_sending(Some(&send(1)), &send(1)), None);
        // A CPU restoring the new GPU after its Promote (that ran the hook already).
        assert_eq!(
            promoted_by_sending(Some(&Mode::Primary(Epoch(2))), &send(2)),
            None
        );
        // A static standby (no named sender) never sends; receiving is not a promotion.
        assert_eq!(promoted_by_sending(Some(&send(3)), &receive), None);
        assert_eq!(
            promoted_by_sending(Some(&Mode::Receive(None)), &send(1)),
            None
        );
    }

    #[test]
    fn commands_below_the_durable_epoch_are_refused() {
        for cmd in with_epoch(4) {
            let why = check_epoch(&cmd, Epoch(5)).unwrap_err();
            assert!(
                why.contains("at epoch 4: this agent is at epoch 5"),
                "{why}"
            );
            assert!(why.contains(command_name(&cmd)), "{why}");
        }
        for cmd in with_epoch(5).into_iter().chain(with_epoch(6)) {
            assert_eq!(check_epoch(&cmd, Epoch(5)), Ok(()), "{cmd:?}");
        }
        let probe = Cmd::Probe(ProbeTarget::default());
        assert_eq!(check_epoch(&probe, Epoch(5)), Ok(()));
    }

    #[test]
    fn the_named_machine_narrows_the_seat() {
        let seat = Expect::Seat {
            pair: "p".into(),
            role: Role::Cpu,
        };
        assert_eq!(peer_expect(&seat, ""), Ok(seat.clone()));
        let m2 = Identity::node("p", Role::Cpu, "m2").unwrap();
        assert_eq!(peer_expect(&seat, "m2"), Ok(Expect::Exactly(m2)));
        assert!(peer_expect(&seat, "bad/name").is_err());
    }
}
