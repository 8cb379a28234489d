//! Reading a file that may change under us. A file is opened without following symlinks or
//! blocking ([`open_regular`]: a FIFO or device swapped in since the scan is skipped) and
//! checked against its scan before and after it is read: if its size, mtime or inode moved, the
//! read does not count ([`FileRead::Changed`]) and the file waits for the next generation.
//!
//! A file modified within [`RACY_WINDOW_NS`] of the read is recorded "racily clean": its next
//! quick-check re-hashes it, since a write in the same mtime tick would not show.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use crate::proto::Entry;
use crate::replication::scan::{RACY_WINDOW_NS, Stat, open_regular};
use crate::types::RelPath;

/// The result of reading one file.
pub(super) enum FileRead {
    /// The file changed while read (or vanished): next generation.
    Changed,
    Done(Entry),
}

/// Wall clock in ns, the scale of file mtimes.
pub(super) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Opens the file the scan saw; `None` if it is gone, a symlink or not a regular file now, or
/// different.
pub(super) fn open_checked(ws: &Path, p: &RelPath, st: &Stat) -> io::Result<Option<File>> {
    let f = match open_regular(&p.to_path(ws)) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !unchanged(&f, st)? {
        return Ok(None);
    }
    Ok(Some(f))
}

/// Whether the open file is still what the scan saw.
pub(super) fn unchanged(f: &File, st: &Stat) -> io::Result<bool> {
    let m = f.metadata()?;
    Ok(m.is_file()
        && m.ino() == st.ino
        && m.size() == st.size
        && m.mtime() * 1_000_000_000 + m.mtime_nsec() == st.mtime_ns)
}

/// The index entry of a file just read: racily clean when modified close to the read.
pub(super) fn entry_for(st: &Stat, hash: blake3::Hash, read_start_ns: i64) -> Entry {
    let mut e = st.entry();
    e.blake3 = hash.as_bytes().to_vec();
    e.verify = st.mtime_ns >= read_start_ns - RACY_WINDOW_NS;
    e
}

/// Hashes a file without sending it (renames and re-verification).
pub(super) fn hash_file(ws: &Path, p: &RelPath, st: &Stat) -> FileRead {
    let t = now_ns();
    let Ok(Some(mut f)) = open_checked(ws, p, st) else {
        return FileRead::Changed;
    };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(_) => return FileRead::Changed,
        }
    }
    if total != st.size || !unchanged(&f, st).unwrap_or(false) {
        return FileRead::Changed;
    }
    FileRead::Done(entry_for(st, h.finalize(), t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::scan::tests::{mkfifo, must_not_block};

    /// A FIFO swapped in between the scan and the read: the file waits for the next generation
    /// and the read does not wait for a writer.
    #[test]
    fn a_fifo_swapped_in_after_the_scan_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().to_path_buf();
        std::fs::write(ws.join("ckpt"), b"weights").unwrap();
        let st = Stat::from_metadata(&std::fs::symlink_metadata(ws.join("ckpt")).unwrap()).unwrap();
        let p = RelPath::new("ckpt").unwrap();
        assert!(matches!(hash_file(&ws, &p, &st), FileRead::Done(_)));
        std::fs::remove_file(ws.join("ckpt")).unwrap();
        mkfifo(&ws.join("ckpt"));
        let (read, opened) = must_not_block(move || {
            let read = matches!(hash_file(&ws, &p, &st), FileRead::Changed);
            (read, open_checked(&ws, &p, &st).unwrap().is_none())
        });
        assert!(read && opened);
    }
}
