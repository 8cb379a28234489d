//! Continuous replication: watch, debounce, sync, reconnect, and answer flush barriers.
//!
//! One task owns the [`Sender`] and its session. Changes flagged by the watcher are synced once
//! writes pause for the debounce (or after `max_delay` at the latest); a periodic quick-check
//! rescan catches anything the watcher missed. When the receiver is unreachable the loop
//! reconnects with exponential backoff and jitter and then rescans everything, so no change is
//! lost across a disconnection or a restart of either agent. A fenced sender stops sending.
//!
//! A flush waits for a generation whose scan started after the flush was asked for and that
//! left nothing behind (no file changing while read): everything written before the flush is
//! then durable on the receiver.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::replication::send::{Sender, Session, SyncError, scope_of, unix_ms};
use crate::replication::watch::{DirtySet, WatchEvent, watch};
use crate::text::error_chain;
use crate::trust::identity::Identity;
use crate::trust::tls::TlsMaterial;
use crate::types::{Epoch, RelPath};

#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub debounce: Duration,
    pub max_delay: Duration,
    pub rescan_interval: Duration,
}

/// Where to replicate to; may change while running (the coordinator re-pairs us).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub identity: Identity,
    /// The epoch the coordinator says is current for this target.
    pub epoch: Option<Epoch>,
}

pub enum Control {
    Flush {
        asked: Instant,
        reply: oneshot::Sender<Result<u64, String>>,
    },
}

struct Waiter {
    asked: Instant,
    reply: oneshot::Sender<Result<u64, String>>,
}

