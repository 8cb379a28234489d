//! What an agent runs when a coordinator manages it: the heartbeat link, the CPU's probe of its
//! GPU peer, and the dispatch of the coordinator's commands to the node.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::config::AgentConfig;
use crate::agent::link::{self, LinkOptions, ReportFn};
use crate::agent::node::Node;
use crate::agent::probe;
use crate::agent::report::Reporter;
use crate::agent::socket::InjectedFault;
use crate::proto::Command;
use crate::proto::command::Cmd;
use crate::trust::identity::Role;
use crate::trust::tls::{Expect, TlsMaterial};

/// The running agent's parts the managed tasks share.
pub struct Managed {
    /// The coordinator, as host:port.
    pub url: String,
    pub tls: TlsMaterial,
    /// The identity the paired agent's certificate carries.
    pub peer: Expect,
    pub node: Node,
    pub fault: InjectedFault,
    /// The port the endpoint is bound to (reported, for the peer to reach it).
    pub listen_port: u16,
}

/// Spawns the link, the probe (CPU agent) and the command dispatcher; they stop with
/// `shutdown`.
pub fn start(cfg: &AgentConfig, m: Managed, shutdown: &CancellationToken) {
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let probe = probe::Shared::default();
    let (probe_tx, probe_rx) = watch::channel(None::<String>);
    if cfg.role == Role::Cpu {
        tokio::spawn(probe::run(
            probe_rx,
            m.tls.clone(),
            m.peer.clone(),
            cfg.heartbeat,
            probe.clone(),
            shutdown.clone(),
        ));
    }
    let reporter = Arc::new(Reporter::new(
        cfg,
        m.listen_port,
        m.node.clone(),
        probe,
        m.fault,
    ));
    let report: ReportFn = Arc::new(move || reporter.report());
    let opts = LinkOptions {
        url: m.url,
        tls: m.tls,
        interval: cfg.heartbeat,
    };
    tokio::spawn(link::run(opts, report, cmd_tx, shutdown.clone()));
    tokio::spawn(dispatch(cmd_rx, probe_tx, m.node, m.peer));
}

/// Hands each command to the node, except the probe target, which goes to the probe. Any
/// other command but `Receive` also stops the probe: only a standby that receives watches a GPU.
async fn dispatch(
    mut commands: mpsc::Receiver<Command>,
    probe_tx: watch::Sender<Option<String>>,
    node: Node,
    peer: Expect,
) {
    while let Some(c) = commands.recv().await {
        let Some(cmd) = c.cmd else { continue };
        match cmd {
            Cmd::Probe(p) => {
                if probe_tx.borrow().as_deref() != Some(p.url.as_str()) {
                    tracing::info!(gpu = %p.url, "probing the GPU agent");
                    let _ = probe_tx.send(Some(p.url));
                }
            }
            other => {
                if !matches!(other, Cmd::Receive(_)) {
                    let _ = probe_tx.send(None);
                }
                node.command(other, &peer);
            }
        }
    }
}
