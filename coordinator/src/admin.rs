//! The admin verbs of the coordinator's command line (an admin certificate is required).

use crate::agent::versions;
use crate::history::Selector;
use crate::proto::admin_client::AdminClient;
use crate::proto::{
    BackupPick, EventKind, EventsRequest, LeadershipRequest, ListPairsRequest, PairFetchRequest,
    PairRequest, PairState, PairVersionsRequest, PairView, RecoverRequest, StoreKind,
};
use crate::trust::identity::Identity;
use crate::trust::tls::{self, Expect, TlsMaterial};
use anyhow::Context;
use tonic::transport::Channel;

use super::Remote;

pub async fn connect(r: &Remote) -> anyhow::Result<AdminClient<Channel>> {
    client(r).await
}

async fn client(r: &Remote) -> anyhow::Result<AdminClient<Channel>> {
    Ok(client_at(r).await?.0)
}

/// A client of the coordinator that serves, and its address: the first of `--server`'s
/// addresses that answers or, when that one follows (highly available coordinators), the leader
/// it names. When the named leader does not answer, the follower's client is kept: its refusal
/// names the leader.
async fn client_at(r: &Remote) -> anyhow::Result<(AdminClient<Channel>, String)> {
    let (mut c, at) = first_answering(r).await?;
    let Some(leader) = named_leader(&mut c).await.filter(|l| *l != at) else {
        return Ok((c, at));
    };
    let cfg = client_config(r)?;
    match tls::connect(&leader, cfg).await {
        Ok(ch) => Ok((AdminClient::new(ch), leader)),
        Err(e) => {
            tracing::warn!(follower = %at, %leader, error = %crate::text::error_chain(e.as_ref()), "the leader a follower named does not answer");
            Ok((c, at))
        }
    }
}

/// The leader a follower names (None when `c` leads, has no leader to name, or cannot say).
async fn named_leader(c: &mut AdminClient<Channel>) -> Option<String> {
    let r = c.leadership(LeadershipRequest {}).await.ok()?.into_inner();
    (r.follower && !r.leader.is_empty()).then_some(r.leader)
}

fn client_config(r: &Remote) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    let m = TlsMaterial::load(&r.tls_dir)
        .with_context(|| format!("loading the admin certificate from {}", r.tls_dir.display()))?;
    Ok(m.client_config(Expect::Exactly(Identity::Coordinator))?)
}

/// A client of the first of `--server`'s addresses that accepts a connection, and that address.
async fn first_answering(r: &Remote) -> anyhow::Result<(AdminClient<Channel>, String)> {
    let cfg = client_config(r)?;
    let addrs: Vec<&str> = r
        .server
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if addrs.is_empty() {
        anyhow::bail!("--server names no address");
    }
    let mut failed: Vec<String> = Vec::new();
    let mut last = None;
    for addr in addrs {
        match tls::connect(addr, cfg.clone()).await {
            Ok(ch) => return Ok((AdminClient::new(ch), addr.to_string())),
            Err(e) => {
                if let Some((a, e)) = last.replace((addr, e)) {
                    failed.push(format!("{a}: {}", crate::text::error_chain(e.as_ref())));
                }
            }
        }
    }
    let (addr, e) = last.expect("at least one address was tried");
    // The last error stays the source: its kind (a connection refused) picks the exit code.
    failed.push(addr.to_string());
    Err(e.context(format!("no coordinator answered: {}", failed.join("; "))))
}

/// A refusal's message, and the exit code its gRPC code calls for.
fn status(s: tonic::Status) -> anyhow::Error {
    crate::cli::Exiting::from(s).into()
}

fn machine_json(m: &Option<crate::proto::MachineView>) -> serde_json::Value {
    match m {
        None => serde_json::Value::Null,
        Some(m) => serde_json::json!({
            "machine": m.machine,
            "address": m.address,
            "workspace": m.workspace,
            "last_heartbeat_ms": if m.last_heartbeat_ms == u64::MAX { serde_json::Value::Null } else { m.last_heartbeat_ms.into() },
            "connected": m.connected,
            "epoch": m.epoch,
        }),
    }
}

pub fn pair_json(p: &PairView) -> serde_json::Value {
    serde_json::json!({
        "pair": p.pair,
        "state": p.state().to_string(),
        "epoch": p.epoch,
        "primary": p.primary().to_string(),
        "last_durable_generation": p.last_durable_generation,
        "protected": p.protected,
        "sync_lag_ms": if p.lag_unknown { serde_json::Value::Null } else { p.sync_lag_ms.into() },
        "pending_bytes": if p.lag_unknown { serde_json::Value::Null } else { p.pending_bytes.into() },
        "active_endpoint": p.active_endpoint,
        "reason": p.reason,
        "provisioning": if p.provisioning.is_empty() { serde_json::Value::Null } else { p.provisioning.clone().into() },
        "restore": if p.restore_total_bytes == 0 && p.restore_done_bytes == 0 {
            serde_json::Value::Null
        } else {
            serde_json::json!({"done_bytes": p.restore_done_bytes, "total_bytes": p.restore_total_bytes})
        },
        "gpu": machine_json(&p.gpu),
        "cpu": machine_json(&p.cpu),
        "history": history_json(p.history.as_ref()),
    })
}

