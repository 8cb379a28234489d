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
//!
//! Each turn of `Loop::run` is the same few steps: follow a higher epoch from the coordinator,
//! connect if needed (`Loop::connect`), wait for the first thing to happen (`Loop::wait`:
//! a new target, changes, a flush, the session's loss, or a timer), then rescan and sync one
//! generation when one is due (`Loop::sync_once`).

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::time::{Duration, Instant, SystemTime};

use rand::RngExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::replication::send::{Report, Sender, Session, SyncError, scope_of, unix_ms};
use crate::replication::watch::{DirtySet, WatchEvent, Watcher, watch};
use crate::trust::tls::Expect;
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
    pub identity: Expect,
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
    sender: Sender,
    tls: TlsMaterial,
    target: watch::Receiver<Option<Target>>,
    cfg: LoopConfig,
    control: &mut mpsc::Receiver<Control>,
    shutdown: CancellationToken,
) -> Sender {
    let mut lp = Loop::new(sender, tls, target, cfg, control, shutdown);
    lp.run().await;
    lp.finish()
}

/// When to try connecting again: exponential backoff from 100 ms to 5 s (0–30 % jitter after a
/// failed connection), reset only once a generation goes through.
struct Backoff {
    delay: Duration,
    retry_at: Option<tokio::time::Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn ready(&self) -> bool {
        self.retry_at
            .is_none_or(|t| t <= tokio::time::Instant::now())
    }

