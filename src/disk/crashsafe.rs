//! Crash-safe state files and framed records.
//!
//! A state file is written to a temporary name, fsynced, renamed over the old one, and the
//! directory is fsynced: a reader sees the old file or the new one, never a torn one.
//! Every file and every log record carries a magic number, a format version, its length and a
//! blake3 checksum, so a torn tail, a foreign file or bit rot is detected, never misread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

/// Magic of every Standby state file and record: "SBY1".
pub const MAGIC: [u8; 4] = *b"SBY1";
/// Framing format version.
pub const VERSION: u16 = 1;
/// Refuse records claiming to be larger than this (a corrupt length must not allocate 4 GiB).
pub const MAX_RECORD: usize = 1 << 30;

const HEADER: usize = 4 + 2 + 2 + 8; // magic, version, kind, length
const TRAILER: usize = 32; // blake3 of header + payload

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("not a standby record (bad magic)")]
    Magic,
    #[error("unsupported format version {0}")]
    Version(u16),
    #[error("record of kind {found}, expected {expected}")]
    Kind { expected: u16, found: u16 },
    #[error("record length {0} out of bounds")]
    Length(u64),
    #[error("checksum mismatch")]
    Checksum,
    #[error("truncated record")]
    Truncated,
}

/// Frames `payload` as a record of `kind`.
pub fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Reads one framed record of `kind` from `r`. `Ok(None)` at a clean end of input;
/// `Err(Truncated)` when the input ends inside a record (a torn append).
pub fn read_frame(r: &mut impl Read, kind: u16) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut header[got..])?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    if header[..4] != MAGIC {
        return Err(FrameError::Magic);
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let found = u16::from_le_bytes([header[6], header[7]]);
    let len = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len as usize > MAX_RECORD {
        return Err(FrameError::Length(len));
    }
    let mut rest = vec![0u8; len as usize + TRAILER];
    r.read_exact(&mut rest).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&header);
    hasher.update(&rest[..len as usize]);
    if hasher.finalize().as_bytes() != &rest[len as usize..] {
        return Err(FrameError::Checksum);
    }
    if found != kind {
        return Err(FrameError::Kind {
            expected: kind,
            found,
        });
    }
    rest.truncate(len as usize);
    Ok(Some(rest))
}

/// fsyncs a directory, making renames and creations inside it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replaces `path` with `bytes`: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Writes a framed record of `kind` as a whole state file, crash-safely.
pub fn write_state(path: &Path, kind: u16, payload: &[u8]) -> io::Result<()> {
    write_atomic(path, &frame(kind, payload))
}

/// Reads a state file written by [`write_state`]. `Ok(None)` when the file does not exist.
pub fn read_state(path: &Path, kind: u16) -> Result<Option<Vec<u8>>, FrameError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match read_frame(&mut f, kind)? {
        Some(p) => Ok(Some(p)),
        None => Err(FrameError::Truncated),
    }
}

/// Record kinds, one per kind of file, so one can never be read as another.
pub mod kind {
    pub const EPOCH: u16 = 1;
    pub const SNAPSHOT_HEADER: u16 = 2;
    pub const SNAPSHOT_ITEMS: u16 = 3;
    pub const RECORD: u16 = 4;
    pub const PENDING: u16 = 5;
    pub const REVOCATIONS: u16 = 6;
    /// `backup::journal` (numbered apart from the others so that kinds added meanwhile by other
    /// layers do not collide).
    pub const BACKUP_JOURNAL: u16 = 32;
    /// `disk::term`: the newest coordinator term an agent has seen.
    pub const TERM: u16 = 40;
    /// `replication::chunkmap`: the sender's chunk map of one file's content.
    pub const CHUNK_MAP: u16 = 48;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_torn_tail() {
        let mut log = frame(7, b"first");
        log.extend(frame(7, b"second"));
        let good = log.len();
        log.extend(&frame(7, b"third")[..10]);
        let mut r = &log[..];
        assert_eq!(read_frame(&mut r, 7).unwrap().unwrap(), b"first");
        assert_eq!(read_frame(&mut r, 7).unwrap().unwrap(), b"second");
        assert!(matches!(read_frame(&mut r, 7), Err(FrameError::Truncated)));
        let mut r = &log[..good];
        read_frame(&mut r, 7).unwrap();
        read_frame(&mut r, 7).unwrap();
        assert!(read_frame(&mut r, 7).unwrap().is_none());
    }

    #[test]
    fn detects_corruption_and_wrong_kind() {
        let mut f = frame(3, b"payload");
        assert!(matches!(
            read_frame(&mut &f[..], 4),
            Err(FrameError::Kind { .. })
        ));
        f[17] ^= 1;
        assert!(matches!(
            read_frame(&mut &f[..], 3),
            Err(FrameError::Checksum)
        ));
        let mut g = frame(3, b"x");
        g[0] = b'X';
        assert!(matches!(read_frame(&mut &g[..], 3), Err(FrameError::Magic)));
        let mut h = frame(3, b"x");
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &h[..], 3),
            Err(FrameError::Length(_))
        ));
    }

    #[test]
    fn state_file_atomic_replace() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("epoch");
        assert!(read_state(&p, 1).unwrap().is_none());
        write_state(&p, 1, b"one").unwrap();
        write_state(&p, 1, b"two").unwrap();
        assert_eq!(read_state(&p, 1).unwrap().unwrap(), b"two");
        fs::write(&p, b"garbage that is long enough to have a header").unwrap();
        assert!(read_state(&p, 1).is_err());
    }
}
