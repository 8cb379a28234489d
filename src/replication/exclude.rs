//! Paths never replicated: the stage directory, a state directory inside the workspace, and
//! what the workspace's `.standbyignore` names (gitignore syntax: caches, virtualenvs, build
//! output).
//!
//! An ignored path is as if it were not in the workspace: it is not sent, and a copy the standby
//! holds from before the pattern was added is deleted there by the next scan that covers it (a
//! mirror of what is replicated; the history keeps earlier snapshots). The file is read again
//! when it changes ([`Exclude::refresh`], at every scan); a change makes that scan a full one,
//! so files a removed pattern lets back in are found at once.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::replication::scan::STAGE_DIR_NAME;
use crate::types::RelPath;

/// The ignore file, at the workspace's root.
pub const IGNORE_FILE: &str = ".standbyignore";

/// What is left out of replication; clones share the ignore rules (the watcher's and the
/// sender's see the same).
#[derive(Clone, Debug, Default)]
pub struct Exclude {
    paths: Vec<RelPath>,
    workspace: PathBuf,
    rules: Arc<RwLock<Rules>>,
}

#[derive(Debug, Default)]
struct Rules {
    matcher: Option<Gitignore>,
    /// The file's (inode, size, mtime) when read; None: there was none.
    seen: Option<(u64, u64, i64)>,
}

impl Exclude {
    pub fn new(workspace: &Path, state_dir: &Path) -> Exclude {
        let mut paths = vec![RelPath::new(STAGE_DIR_NAME).expect("valid")];
        if let (Ok(ws), Ok(sd)) = (workspace.canonicalize(), state_dir.canonicalize())
            && let Ok(rel) = sd.strip_prefix(&ws)
            && let Ok(p) = RelPath::new(rel.as_os_str().as_bytes().to_vec())
        {
            paths.push(p);
        }
        let ex = Exclude {
            paths,
            workspace: workspace.to_path_buf(),
            rules: Arc::default(),
        };
        ex.refresh();
        ex
    }

    /// Reads `.standbyignore` again if it changed (or appeared, or went); true when it did.
    pub fn refresh(&self) -> bool {
        let path = self.workspace.join(IGNORE_FILE);
        let now = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| {
                (
                    m.ino(),
                    m.size(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000,
                )
            });
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        if rules.seen == now {
            return false;
        }
        rules.seen = now;
        rules.matcher = now.and_then(|_| load(&self.workspace, &path));
        true
    }

    /// Whether `p` is left out (for a path whose kind is not known: a directory pattern matches
    /// what lies below it).
    pub fn is_excluded(&self, p: &RelPath) -> bool {
        self.is_excluded_entry(p, false)
    }

    /// Whether `p`, a directory or not, is left out.
    pub fn is_excluded_entry(&self, p: &RelPath, is_dir: bool) -> bool {
        if self.paths.iter().any(|x| p.starts_with(x)) {
            return true;
        }
        let rules = self.rules.read().unwrap_or_else(|e| e.into_inner());
        let Some(m) = &rules.matcher else {
            return false;
        };
        let rel = Path::new(OsStr::from_bytes(p.as_bytes()));
        m.matched_path_or_any_parents(rel, is_dir).is_ignore()
    }
}

/// The rules of `path`; a line that does not parse is skipped with a warning, an unreadable
/// file ignores nothing (said once per change).
fn load(workspace: &Path, path: &Path) -> Option<Gitignore> {
    let mut b = GitignoreBuilder::new(workspace);
    if let Some(e) = b.add(path) {
        tracing::warn!(file = %path.display(), error = %e, "part of .standbyignore is not used");
    }
    match b.build() {
        Ok(g) => {
            tracing::info!(file = %path.display(), rules = g.len(), "ignore rules loaded");
            Some(g)
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignore rules not used");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn gitignore_rules_from_the_workspace_root_are_followed_and_reloaded() {
        let ws = tempfile::tempdir().unwrap();
        let ex = Exclude::new(ws.path(), &ws.path().join("nowhere"));
        assert!(!ex.is_excluded(&rel("venv/lib/x.py")));
        std::fs::write(
            ws.path().join(IGNORE_FILE),
            "# caches\n__pycache__/\n*.tmp\n/venv\n!keep.tmp\n",
        )
        .unwrap();
        assert!(ex.refresh(), "a new file is read");
        assert!(!ex.refresh(), "and not again while unchanged");
        assert!(ex.is_excluded(&rel("venv/lib/x.py")));
        assert!(ex.is_excluded(&rel("a/b/__pycache__/m.pyc")));
        assert!(ex.is_excluded_entry(&rel("a/__pycache__"), true));
        assert!(
            !ex.is_excluded_entry(&rel("a/__pycache__"), false),
            "a file of that name stays"
        );
        assert!(ex.is_excluded(&rel("x/out.tmp")));
        assert!(!ex.is_excluded(&rel("keep.tmp")), "negation");
        assert!(!ex.is_excluded(&rel("src/venv/x")), "anchored to the root");
        assert!(!ex.is_excluded(&rel(IGNORE_FILE)));
        // Clones share the rules; removing the file lets everything back in.
        let clone = ex.clone();
        std::fs::remove_file(ws.path().join(IGNORE_FILE)).unwrap();
        assert!(ex.refresh());
        assert!(!clone.is_excluded(&rel("venv/lib/x.py")));
        // The stage is always out.
        assert!(ex.is_excluded(&rel(STAGE_DIR_NAME)));
    }
}