    /// A connection attempt failed: wait the delay plus jitter, and double it.
    fn failed(&mut self) {
        let jitter = rand::rng().random_range(0.0..0.3);
        self.retry_at = Some(tokio::time::Instant::now() + self.delay.mul_f64(1.0 + jitter));
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    /// An open session broke, or a generation on it failed: reconnect after the current
    /// delay, and double it. A session that opens and fails at once (the receiver refuses each
    /// generation, the state directory is gone) is retried ever more slowly, never in a loop.
    fn lost(&mut self) {
        self.retry_at = Some(tokio::time::Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    /// A generation went through (or there was nothing to send): the next loss reconnects
    /// soon again.
    fn succeeded(&mut self) {
        self.delay = Self::FIRST;
    }
}

/// The rescan period: shorter without inotify, and at most a second while the workspace is
/// missing (so its return is seen at once).
fn rescan_every(watcher: &Watcher, cfg: &LoopConfig) -> Duration {
    match &watcher.degraded {
        None => cfg.rescan_interval,
        Some(_) if watcher.stale_root_missing() => Duration::from_secs(1),
        Some(_) => cfg.rescan_interval.min(Duration::from_secs(5)),
    }
}

/// Why [`Loop::wait`] returned.
enum Woke {
    /// The agent stops.
    Stop,
    /// Something arrived (a target, changes, a flush, a lost session) and was noted.
    Noted,
    /// A timer fired: a sync, a retry or a rescan may be due.
    Timer,
}

/// The sending loop's state. One task owns it: the sender, its session, the changes not yet
/// durable on the receiver and the flushes waiting for them.
struct Loop<'a> {
    sender: Sender,
    tls: TlsMaterial,
    target: watch::Receiver<Option<Target>>,
    cfg: LoopConfig,
    control: &'a mut mpsc::Receiver<Control>,
    shutdown: CancellationToken,
    watcher: Watcher,
    /// The rescan period: shorter when inotify is not in use.
    rescan_every: Duration,
    next_rescan: tokio::time::Instant,
    dirty: DirtySet,
    /// When the oldest change not yet durable was seen (the RPO clock).
    pending_since: Option<SystemTime>,
    waiters: Vec<Waiter>,
    session: Option<Session>,
    backoff: Backoff,
    /// Why the receiver refused us as no longer the primary; no more sending until a higher
    /// epoch comes with the target.
    fenced: Option<String>,
    /// The change (the dirty set's last) the pending figures were last estimated for while
    /// disconnected.
    estimated: Option<Instant>,
    /// Whether new targets and flushes can still arrive. A closed channel is ready at once on
    /// every poll: waiting on it again would turn [`Loop::wait`] into a busy loop.
    targets_open: bool,
    control_open: bool,
}

impl<'a> Loop<'a> {
    fn new(
        sender: Sender,
        tls: TlsMaterial,
        target: watch::Receiver<Option<Target>>,
        cfg: LoopConfig,
        control: &'a mut mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> Loop<'a> {
        let watcher = watch(sender.workspace(), sender.exclude().clone());
        let rescan_every = rescan_every(&watcher, &cfg);
        let mut dirty = DirtySet::default();
        dirty.add_full(Instant::now());
        Loop {
            sender,
            tls,
            target,
            cfg,
            control,
            shutdown,
            watcher,
            rescan_every,
            next_rescan: tokio::time::Instant::now() + rescan_every,
            dirty,
            pending_since: None,
            waiters: Vec::new(),
            session: None,
            backoff: Backoff {
                delay: Backoff::FIRST,
                retry_at: None,
            },
            fenced: None,
            estimated: None,
            targets_open: true,
            control_open: true,
        }
    }

    async fn run(&mut self) {
        loop {
            let current = self.target.borrow().clone();
            self.follow_epoch(current.as_ref());
            if let Some(t) = &current
                && self.may_connect()
                && self.connect(t).await.is_break()
            {
                return;
            }
            let due = self.due();
            match self.wait(current.as_ref(), due).await {
                Woke::Stop => return,
                Woke::Noted => continue,
                Woke::Timer => {}
            }
            self.rescan_when_due();
            if self.sync_due(due) && self.sync_once().await.is_break() {
                return;
            }
            self.estimate_when_disconnected().await;
        }
    }

    /// Flushes still waiting are told that replication stopped.
    fn finish(self) -> Sender {
        for w in self.waiters {
            let _ = w.reply.send(Err(
                "this agent stopped sending before the flush completed: it was \
                           fenced, its role changed, or it is shutting down"
                    .into(),
            ));
        }
        self.sender
    }

    /// A higher epoch from the coordinator is persisted at once and lifts a fence.
    fn follow_epoch(&mut self, current: Option<&Target>) {
        if let Some(t) = current
            && let Some(e) = t.epoch
            && e > self.sender.epoch()
        {
            if let Err(err) = self.sender.raise_epoch(e) {
                tracing::error!(error = %err, "cannot persist the new epoch");
            }
            self.fenced = None;
            self.sender.figures.lock().expect("figures").fenced = false;
        }
    }

    /// (Re)connect when not connected, not fenced, and no backoff is pending.
    fn may_connect(&self) -> bool {
        self.session.is_none() && self.fenced.is_none() && self.backoff.ready()
    }

    /// Opens a session with `t`; Break when the agent stops meanwhile.
    async fn connect(&mut self, t: &Target) -> ControlFlow<()> {
        self.backoff.retry_at = None;
        let opened = async {
            let ch =
                crate::replication::send::connect(&t.url, &self.tls, t.identity.clone()).await?;
            self.sender.open_session(ch).await
        };
        let r = tokio::select! {
            r = opened => r,
            _ = self.shutdown.cancelled() => return ControlFlow::Break(()),
        };
        match r {
            Ok(s) => {
                tracing::info!(peer = %t.url, generation = %s.receiver_generation, "replication session open");
                self.session = Some(s);
                self.dirty.add_full(Instant::now());
                self.set_error(None, true);
            }
            Err(e) => {
                let msg = e.to_string();
                if e.is_fenced() {
                    self.fence(msg.clone());
                } else {
                    tracing::warn!(error = %msg, retry_in = ?self.backoff.delay, "cannot replicate to the CPU agent");
                }
                self.set_error(Some(msg), false);
                self.backoff.failed();
            }
        }
        ControlFlow::Continue(())
    }

    /// When the next generation is due: at once when a flush waits, after the debounce
    /// otherwise; never without a session.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.session.as_ref()?;
        if self.waiters.is_empty() {
            self.dirty
                .due(self.cfg.debounce, self.cfg.max_delay)
                .map(tokio::time::Instant::from_std)
        } else {
            Some(tokio::time::Instant::now())
        }
    }

    /// Waits for the first of: stop, a new target, changes, a flush, the session's loss, or
    /// the next timer (`due`, the retry, the rescan).
    async fn wait(&mut self, current: Option<&Target>, due: Option<tokio::time::Instant>) -> Woke {
        let wake = [due, self.backoff.retry_at, Some(self.next_rescan)]
            .into_iter()
            .flatten()
            .min()
            .expect("rescan is always scheduled");
        let lost = async {
            match self.session.as_mut() {
                Some(s) => s.lost().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.shutdown.cancelled() => return Woke::Stop,
            r = self.target.changed(), if self.targets_open => match r {
                Ok(()) => self.retarget(current),
                Err(_) => self.targets_open = false,
            },
            ev = self.watcher.rx.recv() => self.changed(ev),
            c = self.control.recv(), if self.control_open => match c {
                Some(Control::Flush { asked, reply }) => self.flush_asked(asked, reply),
                None => self.control_open = false,
            },
            e = lost => self.session_lost(e),
            _ = tokio::time::sleep_until(wake) => return Woke::Timer,
        }
        Woke::Noted
    }

    /// A different target drops the session and any pending backoff.
    fn retarget(&mut self, current: Option<&Target>) {
        if self.target.borrow().as_ref() != current {
            tracing::info!("replication target changed");
            self.session = None;
            self.backoff.retry_at = None;
        }
    }

    /// The watcher saw changes (or missed some: then everything is dirty); starts the RPO clock.
    fn changed(&mut self, ev: Option<WatchEvent>) {
        let now = Instant::now();
        match ev {
            Some(WatchEvent::Paths(ps)) => self.dirty.add(ps, now),
            Some(WatchEvent::Rescan) => self.dirty.add_full(now),
            Some(WatchEvent::RootGone) | None => self.rewatch(),
        }
        if self.pending_since.is_none() {
            self.pending_since = Some(SystemTime::now());
            self.sender
                .figures
                .lock()
                .expect("figures")
                .oldest_pending_unix_ms = self.pending_since.map(unix_ms);
        }
    }

    /// A flush waits for a full generation that starts after it; a fenced sender refuses it.
    fn flush_asked(&mut self, asked: Instant, reply: oneshot::Sender<Result<u64, String>>) {
        if let Some(why) = &self.fenced {
            let _ = reply.send(Err(why.clone()));
        } else {
            self.waiters.push(Waiter { asked, reply });
            self.dirty.add_full(Instant::now());
        }
    }

    fn session_lost(&mut self, e: SyncError) {
        let msg = e.to_string();
        tracing::warn!(error = %msg, "the replication session ended; reconnecting");
        self.session = None;
        self.set_error(Some(msg), false);
        self.dirty.add_full(Instant::now());
        self.backoff.lost();
    }

    fn rescan_when_due(&mut self) {
        if self.watcher.stale(self.sender.workspace()) {
            self.rewatch();
        }
        if tokio::time::Instant::now() >= self.next_rescan {
            self.next_rescan = tokio::time::Instant::now() + self.rescan_every;
            self.dirty.add_full(Instant::now());
        }
    }

    /// Watches the workspace again (it was removed, replaced, or missing), and rescans it all.
    fn rewatch(&mut self) {
        tracing::info!("the workspace directory changed; watching it again");
        self.watcher = watch(self.sender.workspace(), self.sender.exclude().clone());
        self.rescan_every = rescan_every(&self.watcher, &self.cfg);
        self.next_rescan = tokio::time::Instant::now() + self.rescan_every;
        self.dirty.add_full(Instant::now());
    }

    /// Without a session nothing is planned by a sync: plan what is dirty against the index
    /// once the changes settle, so `status` and heartbeats show the bytes waiting (not 0).
    async fn estimate_when_disconnected(&mut self) {
        let settled = self
            .dirty
            .last
            .is_some_and(|l| l + self.cfg.debounce <= Instant::now());
        if self.session.is_some() || !settled || self.estimated == self.dirty.last {
            return;
        }
        self.estimated = self.dirty.last;
        let scope = scope_of(self.dirty.paths.clone(), self.dirty.full);
        if let Err(e) = self.sender.estimate(scope).await {
            tracing::debug!(error = %e, "could not estimate what is pending");
        }
    }

    /// A generation is due when connected and the debounce has passed or a flush waits.
    fn sync_due(&self, due: Option<tokio::time::Instant>) -> bool {
        self.session.is_some()
            && !(due.is_none_or(|d| d > tokio::time::Instant::now()) && self.waiters.is_empty())
    }

    /// Sends one generation of what is dirty (everything when a flush waits); Break when the
    /// agent stops meanwhile.
    async fn sync_once(&mut self) -> ControlFlow<()> {
        if self.session.is_none() {
            return ControlFlow::Continue(());
        }
        if self.watcher.take_overflow() {
            self.dirty.add_full(Instant::now());
        }
        // Drain events already queued, so the scan covers every write made before now.
        while let Ok(ev) = self.watcher.rx.try_recv() {
            self.changed(Some(ev));
        }
        let Some(s) = self.session.as_mut() else {
            return ControlFlow::Continue(());
        };
        let scan_started = Instant::now();
        let (paths, full) = self.dirty.take();
        let scope = scope_of(paths.clone(), full || !self.waiters.is_empty());
        let r = tokio::select! {
            r = self.sender.sync_generation(s, scope, false) => r,
            _ = self.shutdown.cancelled() => return ControlFlow::Break(()),
        };
        match r {
            Ok(report) => self.synced(report, scan_started),
            Err(e) => self.sync_failed(e, paths),
        }
        ControlFlow::Continue(())
    }

    /// A generation is durable: what it left behind goes back into the dirty set; when it left
    /// nothing, the flushes asked before its scan are answered.
    fn synced(&mut self, report: Option<Report>, scan_started: Instant) {
        self.backoff.succeeded();
        let (still, deferred) = leftovers(report.as_ref());
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
            self.dirty.add_now(deferred);
        }
        if !still.is_empty() {
            tracing::info!(
                files = still.len(),
                "files changed while read; retrying them"
            );
            self.dirty.add(still, Instant::now());
        } else if !more {
            self.answer_flushes(scan_started);
        }
        if self.dirty.is_empty() {
            self.pending_since = None;
            // Idle after a long scan or generation: give its memory back (ARCHITECTURE.md, "Memory").
            if scan_started.elapsed() >= crate::host::BURST {
                crate::host::after_burst();
            }
        }
        let mut f = self.sender.figures.lock().expect("figures");
        f.oldest_pending_unix_ms = self.pending_since.map(unix_ms);
    }

    fn answer_flushes(&mut self, scan_started: Instant) {
        let generation = self.sender.index().generation.0;
        let (done, keep): (Vec<Waiter>, Vec<Waiter>) = self
            .waiters
            .drain(..)
            .partition(|w| w.asked <= scan_started);
        self.waiters = keep;
        for w in done {
            let _ = w.reply.send(Ok(generation));
        }
    }

    /// The generation failed: its paths stay dirty, with a full rescan on top; reconnect after
    /// the backoff unless fenced.
    fn sync_failed(&mut self, e: SyncError, paths: BTreeSet<RelPath>) {
        let msg = e.to_string();
        self.session = None;
        self.dirty.add(paths, Instant::now());
        self.dirty.add_full(Instant::now());
        self.set_error(Some(msg.clone()), false);
        if e.is_fenced() {
            self.fence(msg);
        } else {
            tracing::warn!(error = %msg, "generation failed; reconnecting");
            self.backoff.lost();
        }
    }

    /// The receiver knows a newer primary: stop sending and refuse the waiting flushes.
    fn fence(&mut self, msg: String) {
        tracing::error!(error = %msg, "fenced: this machine is no longer the primary; not sending");
        self.sender.figures.lock().expect("figures").fenced = true;
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(msg.clone()));
        }
        self.fenced = Some(msg);
    }