/// Replicates until `shutdown` is cancelled (the agent stops, or it is told to stop sending);
/// gives the sender back.
pub async fn run(
    mut sender: Sender,
    tls: TlsMaterial,
    mut target: watch::Receiver<Option<Target>>,
    cfg: LoopConfig,
    control: &mut mpsc::Receiver<Control>,
    shutdown: CancellationToken,
) -> Sender {
    let mut watcher = watch(sender.workspace(), sender.exclude().clone());
    let rescan_every = if watcher.degraded.is_some() {
        cfg.rescan_interval.min(Duration::from_secs(5))
    } else {
        cfg.rescan_interval
    };
    let figures = sender.figures.clone();
    let mut dirty = DirtySet::default();
    dirty.add_full(Instant::now());
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut session: Option<Session> = None;
    let mut backoff = Duration::from_millis(100);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut fenced: Option<String> = None;
    let mut pending_since: Option<SystemTime> = None;
    let mut next_rescan = tokio::time::Instant::now() + rescan_every;

    let set_error = |msg: Option<String>, connected: bool| {
        let mut f = figures.lock().expect("figures");
        f.last_error = msg;
        f.connected = connected;
    };

    loop {
        let current = target.borrow().clone();
        if let Some(t) = &current
            && let Some(e) = t.epoch
            && e > sender.epoch()
        {
            if let Err(err) = sender.raise_epoch(e) {
                tracing::error!(error = %err, "cannot persist the new epoch");
            }
            fenced = None;
            figures.lock().expect("figures").fenced = false;
        }
        // (Re)connect when there is a target, we are not fenced, and no backoff is pending.
        if session.is_none()
            && fenced.is_none()
            && retry_at.is_none_or(|t| t <= tokio::time::Instant::now())
            && let Some(t) = &current
        {
            retry_at = None;
            let r = async {
                let ch =
                    crate::replication::send::connect(&t.url, &tls, t.identity.clone()).await?;
                sender.open_session(ch).await
            };
            let r = tokio::select! {
                r = r => Some(r),
                _ = shutdown.cancelled() => None,
            };
            match r {
                None => break,
                Some(Ok(s)) => {
                    tracing::info!(peer = %t.url, generation = %s.receiver_generation, "replication session open");
                    session = Some(s);
                    backoff = Duration::from_millis(100);
                    dirty.add_full(Instant::now());
                    set_error(None, true);
                }
                Some(Err(e)) => {
                    let msg = e.to_string();
                    if e.is_fenced() {
                        tracing::error!(error = %msg, "fenced: this machine is no longer the primary; not sending");
                        fenced = Some(msg.clone());
                        figures.lock().expect("figures").fenced = true;
                        for w in waiters.drain(..) {
                            let _ = w.reply.send(Err(msg.clone()));
                        }
                    } else {
                        tracing::warn!(error = %msg, retry_in = ?backoff, "cannot replicate to the CPU agent");
                    }
                    set_error(Some(msg), false);
                    let jitter = rand::rng().random_range(0.0..0.3);
                    retry_at = Some(tokio::time::Instant::now() + backoff.mul_f64(1.0 + jitter));
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }

        let due = if session.is_some() {
            if waiters.is_empty() {
                dirty
                    .due(cfg.debounce, cfg.max_delay)
                    .map(tokio::time::Instant::from_std)
            } else {
                Some(tokio::time::Instant::now())
            }
        } else {
            None
        };
        let wake = [due, retry_at, Some(next_rescan)]
            .into_iter()
            .flatten()
            .min()
            .expect("rescan is always scheduled");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = target.changed() => {
                if target.borrow().as_ref() != current.as_ref() {
                    tracing::info!("replication target changed");
                    session = None;
                    retry_at = None;
                }
                continue;
            }
            ev = watcher.rx.recv() => {
                let now = Instant::now();
                match ev {
                    Some(WatchEvent::Paths(ps)) => dirty.add(ps, now),
                    Some(WatchEvent::Rescan) | None => dirty.add_full(now),
                }
                if pending_since.is_none() {
                    pending_since = Some(SystemTime::now());
                    figures.lock().expect("figures").oldest_pending_unix_ms = pending_since.map(unix_ms);
                }
                continue;
            }
            c = control.recv() => {
                match c {
                    Some(Control::Flush { asked, reply }) => {
                        if let Some(why) = &fenced {
                            let _ = reply.send(Err(why.clone()));
                        } else {
                            waiters.push(Waiter { asked, reply });
                            dirty.add_full(Instant::now());
                        }
                    }
                    None => {}
                }
                continue;
            }
            e = async {
                match session.as_mut() {
                    Some(s) => s.lost().await,
                    None => std::future::pending().await,
                }
            } => {
                let msg = e.to_string();
                tracing::warn!(error = %msg, "the replication session ended; reconnecting");
                session = None;
                set_error(Some(msg), false);
                dirty.add_full(Instant::now());
                retry_at = Some(tokio::time::Instant::now() + backoff);
                continue;
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
        if tokio::time::Instant::now() >= next_rescan {
            next_rescan = tokio::time::Instant::now() + rescan_every;
            dirty.add_full(Instant::now());
        }
        let Some(s) = session.as_mut() else { continue };
        if due.is_none_or(|d| d > tokio::time::Instant::now()) && waiters.is_empty() {
            continue;
        }
        if watcher.take_overflow() {
            dirty.add_full(Instant::now());
        }
        // Drain events already queued, so the scan covers every write made before now.
        while let Ok(ev) = watcher.rx.try_recv() {
            match ev {
                WatchEvent::Paths(ps) => dirty.add(ps, Instant::now()),
                WatchEvent::Rescan => dirty.add_full(Instant::now()),
            }
        }
        let scan_started = Instant::now();
        let (paths, full) = dirty.take();
        let scope = scope_of(paths.clone(), full || !waiters.is_empty());
        let r = tokio::select! {
            r = sender.sync_generation(s, scope, false) => r,
            _ = shutdown.cancelled() => break,
        };
        match r {
            Ok(report) => {
                let paths_of = |v: &[String]| -> Vec<RelPath> {
                    v.iter()
                        .filter_map(|p| RelPath::new(p.as_bytes().to_vec()).ok())
                        .collect()
                };
                let still: Vec<RelPath> = report
                    .as_ref()
                    .map(|r| paths_of(&r.still_changing))
                    .unwrap_or_default();
                let deferred: Vec<RelPath> = report
                    .as_ref()
                    .map(|r| paths_of(&r.deferred))
                    .unwrap_or_default();
                if let Some(r) = &report {
                    tracing::debug!(
                        generation = r.generation,
                        files = r.files_changed,
                        bytes_sent = r.bytes_sent,
                        ms = r.duration_ms,
                        "generation durable"
                    );
                }
                let more = !deferred.is_empty();
                if more {
                    // The budget of this generation was spent: the rest follows at once.
                    dirty.add_now(deferred);
                }
                if !still.is_empty() {
                    tracing::info!(
                        files = still.len(),
                        "files changed while read; retrying them"
                    );
                    dirty.add(still, Instant::now());
                } else if !more {
                    let generation = sender.index().generation.0;
                    let (done, keep): (Vec<Waiter>, Vec<Waiter>) =
                        waiters.drain(..).partition(|w| w.asked <= scan_started);
                    waiters = keep;
                    for w in done {
                        let _ = w.reply.send(Ok(generation));
                    }
                }
                if dirty.is_empty() {
                    pending_since = None;
                }
                let mut f = figures.lock().expect("figures");
                f.oldest_pending_unix_ms = pending_since.map(unix_ms);
            }
            Err(e) => {
                let msg = e.to_string();
                session = None;
                dirty.add(paths, Instant::now());
                dirty.add_full(Instant::now());
                set_error(Some(msg.clone()), false);
                if e.is_fenced() {
                    tracing::error!(error = %msg, "fenced: this machine is no longer the primary; not sending");
                    fenced = Some(msg.clone());
                    figures.lock().expect("figures").fenced = true;
                    for w in waiters.drain(..) {
                        let _ = w.reply.send(Err(msg.clone()));
                    }
                } else {
                    tracing::warn!(error = %msg, "generation failed; reconnecting");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                }
            }
        }
    }
    for w in waiters {
        let _ = w
            .reply
            .send(Err("replication stopped before the flush completed".into()));
    }
    sender
}

/// One generation now (for `--once`): connect, sync everything, wait until durable. Files that
/// keep changing while read are retried a few times before giving up.
pub async fn once(
    sender: &mut Sender,
    tls: &TlsMaterial,
    target: &Target,
) -> Result<crate::replication::send::Report, SyncError> {
    let t = std::time::Instant::now();
    let ch = crate::replication::send::connect(&target.url, tls, target.identity.clone()).await?;
    let mut s = sender.open_session(ch).await?;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "session open");
    let mut total = sender
        .sync_generation(&mut s, crate::replication::scan::Scope::Full, true)
        .await?
        .expect("forced generation");
    for _ in 0..5 {
        if total.still_changing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let paths: BTreeSet<RelPath> = total
            .still_changing
            .iter()
            .filter_map(|p| RelPath::new(p.as_bytes().to_vec()).ok())
            .collect();
        let r = sender
            .sync_generation(&mut s, crate::replication::scan::Scope::Paths(paths), true)
            .await?
            .expect("forced generation");
        total.generation = r.generation;
        total.files_changed += r.files_changed;
        total.bytes_sent += r.bytes_sent;
        total.duration_ms += r.duration_ms;
        total.files_total = r.files_total;
        total.bytes_total = r.bytes_total;
        total.root = r.root;
        total.still_changing = r.still_changing;
    }
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "generation done");
    s.close().await;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "session closed");
    if !total.still_changing.is_empty() {
        return Err(SyncError::Local(format!(
            "{} file(s) kept changing while being read, e.g. {}",
            total.still_changing.len(),
            total.still_changing[0]
        )));
    }
    Ok(total)
}

/// One line for an error, with its causes.
pub fn describe(e: &SyncError) -> String {
    error_chain(e)
}
