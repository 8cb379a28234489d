//! What both agents do around their main job when a coordinator is involved: the endpoint the
//! peer probes, heartbeat reports, and the operator's hooks.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::proto::{AgentMode, AgentReport, GpuHealth, PeerContact};
use crate::trust::tls::{self, TlsMaterial};

/// Serves gRPC health on `listen` over mutual TLS (what the paired agent probes). Returns the
/// bound address; `extra` adds services (a restore receiver).
pub async fn serve_endpoint(
    listen: &str,
    material: &TlsMaterial,
    router: Option<tonic::transport::server::Router>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let incoming = tls::incoming(listener, material.server_config()?, shutdown.clone());
    let router = match router {
        Some(r) => r.add_service(health),
        None => tls::server_builder().add_service(health),
    };
    let h = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await
        {
            tracing::error!(error = %e, "endpoint stopped");
        }
    });
    Ok((addr, h))
}

/// Free bytes on the filesystem holding `path` (0 when unknown).
pub fn disk_free(path: &Path) -> u64 {
    crate::disk::fsx::free_bytes(path).unwrap_or(0)
}

fn ms_since(t: Option<Instant>) -> u64 {
    t.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0)
}

/// An agent's heartbeat report: the mode-dependent part from the node, GPU health (GPU agent)
/// and the contact with the GPU (CPU agent).
pub fn report(
    machine: &str,
    workspace: &Path,
    advertise: &str,
    listen_port: u16,
    n: &crate::agent::node::NodeReport,
    gpu: Option<GpuHealth>,
    probe: Option<(&crate::agent::probe::ProbeState, Option<Instant>)>,
) -> AgentReport {
    let now_ms = crate::replication::send::unix_ms(SystemTime::now());
    let f = &n.sender;
    let sending = n.mode == AgentMode::Send;
    AgentReport {
        machine: machine.into(),
        epoch: n.epoch,
        advertise: advertise.into(),
        listen_port: listen_port as u32,
        workspace: workspace.display().to_string(),
        generation: n.generation,
        primary: sending || n.mode == AgentMode::Primary,
        fenced: n.fenced,
        rpo_age_ms: if sending {
            f.oldest_pending_unix_ms
                .map(|t| now_ms.saturating_sub(t))
                .unwrap_or(0)
        } else {
            0
        },
        pending_bytes: if sending { f.pending_bytes } else { 0 },
        last_durable_unix_ms: f.last_durable_unix_ms,
        disk_free_bytes: disk_free(workspace),
        gpu,
        last_error: if sending {
            f.last_error.clone().unwrap_or_default()
        } else {
            String::new()
        },
        bytes_total: n.bytes_total,
        last_sync_ms: f.last_sync_ms,
        peer: probe.map(|(p, last_data)| PeerContact {
            probe_ok_age_ms: ms_since(p.last_ok),
            probe_ever_ok: p.last_ok.is_some(),
            last_data_age_ms: ms_since(last_data),
            probe_error: p.last_error.clone().unwrap_or_default(),
        }),
        mode: n.mode.into(),
        root: n.root.clone(),
        frozen_epoch: n.frozen_epoch,
        workspace_bytes: n.workspace_bytes,
        connected: n.connected,
        ..Default::default()
    }
}

/// Runs an operator hook and waits for it (at most `limit`): `on_demote` must have stopped the
/// application before the final sync.
pub async fn run_hook_wait(
    name: &str,
    command: &str,
    pair: &str,
    epoch: u64,
    workspace: &Path,
    limit: Duration,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("STANDBY_HOOK", name)
        .env("STANDBY_PAIR", pair)
        .env("STANDBY_EPOCH", epoch.to_string())
        .env("STANDBY_WORKSPACE", workspace)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("{name} exited with {st}")),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(_) => Err(format!("{name} still running after {limit:?}")),
    }
}