/// The standby's newest snapshot and newest backed-up snapshot (null when it keeps no history).
fn history_json(h: Option<&crate::proto::HistoryReport>) -> serde_json::Value {
    let Some(h) = h else {
        return serde_json::Value::Null;
    };
    let time = |ms: i64| {
        if ms == 0 {
            serde_json::Value::Null
        } else {
            crate::cli::format_time(ms).into()
        }
    };
    serde_json::json!({
        "snapshots": h.snapshots,
        "newest_snapshot": time(h.newest_snapshot_unix_ms),
        "newest_snapshot_generation": h.newest_snapshot_generation,
        "stored_bytes": h.stored_bytes,
        "logical_bytes": h.logical_bytes,
        "backup": if h.backup_configured {
            serde_json::json!({
                "newest_snapshot": time(h.newest_backup_unix_ms),
                "uploaded_bytes": h.backup_uploaded_bytes,
                "failures": h.backup_failures,
                "last_error": text_or_null(&h.backup_last_error),
            })
        } else {
            serde_json::Value::Null
        },
        "last_error": text_or_null(&h.last_error),
    })
}

fn text_or_null(s: &str) -> serde_json::Value {
    if s.is_empty() {
        serde_json::Value::Null
    } else {
        s.into()
    }
}

fn age(m: &Option<crate::proto::MachineView>) -> String {
    match m {
        None => "-".into(),
        Some(m) if m.last_heartbeat_ms == u64::MAX => format!("{} (never)", m.machine),
        Some(m) => format!(
            "{} ({:.1}s)",
            m.machine,
            m.last_heartbeat_ms as f64 / 1000.0
        ),
    }
}

