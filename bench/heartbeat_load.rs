//! Load benchmark: thousands of simulated agents heartbeating at 1 Hz against one coordinator,
//! through the real gRPC API over mutual TLS (each agent its own certificate and connection).
//!
//! `cargo bench --bench heartbeat_load` (release). `STANDBY_LOAD_AGENTS` (default 10000, half GPU
//! and half CPU agents of as many pairs), `STANDBY_LOAD_SECS` (measurement window, default 30).
//! Reports the coordinator's CPU (cores) and memory (RSS, peak) while all agents heartbeat.
//! Each agent connects from a loopback address of its own (`127.1.x.y`): the coordinator allows
//! 64 connections per source address (`cli::defaults::CONNECTIONS_PER_ADDRESS`), as it would see
//! a fleet of machines.
//!
//! `STANDBY_LOAD_STORE=etcd` (a build with `--features etcd`): the coordinator keeps its state in
//! a real three-member etcd cluster on loopback (`serve --store etcd`, leading alone), and the
//! window also reports etcd's writes, from the members' own `/metrics`: `etcd_mvcc_put_total`,
//! `etcd_mvcc_delete_total` and `etcd_mvcc_txn_total` (key writes, applied on every member, read
//! from the first), `etcd_server_proposals_committed_total` (every raft proposal: writes and
//! lease renewals), the store's revision (one per write transaction), and the members' CPU.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use standby::proto::coordinator_client::CoordinatorClient;
use standby::proto::{AgentReport, PeerContact};
use standby::trust::identity::{Identity, Role};
use standby::trust::tls::{self, Expect, TlsMaterial};
use tokio_stream::wrappers::ReceiverStream;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// (user+system CPU seconds, RSS KiB, peak RSS KiB) of a process.
fn usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