/// Runs an operator hook (`on_promote`, `on_demote`) with `sh -c`, without waiting for it; its
/// outcome is logged. The environment tells it the pair, the epoch and the workspace.
pub fn run_hook(name: &str, command: &str, pair: &str, epoch: u64, workspace: &Path) {
    if command.trim().is_empty() {
        return;
    }
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("STANDBY_HOOK", name)
        .env("STANDBY_PAIR", pair)
        .env("STANDBY_EPOCH", epoch.to_string())
        .env("STANDBY_WORKSPACE", workspace);
    let name = name.to_string();
    match cmd.spawn() {
        Ok(mut child) => {
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(600), child.wait()).await {
                    Ok(Ok(st)) if st.success() => tracing::info!(hook = %name, "hook finished"),
                    Ok(Ok(st)) => tracing::warn!(hook = %name, status = %st, "hook failed"),
                    Ok(Err(e)) => tracing::warn!(hook = %name, error = %e, "hook failed"),
                    Err(_) => tracing::warn!(hook = %name, "hook still running after 10 minutes"),
                }
            });
        }
        Err(e) => tracing::warn!(hook = %name, error = %e, "cannot start hook"),
    }
}

/// Everything an agent needs to run, whichever its role.
pub struct AgentConfig {
    pub role: crate::trust::identity::Role,
    pub workspace: std::path::PathBuf,
    pub state_dir: std::path::PathBuf,
    pub tls_dir: Option<std::path::PathBuf>,
    /// Static pair (GPU): the CPU agent to replicate to.
    pub peer: Option<String>,
    pub coordinator: Option<String>,
    pub join_token: Option<String>,
    pub listen: String,
    pub advertise: String,
    pub machine: String,
    pub heartbeat: Duration,
    pub loop_cfg: crate::replication::continuous::LoopConfig,
    pub compress_level: i32,
    pub on_promote: String,
    pub on_demote: String,
}

/// The agent's identity and its opened replica.
pub struct Opened {
    pub material: TlsMaterial,
    pub pair: String,
    pub peer: crate::trust::identity::Identity,
    pub receiver: crate::replication::receive::Receiver,
    pub lock: crate::disk::statedir::StateLock,
}

/// Joins (or loads certificates), locks the state directory and opens the replica state.
pub async fn open(cfg: &AgentConfig) -> anyhow::Result<Opened> {
    use crate::trust::identity::{Identity, Role};
    let material = crate::agent::join::identity(
        cfg.role,
        &cfg.state_dir,
        cfg.tls_dir.as_deref(),
        cfg.coordinator.as_deref(),
        cfg.join_token.as_deref(),
        &cfg.machine,
    )
    .await?;
    let pair = material.identity.pair().expect("node identity").to_string();
    let other = match cfg.role {
        Role::Gpu => Role::Cpu,
        _ => Role::Gpu,
    };
    let peer = Identity::node(&pair, other)?;
    let lock = crate::disk::statedir::lock(&cfg.state_dir)?;
    let opts = crate::replication::receive::ReceiverOptions {
        workspace: cfg.workspace.clone(),
        state_dir: cfg.state_dir.clone(),
        sender: peer.clone(),
        // A CPU standby seeded by hand reuses what it holds; a GPU sends first.
        adopt: cfg.role == Role::Cpu,
        accepting: cfg.role == Role::Cpu,
    };
    let receiver =
        tokio::task::spawn_blocking(move || crate::replication::receive::Receiver::open(opts))
            .await?
            .context("opening the replica")?;
    Ok(Opened {
        material,
        pair,
        peer,
        receiver,
        lock,
    })
}