    fn set_error(&self, msg: Option<String>, connected: bool) {
        let mut f = self.sender.figures.lock().expect("figures");
        f.last_error = msg;
        f.connected = connected;
    }
}

/// What a generation left for the next: files that changed while read, and files deferred
/// because its budget was spent.
fn leftovers(report: Option<&Report>) -> (Vec<RelPath>, Vec<RelPath>) {
    let paths_of = |v: &[String]| -> Vec<RelPath> {
        v.iter()
            .filter_map(|p| RelPath::new(p.as_bytes().to_vec()).ok())
            .collect()
    };
    let still = report
        .map(|r| paths_of(&r.still_changing))
        .unwrap_or_default();
    let deferred = report.map(|r| paths_of(&r.deferred)).unwrap_or_default();
    (still, deferred)
}

/// One generation now (for `--once`): connect, sync everything, wait until durable. Files that
/// keep changing while read are retried a few times before giving up.
pub async fn once(
    sender: &mut Sender,
    tls: &TlsMaterial,
    target: &Target,
) -> Result<Report, SyncError> {
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
        add_retry(&mut total, r);
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

/// Folds a retry's report into the total: counts add up, the rest is the retry's.
fn add_retry(total: &mut Report, r: Report) {
    total.generation = r.generation;
    total.files_changed += r.files_changed;
    total.bytes_sent += r.bytes_sent;
    total.duration_ms += r.duration_ms;
    total.files_total = r.files_total;
    total.bytes_total = r.bytes_total;
    total.root = r.root;
    total.still_changing = r.still_changing;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session that keeps breaking right after it opens (no generation in between) is
    /// retried ever more slowly up to the cap, never every 100 ms; one generation that goes
    /// through makes the next loss quick again.
    #[tokio::test(start_paused = true)]
    async fn losses_back_off_until_a_generation_goes_through() {
        let mut b = Backoff {
            delay: Backoff::FIRST,
            retry_at: None,
        };
        let mut waits = Vec::new();
        for _ in 0..8 {
            let now = tokio::time::Instant::now();
            b.lost();
            waits.push((b.retry_at.unwrap() - now).as_millis());
            assert!(!b.ready());
            tokio::time::advance(b.retry_at.unwrap() - now).await;
            assert!(b.ready());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.succeeded();
        let now = tokio::time::Instant::now();
        b.lost();
        assert_eq!(b.retry_at.unwrap() - now, Backoff::FIRST);
    }
}
