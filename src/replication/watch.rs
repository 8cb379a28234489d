//! Change detection with inotify (the `notify` crate), feeding a debounced dirty set.
//!
//! The kernel is asked for changes only ([`WATCHED`]): no opens, no read-only closes.
//! Hazards (measured on notify 8): a file created right after its directory can go unreported (a
//! new directory is scanned whole, so it is covered); a kernel queue overflow arrives as a
//! `Rescan` flag and our own queue overflowing is treated the same: everything is rescanned.
//! Running out of watches (`MaxFilesWatch`) degrades to periodic full rescans, with a log line.

use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::replication::scan::Exclude;
use crate::types::RelPath;

pub enum WatchEvent {
    Paths(Vec<RelPath>),
    /// Something was missed: rescan everything.
    Rescan,
    /// The workspace directory itself was removed or renamed: the watch is on a directory
    /// that is no longer the workspace, and must be set up again.
    RootGone,
}

pub struct Watcher {
    _inner: Option<RecommendedWatcher>,
    pub rx: mpsc::Receiver<WatchEvent>,
    /// Keeps the channel open when there is no watch (`rx` then waits for ever instead of
    /// ending, which would wake its reader in a busy loop).
    _idle: Option<mpsc::Sender<WatchEvent>>,
    overflow: Arc<AtomicBool>,
    /// Why inotify is not in use, when it is not (then rely on periodic rescans).
    pub degraded: Option<String>,
    /// The watched directory's identity when the watch was set up (None: it was missing).
    root: Option<(u64, u64, Option<SystemTime>)>,
}

impl Watcher {
    /// Whether events were dropped since the last call (rescan everything then).
    pub fn take_overflow(&self) -> bool {
        self.overflow.swap(false, Ordering::Relaxed)
    }

    /// Whether `workspace` is no longer the directory this watch was set up on: deleted,
    /// replaced by another, or there now when it was missing. Then watch again.
    pub fn stale(&self, workspace: &Path) -> bool {
        identity(workspace) != self.root
    }

    /// Whether the workspace was missing when this watch was set up.
    pub fn stale_root_missing(&self) -> bool {
        self.root.is_none()
    }
}

/// What tells one directory from another in its place: device, inode and, where the
/// filesystem keeps it, the birth time (an inode number is soon reused).
fn identity(dir: &Path) -> Option<(u64, u64, Option<SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.created().ok()))
}

fn relative(ws: &Path, p: &Path) -> Option<RelPath> {
    let r = p.strip_prefix(ws).ok()?;
    if r.as_os_str().is_empty() {
        return None;
    }
    RelPath::new(r.as_os_str().as_bytes().to_vec()).ok()
}

pub fn watch(workspace: &Path, exclude: Exclude) -> Watcher {
    let (tx, rx) = mpsc::channel(8192);
    let overflow = Arc::new(AtomicBool::new(false));
    let root = identity(workspace);
    let events = Events {
        ws: workspace.to_path_buf(),
        exclude,
        tx: tx.clone(),
        overflow: overflow.clone(),
    };
    let (inner, degraded) = match start(workspace, move |res: notify::Result<notify::Event>| {
        events.handle(res)
    }) {
        Ok(w) => (Some(w), None),
        Err(why) => {
            tracing::warn!(reason = %why, "change notification unavailable; falling back to periodic rescans");
            (None, Some(why))
        }
    };
    Watcher {
        _idle: inner.is_none().then_some(tx),
        _inner: inner,
        rx,
        overflow,
        degraded,
        root,
    }
}

/// What the watch asks the kernel for: changes, and the close of a file written to (not opens
/// and read-only closes, which the workload's reads would send by the thousand).
const WATCHED: notify::EventKindMask =
    notify::EventKindMask::CORE.union(notify::EventKindMask::ACCESS_CLOSE);

/// A recursive inotify watch of the workspace, or why there is none.
fn start(
    workspace: &Path,
    handler: impl notify::EventHandler,
) -> Result<RecommendedWatcher, String> {
    let config = notify::Config::default().with_event_kinds(WATCHED);
    let mut w = RecommendedWatcher::new(handler, config)
        .map_err(|e| format!("inotify unavailable: {e}"))?;
    w.watch(workspace, RecursiveMode::Recursive)
        .map_err(|e| format!("cannot watch {}: {e}", workspace.display()))?;
    Ok(w)
}

/// Turns notify's events into [`WatchEvent`]s, on notify's thread.
struct Events {
    ws: PathBuf,
    exclude: Exclude,
    tx: mpsc::Sender<WatchEvent>,
    overflow: Arc<AtomicBool>,
}