/// Runs an agent until it is told to stop: serves its endpoint (health, and replication into
/// it when it receives), its control socket, heartbeats and commands when a coordinator
/// manages it, and replication in whichever direction its mode says.
pub async fn run(cfg: AgentConfig, o: Opened) -> anyhow::Result<()> {
    use crate::agent::node::{Mode, Node, NodeOptions};
    use crate::trust::identity::Role;
    use std::sync::{Arc, Mutex};
    let Opened {
        material,
        pair,
        peer,
        receiver,
        lock: _lock,
    } = o;
    let f = receiver.figures();
    tracing::info!(
        role = cfg.role.as_str(),
        workspace = %cfg.workspace.display(),
        generation = %f.generation,
        epoch = %f.epoch,
        entries = f.entries,
        "replica state ready"
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::cli::stop_signal().await;
        tracing::info!("stopping");
        stop.cancel();
    });

    let router = tls::server_builder().add_service(receiver.service());
    let (addr, endpoint) =
        serve_endpoint(&cfg.listen, &material, Some(router), shutdown.clone()).await?;
    std::fs::write(cfg.state_dir.join("listen.addr"), addr.to_string())?;

    let mut sender_opts =
        crate::replication::send::SenderOptions::new(cfg.workspace.clone(), cfg.state_dir.clone());
    sender_opts.compress_level = cfg.compress_level;
    sender_opts.machine = cfg.machine.clone();
    let initial = match (cfg.role, &cfg.peer) {
        (Role::Gpu, Some(url)) => Mode::Send(crate::replication::continuous::Target {
            url: url.clone(),
            identity: peer.clone(),
            epoch: None,
        }),
        (Role::Gpu, None) => Mode::Idle,
        _ => Mode::Receive(None),
    };
    let (node, ctl_tx, driver) = Node::start(
        NodeOptions {
            pair: pair.clone(),
            workspace: cfg.workspace.clone(),
            sender: sender_opts.clone(),
            tls: material.clone(),
            loop_cfg: cfg.loop_cfg.clone(),
            on_promote: cfg.on_promote.clone(),
            on_demote: cfg.on_demote.clone(),
        },
        receiver.clone(),
        initial,
        shutdown.clone(),
    );

    let fault: crate::agent::socket::InjectedFault = Arc::new(Mutex::new(None));
    let ctl = tokio::spawn({
        let state_dir = cfg.state_dir.clone();
        let figures = node.figures();
        let shutdown = shutdown.clone();
        let fault = fault.clone();
        async move { crate::agent::socket::serve(&state_dir, ctl_tx, figures, fault, shutdown).await }
    });

    if let Some(url) = &cfg.coordinator {
        let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel(16);
        let nvml = Arc::new(Mutex::new(if cfg.role == Role::Gpu {
            crate::agent::nvml::Nvml::open()
        } else {
            None
        }));
        let probe = Arc::new(Mutex::new(crate::agent::probe::ProbeState::default()));
        let (probe_tx, probe_rx) = tokio::sync::watch::channel(None::<String>);
        if cfg.role == Role::Cpu {
            tokio::spawn(crate::agent::probe::run(
                probe_rx,
                material.clone(),
                peer.clone(),
                cfg.heartbeat,
                probe.clone(),
                shutdown.clone(),
            ));
        }
        let report: crate::agent::link::ReportFn = {
            let (node, probe, fault) = (node.clone(), probe.clone(), fault.clone());
            let (machine, workspace, advertise, role) = (
                cfg.machine.clone(),
                cfg.workspace.clone(),
                cfg.advertise.clone(),
                cfg.role,
            );
            Arc::new(move || {
                let mut gpu = nvml.lock().expect("nvml").as_mut().map(|n| n.sample());
                if let Some(reason) = fault.lock().expect("fault").clone() {
                    let g = gpu.get_or_insert_with(Default::default);
                    g.fatal = true;
                    g.fatal_reason = reason;
                }
                let n = node.report();
                let p = probe.lock().expect("probe").clone();
                let last_data = node.receiver().figures().last_data;
                report(
                    &machine,
                    &workspace,
                    &advertise,
                    addr.port(),
                    &n,
                    gpu,
                    (role == Role::Cpu).then_some((&p, last_data)),
                )
            })
        };
        tokio::spawn(crate::agent::link::run(
            crate::agent::link::LinkOptions {
                url: url.clone(),
                tls: material.clone(),
                interval: cfg.heartbeat,
            },
            report,
            cmd_tx,
            shutdown.clone(),
        ));
        let node2 = node.clone();
        tokio::spawn(async move {
            while let Some(c) = cmd_rx.recv().await {
                let Some(cmd) = c.cmd else { continue };
                match cmd {
                    crate::proto::command::Cmd::Probe(p) => {
                        if probe_tx.borrow().as_deref() != Some(p.url.as_str()) {
                            tracing::info!(gpu = %p.url, "probing the GPU agent");
                            let _ = probe_tx.send(Some(p.url));
                        }
                    }
                    other => {
                        if !matches!(other, crate::proto::command::Cmd::Receive(_)) {
                            let _ = probe_tx.send(None);
                        }
                        node2.command(other, &peer);
                    }
                }
            }
        });
    }

    tracing::info!(%addr, pair = %pair, role = cfg.role.as_str(), "agent running");
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(2), ctl).await {
        tracing::warn!(error = %e, "control socket");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint).await;
    Ok(())
}