/// `standby_pair_transitions_total` by its labels.
fn transitions(addr: &str) -> std::collections::BTreeMap<String, f64> {
    let name = "standby_pair_transitions_total{";
    scrape(addr)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| {
            let (labels, value) = l[name.len() - 1..].rsplit_once(' ')?;
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(addr: &str, name: &str) -> f64 {
    scrape(addr)
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn main() {
    let agents = env_usize("STANDBY_LOAD_AGENTS", 10_000);
    let secs = env_usize("STANDBY_LOAD_SECS", 30) as u64;
    let files = standby::cli::raise_nofile_limit();
    assert!(
        files as usize > agents + 100,
        "open file limit {files} is too low for {agents} agents"
    );
    tls::install_default_provider();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("coord");
    let st = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["init", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let store = Store::from_env();
    let mut coord = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["serve", "--dir"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(store.args())
        .env("STANDBY_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Written last, once it serves (on etcd: once it leads).
    while !dir.join("serve.addr").exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr = std::fs::read_to_string(dir.join("serve.addr")).unwrap();
    let maddr = std::fs::read_to_string(dir.join("metrics.addr")).unwrap();
    println!(
        "coordinator pid {} at {addr}; issuing {agents} certificates ...",
        coord.id()
    );
    let materials = issue(&dir, agents);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = store.sample();
    let connected = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        for (i, m) in materials.into_iter().enumerate() {
            let (addr, connected, sent) = (addr.clone(), connected.clone(), sent.clone());
            tokio::spawn(async move { agent(i, m, addr, connected, sent).await });
            if i % 500 == 499 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        while (connected.load(Ordering::Relaxed) as usize) < agents {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "only {} agents connected",
                connected.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "{agents} agents connected in {:.1} s; waiting for the coordinator to take them all ...",
            start.elapsed().as_secs_f64()
        );
        // Each pair's first agent creates it (a write), its second makes it Syncing (another):
        // the window starts once the coordinator has every agent on its books.
        while metric(&maddr, "standby_agents_connected") < agents as f64 {
            assert!(
                start.elapsed() < Duration::from_secs(900),
                "the coordinator took only {} agents",
                metric(&maddr, "standby_agents_connected")
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let warm = tokio::task::block_in_place(|| store.sample());
        let ramp = start.elapsed().as_secs_f64();
        println!("the coordinator had all {agents} agents {ramp:.1} s after the first connected");
        if let (Some(a), Some(b)) = (&before, &warm) {
            println!(
                "etcd until then: {} puts, {} txns, {} revisions ({:.0} puts/s, {:.1} revisions/s, one per write transaction: creating the pairs, recording their machines, Syncing)",
                b.puts - a.puts,
                b.txns - a.txns,
                b.revision - a.revision,
                (b.puts - a.puts) / ramp,
                (b.revision - a.revision) as f64 / ramp,
            );
        }
        println!("settling ...");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pid = coord.id();
        let hb0 = metric(&maddr, "standby_heartbeats_total");
        let tr0 = transitions(&maddr);
        let (cpu0, _, _) = usage(pid);
        let etcd0 = tokio::task::block_in_place(|| store.sample());
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let (cpu1, rss, peak) = usage(pid);
        let hb1 = metric(&maddr, "standby_heartbeats_total");
        let tr1 = transitions(&maddr);
        let etcd1 = tokio::task::block_in_place(|| store.sample());
        let wall = t0.elapsed().as_secs_f64();
        let conn = metric(&maddr, "standby_agents_connected");
        let behind = metric(&maddr, "standby_engine_behind_seconds");
        println!();
        println!(
            "| agents | connected (coordinator) | heartbeats/s | coordinator CPU | RSS | peak RSS |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| {agents} | {conn} | {:.0} | {:.2} cores | {} MiB | {} MiB |",
            (hb1 - hb0) / wall,
            (cpu1 - cpu0) / wall,
            rss / 1024,
            peak / 1024
        );
        println!(
            "(measured over {wall:.0} s on this machine; the load generator shares its cores)"
        );
        println!("the engine's detection time behind the clock at the end: {behind:.3} s");
        let mut moved: Vec<(String, f64)> = tr1
            .iter()
            .map(|(k, v)| (k.clone(), v - tr0.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d > 0.0)
            .collect();
        moved.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!("pair state transitions in the window: {moved:?}");
        if let (Some(a), Some(b)) = (etcd0, etcd1) {
            etcd_report(&a, &b, wall);
            let keys = tokio::task::block_in_place(|| store.written_since(a.revision));
            let shown: Vec<&str> = keys.iter().take(3).map(|(k, _)| k.as_str()).collect();
            println!(
                "keys written in the window: {} distinct, e.g. {shown:?}",
                keys.len()
            );
        }
    });
    let _ = coord.kill();
    let _ = coord.wait();
    drop(rt);
}

/// Where the coordinator keeps its state: `STANDBY_LOAD_STORE` = `file` (default) or `etcd`.
enum Store {
    File,
    #[cfg(feature = "etcd")]
    Etcd(common::etcd::Cluster),
}

impl Store {
    fn from_env() -> Store {
        match std::env::var("STANDBY_LOAD_STORE").as_deref() {
            Err(_) | Ok("") | Ok("file") => Store::File,
            #[cfg(feature = "etcd")]
            Ok("etcd") => {
                let c = common::etcd::Cluster::start(3).expect("etcd is not installed");
                Store::Etcd(c)
            }
            Ok(other) => panic!(
                "STANDBY_LOAD_STORE={other:?}: `file`, or `etcd` in a build with --features etcd"
            ),
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            Store::File => Vec::new(),
            #[cfg(feature = "etcd")]
            Store::Etcd(c) => vec![
                "--store".into(),
                "etcd".into(),
                "--etcd".into(),
                c.endpoints().join(","),
            ],
        }
    }

    /// The keys written after revision `since` (none with the file store).
    fn written_since(&self, since: i64) -> Vec<(String, i64)> {
        match self {
            Store::File => {
                let _ = since;
                Vec::new()
            }
            #[cfg(feature = "etcd")]
            Store::Etcd(c) => c.written_since(since),
        }
    }

    /// etcd's counters now (None with the file store).
    fn sample(&self) -> Option<EtcdSample> {
        match self {
            Store::File => None,
            #[cfg(feature = "etcd")]
            Store::Etcd(c) => {
                let m0 = c.members[0]
                    .client
                    .trim_start_matches("http://")
                    .to_string();
                let cpu = c
                    .members
                    .iter()
                    .filter_map(|m| m.pid())
                    .map(|p| usage(p).0)
                    .sum();
                Some(EtcdSample {
                    puts: metric(&m0, "etcd_mvcc_put_total"),
                    deletes: metric(&m0, "etcd_mvcc_delete_total"),
                    txns: metric(&m0, "etcd_mvcc_txn_total"),
                    proposals: metric(&m0, "etcd_server_proposals_committed_total"),
                    revision: c.revision(),
                    cpu,
                })
            }
        }
    }
}

/// etcd's counters at one moment.
struct EtcdSample {
    puts: f64,
    deletes: f64,
    txns: f64,
    proposals: f64,
    revision: i64,
    /// CPU seconds of the three members together.
    cpu: f64,
}

fn etcd_report(a: &EtcdSample, b: &EtcdSample, wall: f64) {
    let rate = |x: f64, y: f64| (y - x) / wall;
    println!();
    println!("etcd (3 members on this machine) over the same window:");
    println!();
    println!(
        "| puts/s | deletes/s | txns/s | revisions/s | raft proposals/s | etcd CPU (3 members) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} cores |",
        rate(a.puts, b.puts),
        rate(a.deletes, b.deletes),
        rate(a.txns, b.txns),
        rate(a.revision as f64, b.revision as f64),
        rate(a.proposals, b.proposals),
        rate(a.cpu, b.cpu),
    );
    println!(
        "(totals in the window: {} puts, {} deletes, {} txns, {} revisions, {} proposals)",
        b.puts - a.puts,
        b.deletes - a.deletes,
        b.txns - a.txns,
        b.revision - a.revision,
        b.proposals - a.proposals
    );
}

/// Agent `i`'s own loopback source address (all of 127.0.0.0/8 reaches `lo`).
fn source(i: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8).into()
}

/// `tls::connect`, from the source address `src`.
async fn connect_from(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
    src: std::net::IpAddr,
) -> anyhow::Result<tonic::transport::Channel> {
    let uri = tls::endpoint_uri(addr)?;
    Ok(tls::endpoint(uri)
        .connect_with_connector(From { cfg, src })
        .await?)
}

/// A TLS connector whose TCP connection leaves from `src`.
#[derive(Clone)]
struct From {
    cfg: Arc<rustls::ClientConfig>,
    src: std::net::IpAddr,
}

type Conn = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<tonic::transport::Uri> for From {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = std::io::Result<Conn>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Self::Future {
        let (cfg, src) = (self.cfg.clone(), self.src);
        Box::pin(async move {
            let bad =
                |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
            let host: std::net::IpAddr = uri
                .host()
                .ok_or_else(|| bad("no host"))?
                .parse()
                .map_err(|_| bad("the coordinator's address must be an IP address"))?;
            let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((src, 0).into())?;
            let tcp = socket.connect((host, port).into()).await?;
            tcp.set_nodelay(true)?;
            let name = rustls_pki_types::ServerName::try_from("standby.peer").expect("static name");
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

fn issue(dir: &Path, agents: usize) -> Vec<TlsMaterial> {
    let ca = standby::trust::pki::Ca::load(dir).unwrap();
    (0..agents)
        .map(|i| {
            let role = if i.is_multiple_of(2) {
                Role::Gpu
            } else {
                Role::Cpu
            };
            let id = Identity::node(&format!("load-{}", i / 2), role, &format!("m{i}")).unwrap();
            TlsMaterial::from_node_cert(&ca.issue(&id, standby::trust::pki::days(1), &[]).unwrap())
                .unwrap()
        })
        .collect()
}

async fn agent(
    i: usize,
    m: TlsMaterial,
    addr: String,
    connected: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
) {
    let cfg = m
        .client_config(Expect::Exactly(Identity::Coordinator))
        .unwrap();
    let gpu = i.is_multiple_of(2);
    let mut backoff = Duration::from_millis(200);
    let mut counted = false;
    loop {
        let r: anyhow::Result<()> = async {
            let ch = connect_from(&addr, cfg.clone(), source(i)).await?;
            let (tx, rx) = tokio::sync::mpsc::channel::<AgentReport>(4);
            let mut inbound = CoordinatorClient::new(ch).heartbeat(ReceiverStream::new(rx)).await?.into_inner();
            if !counted {
                counted = true;
                connected.fetch_add(1, Ordering::Relaxed);
            }
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // Spread the agents over the second.
            tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 1000)).await;
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        seq += 1;
                        let r = AgentReport {
                            seq,
                            machine: format!("m{i}"),
                            epoch: 1,
                            listen_port: if gpu { 7702 } else { 7701 },
                            workspace: "/workspace".into(),
                            generation: seq,
                            primary: gpu,
                            disk_free_bytes: 1 << 40,
                            peer: (!gpu).then(|| PeerContact { probe_ok_age_ms: 300, probe_ever_ok: true, ..Default::default() }),
                            ..Default::default()
                        };
                        tx.send(r).await?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    c = inbound.message() => { if c?.is_none() { anyhow::bail!("closed") } }
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "agent {i} reconnecting");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