impl Events {
    fn handle(&self, res: notify::Result<notify::Event>) {
        let ev = match res {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "watch error; rescanning");
                self.overflow.store(true, Ordering::Relaxed);
                return;
            }
        };
        if ev.need_rescan() {
            self.send(WatchEvent::Rescan);
            return;
        }
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                if ev.paths.iter().any(|p| p == &self.ws) =>
            {
                self.send(WatchEvent::RootGone);
                return;
            }
            _ => {}
        }
        let paths: Vec<RelPath> = ev
            .paths
            .iter()
            .filter_map(|p| relative(&self.ws, p))
            .filter(|p| !self.exclude.is_excluded(p))
            .collect();
        if !paths.is_empty() {
            self.send(WatchEvent::Paths(paths));
        }
    }

    /// Our queue being full counts as an overflow: everything is rescanned.
    fn send(&self, ev: WatchEvent) {
        if self.tx.try_send(ev).is_err() {
            self.overflow.store(true, Ordering::Relaxed);
        }
    }
}

/// Paths changed since the last generation, with the debounce clock.
#[derive(Debug, Default)]
pub struct DirtySet {
    pub paths: BTreeSet<RelPath>,
    pub full: bool,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// Paths that are due at once (the rest of a generation whose budget was spent).
    pub urgent: bool,
}

impl DirtySet {
    pub fn add(&mut self, paths: impl IntoIterator<Item = RelPath>, now: Instant) {
        let mut any = false;
        for p in paths {
            self.paths.insert(p);
            any = true;
        }
        if any {
            self.touch(now);
        }
        if self.paths.len() > 100_000 {
            self.paths.clear();
            self.full = true;
        }
    }

    /// Adds paths that should be synced without waiting for the debounce.
    pub fn add_now(&mut self, paths: impl IntoIterator<Item = RelPath>) {
        let now = Instant::now();
        self.add(paths, now);
        self.urgent = !self.is_empty();
    }

    pub fn add_full(&mut self, now: Instant) {
        self.full = true;
        self.touch(now);
    }

    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    pub fn is_empty(&self) -> bool {
        !self.full && self.paths.is_empty()
    }

    /// When the set should be synced: `debounce` after the last event, but no later than
    /// `max_delay` after the first (so a constant trickle of writes cannot starve the sync).
    pub fn due(&self, debounce: Duration, max_delay: Duration) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        if self.urgent {
            return Some(first.min(last));
        }
        Some((last + debounce).min(first + max_delay))
    }

    pub fn take(&mut self) -> (BTreeSet<RelPath>, bool) {
        self.first = None;
        self.last = None;
        self.urgent = false;
        (
            std::mem::take(&mut self.paths),
            std::mem::take(&mut self.full),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debounce_bounded_by_max_delay() {
        let t0 = Instant::now();
        let mut d = DirtySet::default();
        assert!(
            d.due(Duration::from_millis(250), Duration::from_secs(1))
                .is_none()
        );
        d.add([RelPath::new("a").unwrap()], t0);
        assert_eq!(
            d.due(Duration::from_millis(250), Duration::from_secs(1)),
            Some(t0 + Duration::from_millis(250))
        );
        d.add(
            [RelPath::new("b").unwrap()],
            t0 + Duration::from_millis(900),
        );
        assert_eq!(
            d.due(Duration::from_millis(250), Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(1))
        );
        let (p, full) = d.take();
        assert_eq!(p.len(), 2);
        assert!(!full);
        assert!(d.is_empty());
    }

    #[tokio::test]
    async fn reports_writes_in_new_directories() {
        let d = tempfile::tempdir().unwrap();
        let mut w = watch(d.path(), Exclude::default());
        assert!(w.degraded.is_none());
        std::fs::create_dir(d.path().join("new")).unwrap();
        std::fs::write(d.path().join("new/f"), b"x").unwrap();
        let mut seen = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !seen.contains("new") {
            match tokio::time::timeout_at(deadline, w.rx.recv()).await {
                Ok(Some(WatchEvent::Paths(ps))) => seen.extend(ps.iter().map(|p| p.display())),
                Ok(Some(WatchEvent::Rescan)) => break,
                _ => panic!("no event for the new directory: {seen:?}"),
            }
        }
    }

    /// A watch on a missing workspace waits quietly (its channel never ends: an ended one woke
    /// the sending loop in a busy loop), and says it is stale once the directory exists; a
    /// workspace removed and made again is stale too, and its removal is reported.
    #[tokio::test]
    async fn a_missing_or_replaced_workspace_is_noticed_without_spinning() {
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("ws");
        let mut w = watch(&ws, Exclude::default());
        assert!(w.degraded.is_some());
        let quiet = tokio::time::timeout(Duration::from_millis(200), w.rx.recv()).await;
        assert!(
            quiet.is_err(),
            "the channel of a missing watch must not end"
        );
        assert!(!w.stale(&ws));
        std::fs::create_dir(&ws).unwrap();
        assert!(w.stale(&ws), "the workspace came: watch it");

        let mut w = watch(&ws, Exclude::default());
        assert!(w.degraded.is_none() && !w.stale(&ws));
        std::fs::remove_dir(&ws).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, w.rx.recv()).await {
                Ok(Some(WatchEvent::RootGone)) => break,
                Ok(Some(_)) => continue,
                other => panic!("no RootGone: {:?}", other.map(|e| e.is_some())),
            }
        }
        std::fs::create_dir(&ws).unwrap();
        assert!(w.stale(&ws), "a new directory in its place");
    }
}
