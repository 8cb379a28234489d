//! An agent's state directory, locked for the lifetime of the process so two agents never share
//! one (a second `agent-gpu --once` beside a running agent would corrupt its index).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

/// Creates `dir` (mode 0700) if needed and takes its lock, or explains who holds it.
pub fn lock(dir: &Path) -> io::Result<StateLock> {
    fs::create_dir_all(dir)?;
    let path = dir.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "state directory {} is in use by another process (pid {})",
                dir.display(),
                holder.trim()
            ),
        ));
    }
    f.set_len(0)?;
    f.rewind()?;
    write!(f, "{}", std::process::id())?;
    Ok(StateLock { _file: f, path })
}

#[cfg(test)]
mod tests {
    #[test]
    fn second_lock_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _a = super::lock(d.path()).unwrap();
        let e = super::lock(d.path()).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
    }
}