/// `coordinator status`: who leads, in which term, the members and the etcd endpoints, as the
/// first of `--server`'s addresses that answers sees it (a follower names the leader).
pub async fn coordinator_status(r: &Remote, json: bool) -> anyhow::Result<()> {
    let (mut c, at) = first_answering(r).await?;
    let s = c
        .leadership(LeadershipRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let store = match s.store() {
        StoreKind::Etcd => "etcd",
        StoreKind::File => "file",
        StoreKind::Unspecified => "unknown",
    };
    if json {
        let v = serde_json::json!({
            "store": store,
            "answered_by": at,
            "follower": s.follower,
            "leader": text_or_null(&s.leader),
            "term": s.term,
            "members": s.members,
            "etcd_endpoints": s.etcd_endpoints,
            "pairs": if s.follower { serde_json::Value::Null } else { s.pairs.into() },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_status(&s, store, &at);
    Ok(())
}

fn print_status(s: &crate::proto::LeadershipReply, store: &str, at: &str) {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    println!("store     {store}");
    match s.store() {
        StoreKind::Etcd => {
            let leader = if s.leader.is_empty() {
                "none"
            } else {
                &s.leader
            };
            let who = if s.follower {
                "a follower"
            } else {
                "the leader"
            };
            println!("leader    {leader} (answered by {at}, {who})");
            println!("term      {}", s.term);
            println!("members   {}", list(&s.members));
            println!("etcd      {}", list(&s.etcd_endpoints));
        }
        _ => println!("leader    {at} (the only coordinator: no election)"),
    }
    if s.follower {
        println!("pairs     - (a follower serves none; ask the leader)");
    } else {
        println!("pairs     {}", s.pairs);
    }
}

pub async fn pairs(r: &Remote, json: bool) -> anyhow::Result<()> {
    let ps = client(r)
        .await?
        .list_pairs(ListPairsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .pairs;
    if json {
        let v: Vec<serde_json::Value> = ps.iter().map(pair_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:>5} {:<7} {:<9} {:>10} {:>9}  {:<24} {:<24} ACTIVE",
        "PAIR", "STATE", "EPOCH", "PRIMARY", "PROTECTED", "GENERATION", "LAG", "GPU", "CPU"
    );
    for p in ps {
        let lag = if p.lag_unknown {
            "?".to_string()
        } else {
            format!("{}ms", p.sync_lag_ms)
        };
        println!(
            "{:<16} {:<12} {:>5} {:<7} {:<9} {:>10} {:>9}  {:<24} {:<24} {}",
            p.pair,
            p.state(),
            p.epoch,
            p.primary(),
            if p.protected { "yes" } else { "no" },
            p.last_durable_generation,
            lag,
            age(&p.gpu),
            age(&p.cpu),
            p.active_endpoint
        );
    }
    Ok(())
}

pub async fn create(r: &Remote, pair: &str) -> anyhow::Result<()> {
    let p = client(r)
        .await?
        .create_pair(PairRequest { pair: pair.into() })
        .await
        .map_err(status)?
        .into_inner();
    println!("pair {} created ({}, epoch {})", p.pair, p.state(), p.epoch);
    Ok(())
}

/// The pair-changing verbs.
#[derive(Clone, Debug)]
pub enum Verb {
    Failover,
    /// With a backup snapshot (`latest` or an id): rebuild the pair from its off-site backup.
    Recover {
        from_backup: Option<String>,
    },
    Hibernate,
    Wake,
}

pub async fn action(r: &Remote, pair: &str, verb: Verb, follow: bool) -> anyhow::Result<()> {
    let mut c = client(r).await?;
    let req = PairRequest { pair: pair.into() };
    let a = match &verb {
        Verb::Failover => c.failover(req).await,
        Verb::Recover { from_backup } => {
            c.recover(RecoverRequest {
                pair: pair.into(),
                from_backup: from_backup.clone().map(|snapshot| BackupPick { snapshot }),
            })
            .await
        }
        Verb::Hibernate => c.hibernate(req).await,
        Verb::Wake => c.wake(req).await,
    }
    .map_err(status)?
    .into_inner();
    println!(
        "{}: {} at epoch {} ({})",
        a.pair,
        a.state(),
        a.epoch,
        a.message
    );
    if follow {
        let until = match verb {
            Verb::Hibernate => PairState::Hibernated,
            _ => PairState::Syncing,
        };
        follow_pair(&mut c, pair, until).await?;
    }
    Ok(())
}

/// Follows a pair until it reaches `until`: its state as it changes, and the restore's
/// progress ([`super::progress::Progress`]).
async fn follow_pair(
    c: &mut AdminClient<Channel>,
    pair: &str,
    until: PairState,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut last = String::new();
    let mut progress =
        super::progress::Progress::new(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    loop {
        let ps = c
            .list_pairs(ListPairsRequest {})
            .await
            .map_err(status)?
            .into_inner()
            .pairs;
        let Some(p) = ps.into_iter().find(|p| p.pair == pair) else {
            anyhow::bail!("pair {pair} is gone");
        };
        let line = format!("{} ({})", p.state(), p.reason);
        if line != last {
            progress.end_line();
            println!(
                "[{:>6.1}s] {}{}",
                started.elapsed().as_secs_f64(),
                line,
                if p.provisioning.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", p.provisioning)
                }
            );
            last = line;
        }
        progress.show(p.restore_done_bytes, p.restore_total_bytes);
        if p.state() == until {
            progress.end_line();
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

pub async fn events(r: &Remote, json: bool, follow: bool, heartbeats: bool) -> anyhow::Result<()> {
    let mut s = client(r)
        .await?
        .events(EventsRequest { follow, heartbeats })
        .await
        .map_err(status)?
        .into_inner();
    while let Some(e) = s.message().await.map_err(status)? {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "unix_ms": e.unix_ms, "pair": e.pair, "kind": e.kind().to_string(),
                    "from": e.from_state().to_string(), "to": e.to_state().to_string(),
                    "epoch": e.epoch, "message": e.message,
                })
            );
        } else {
            let t = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.unix_ms),
            );
            let arrow =
                if e.to_state() == PairState::Unspecified || e.kind() != EventKind::Transition {
                    String::new()
                } else {
                    format!(" {} -> {}", e.from_state(), e.to_state())
                };
            println!("{t} {:<12} {:<10}{arrow} {}", e.pair, e.kind(), e.message);
        }
    }
    Ok(())
}

/// `versions PAIR`: the standby's snapshots, through the coordinator.
pub async fn versions(r: &Remote, pair: &str, path: &str, json: bool) -> anyhow::Result<()> {
    let mut c = client(r).await?;
    let req = PairVersionsRequest {
        pair: pair.to_string(),
        path: path.to_string(),
    };
    let reply = c.versions(req).await.map_err(status)?.into_inner();
    let list: Vec<_> = reply.snapshots.iter().map(versions::summary_json).collect();
    if json {
        println!("{}", serde_json::Value::Array(list));
    } else {
        print!("{}", versions::table(&list));
    }
    Ok(())
}

/// `restore PAIR --to DIR`: files of a snapshot, relayed by the coordinator, verified and
/// written below `to`.
pub async fn restore(
    r: &Remote,
    pair: &str,
    selector: &Selector,
    path: &str,
    to: &std::path::Path,
) -> anyhow::Result<()> {
    let mut c = client(r).await?;
    let req = PairFetchRequest {
        pair: pair.to_string(),
        snapshot: Some(versions::selector_to_wire(selector)),
        path: path.to_string(),
    };
    let items = c.fetch(req).await.map_err(status)?.into_inner();
    let fetched = versions::unpack_stream(items, to).await?;
    println!("{}", serde_json::to_string(&fetched)?);
    Ok(())
}
