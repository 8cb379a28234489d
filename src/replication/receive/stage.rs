//! Where a streamed file's new content goes before it is committed.
//!
//! Three sinks:
//! - [`Direct`]: the whole new content, written to a staged file with `O_DIRECT` where the
//!   filesystem allows it. Buffered write-back of hundreds of MiB is several times slower than
//!   direct I/O on the machines we run on (measured here: ~210 MB/s against ~1 GB/s), and every
//!   staged byte must be durable before the generation is acknowledged anyway.
//! - [`Patch`]: only the 4 KiB blocks that differ from the replica's current file at the same
//!   offset, with their extents. At commit the journal record carries the extents and the
//!   replica file is updated in place (idempotently, see `apply`), so a small edit of a huge
//!   checkpoint costs about its size on disk too, not the file's. When too much differs, the
//!   patch turns itself into a `Direct` copy. A copy of the base at its own offset (a chunk
//!   the sender found unchanged) costs nothing: no comparison, no write.
//! - [`Rebuild`]: a full staged copy built from literal bytes and copies of the base at other
//!   offsets (data that moved, after an insertion), the copies made by the kernel
//!   (`fsx::copy_range`, `copy_file_range`). A patch turns into one at the first moved copy.
//!   On ext4 the kernel still writes every copied byte: ext4 shares no extents. Where
//!   extents can be shared (XFS with reflink, btrfs), only whole blocks at the same offset within
//!   the block can be, so data moved by an insertion that is not a multiple of the block size
//!   is written anew everywhere after it, on any filesystem.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;

use memmap2::Mmap;

use crate::disk::fsx;
use crate::proto::state::Extent;

/// Block size of the patch comparison and alignment of direct I/O.
pub const BLOCK: u64 = 4096;
const DIRECT_BUF: usize = 4 << 20;
/// A patch becomes a full copy once it holds this much and more than half of what was seen.
const PATCH_MAX_MIN: u64 = 4 << 20;

/// The replica's committed copy of a file, mapped read-only.
pub struct Base {
    map: Option<Mmap>,
    _file: File,
}

impl Base {
    pub fn new(file: File) -> io::Result<Base> {
        let len = file.metadata()?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the replica is written only by this process, never while mapped.
            Some(unsafe { Mmap::map(&file)? })
        };
        Ok(Base { map, _file: file })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn file(&self) -> &File {
        &self._file
    }
}

/// A heap buffer whose start is aligned for direct I/O.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(cap: usize) -> Aligned {
        let raw = vec![0u8; cap + BLOCK as usize];
        let off = raw.as_ptr().align_offset(BLOCK as usize);
        Aligned { raw, off, len: 0 }
    }
    fn cap(&self) -> usize {
        self.raw.len() - BLOCK as usize
    }
    fn filled(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
    fn spare(&mut self) -> &mut [u8] {
        let cap = self.cap();
        &mut self.raw[self.off + self.len..self.off + cap]
    }
}

/// A staged file written sequentially, with `O_DIRECT` when possible.
pub struct Direct {
    file: File,
    direct: bool,
    buf: Aligned,
    flushed: u64,
}

impl Direct {
    pub fn create(stage: BorrowedFd<'_>, name: &[u8]) -> io::Result<Direct> {
        let c = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd =
            unsafe { libc::openat(stage.as_raw_fd(), c.as_ptr(), flags | libc::O_DIRECT, 0o600) };
        let (fd, direct) = if fd >= 0 {
            (fd, true)
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            // No direct I/O here (tmpfs, some network filesystems): buffered.
            let fd = unsafe { libc::openat(stage.as_raw_fd(), c.as_ptr(), flags, 0o600) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            (fd, false)
        };
        Ok(Direct {
            file: unsafe { File::from_raw_fd(fd) },
            direct,
            buf: Aligned::new(DIRECT_BUF),
            flushed: 0,
        })
    }

    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let spare = self.buf.spare();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.buf.len += n;
            data = &data[n..];
            if self.buf.len == self.buf.cap() {
                self.flush_full()?;
            }
        }
        Ok(())
    }

    fn flush_full(&mut self) -> io::Result<()> {
        let n = self.buf.len;
        self.write_at(n)?;
        self.buf.len = 0;
        Ok(())
    }

    fn write_at(&mut self, n: usize) -> io::Result<()> {
        let r = self
            .file
            .write_all_at(&self.buf.filled()[..n], self.flushed);
        match r {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // The device refused this alignment after all: carry on buffered.
                self.direct = false;
                let fl = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETFL) };
                unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_DIRECT) };
                self.file
                    .write_all_at(&self.buf.filled()[..n], self.flushed)?;
            }
            r => r?,
        }
        self.flushed += n as u64;
        Ok(())
    }

    /// Writes what is buffered and cuts the file to `size` bytes. Returns the file.
    pub fn finish(mut self, size: u64) -> io::Result<File> {
        let n = self.buf.len;
        if n > 0 {
            // Direct I/O writes whole blocks: pad, then cut back to the true length.
            let padded = if self.direct {
                (n as u64).div_ceil(BLOCK) as usize * BLOCK as usize
            } else {
                n
            };
            let off = self.buf.off;
            self.buf.raw[off + n..off + padded].fill(0);
            self.buf.len = padded;
            self.write_at(padded)?;
        }
        self.file.set_len(size)?;
        Ok(self.file)
    }
}

/// The blocks of a new version that differ from the base at the same offset.
pub struct Patch {
    out: BufWriter<File>,
    pub extents: Vec<Extent>,
    pub bytes: u64,
}

impl Patch {
    pub fn create(stage: BorrowedFd<'_>, name: &[u8]) -> io::Result<Patch> {
        Ok(Patch {
            out: BufWriter::with_capacity(1 << 20, fsx::create_excl(stage, name)?),
            extents: Vec::new(),
            bytes: 0,
        })
    }

    /// Records the parts of `data` (the new bytes at `pos`) that differ from `base`.
    pub fn add(&mut self, base: &[u8], pos: u64, data: &[u8]) -> io::Result<()> {
        let end = pos + data.len() as u64;
        let mut off = pos;
        while off < end {
            let blk_end = ((off / BLOCK + 1) * BLOCK).min(end);
            let new = &data[(off - pos) as usize..(blk_end - pos) as usize];
            let same =
                blk_end as usize <= base.len() && &base[off as usize..blk_end as usize] == new;
            if !same {
                self.out.write_all(new)?;
                let n = new.len() as u64;
                match self.extents.last_mut() {
                    Some(e) if e.offset + e.len == off && e.at + e.len == self.bytes => e.len += n,
                    _ => self.extents.push(Extent {
                        offset: off,
                        len: n,
                        at: self.bytes,
                    }),
                }
                self.bytes += n;
            }
            off = blk_end;
        }
        Ok(())
    }

    /// Whether a full copy is now cheaper than patching in place.
    pub fn too_big(&self, seen: u64) -> bool {
        self.bytes > PATCH_MAX_MIN && self.bytes * 2 > seen
    }

    pub fn finish(self) -> io::Result<File> {
        self.out.into_inner().map_err(|e| e.into_error())
    }

    /// Rebuilds the first `upto` bytes of the new version as a full staged copy.
    pub fn into_direct(self, base: &[u8], upto: u64, mut to: Direct) -> io::Result<Direct> {
        let extents = self.extents.clone();
        let patch = self.finish()?;
        let mut prev = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for e in &extents {
            if e.offset > prev {
                to.write(&base[prev as usize..e.offset as usize])?;
            }
            let mut done = 0;
            while done < e.len {
                let n = ((e.len - done) as usize).min(buf.len());
                patch.read_exact_at(&mut buf[..n], e.at + done)?;
                to.write(&buf[..n])?;
                done += n as u64;
            }
            prev = e.offset + e.len;
        }
        if upto > prev {
            to.write(&base[prev as usize..upto as usize])?;
        }
        Ok(to)
    }
}

/// A full staged copy written at offsets: literal bytes, and copies of the base made by the
/// kernel. Buffered (a copy cannot go through `O_DIRECT`); write-back is started as it goes so
/// that the sync before the commit has little left to do.
pub struct Rebuild {
    file: File,
    /// Bytes before this offset have had their write-back started.
    hinted: u64,
    end: u64,
}

/// Write-back is started every this many bytes.
const WRITEBACK_STEP: u64 = 16 << 20;

impl Rebuild {
    pub fn create(stage: BorrowedFd<'_>, name: &[u8]) -> io::Result<Rebuild> {
        Ok(Rebuild {
            file: fsx::create_excl(stage, name)?,
            hinted: 0,
            end: 0,
        })
    }

    pub fn write(&mut self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, pos)?;
        self.wrote(pos + data.len() as u64);
        Ok(())
    }

    /// Copies `len` bytes at `from` of `base` to `pos`.
    pub fn copy(&mut self, base: &File, from: u64, pos: u64, len: u64) -> io::Result<()> {
        fsx::copy_range(base, from, &self.file, pos, len)?;
        self.wrote(pos + len);
        Ok(())
    }

    fn wrote(&mut self, end: u64) {
        self.end = self.end.max(end);
        if self.end - self.hinted >= WRITEBACK_STEP {
            fsx::start_writeback(&self.file, self.hinted, self.end - self.hinted);
            self.hinted = self.end;
        }
    }

    /// Cuts the file to `size` bytes. Returns the file.
    pub fn finish(self, size: u64) -> io::Result<File> {
        self.file.set_len(size)?;
        Ok(self.file)
    }
}

impl Patch {
    /// Rebuilds the first `upto` bytes of the new version as a full staged copy: the base
    /// (copied by the kernel) with the patch's extents over it.
    pub fn into_rebuild(self, base: &Base, upto: u64, mut to: Rebuild) -> io::Result<Rebuild> {
        let extents = self.extents.clone();
        let patch = self.finish()?;
        let same = |to: &mut Rebuild, from: u64, end: u64| {
            let end = end.min(base.bytes().len() as u64);
            if end > from {
                to.copy(base.file(), from, from, end - from)?;
            }
            Ok::<(), io::Error>(())
        };
        let mut prev = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for e in &extents {
            same(&mut to, prev, e.offset)?;
            let mut done = 0;
            while done < e.len {
                let n = ((e.len - done) as usize).min(buf.len());
                patch.read_exact_at(&mut buf[..n], e.at + done)?;
                to.write(e.offset + done, &buf[..n])?;
                done += n as u64;
            }
            prev = e.offset + e.len;
        }
        same(&mut to, prev, upto)?;
        Ok(to)
    }
}

/// Writes a patch's extents into `target` and sets its length (idempotent).
pub fn apply_patch(patch: &File, target: &File, extents: &[Extent], size: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for e in extents {
        let mut done = 0;
        while done < e.len {
            let n = ((e.len - done) as usize).min(buf.len());
            patch.read_exact_at(&mut buf[..n], e.at + done)?;
            target.write_all_at(&buf[..n], e.offset + done)?;
            done += n as u64;
        }
    }
    target.set_len(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn stage() -> (tempfile::TempDir, std::os::fd::OwnedFd) {
        let d = tempfile::tempdir().unwrap();
        let fd = fsx::open_dir_path(d.path()).unwrap();
        (d, fd)
    }

    #[test]
    fn direct_writes_exact_bytes_with_odd_sizes() {
        let (d, fd) = stage();
        let mut w = Direct::create(fd.as_fd(), b"x").unwrap();
        let data: Vec<u8> = (0..(9 << 20) + 1234).map(|i| (i * 7 % 251) as u8).collect();
        for piece in data.chunks(1_000_003) {
            w.write(piece).unwrap();
        }
        w.finish(data.len() as u64).unwrap();
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), data);
    }

    #[test]
    fn patch_records_only_changes_and_applies_in_place() {
        let (d, fd) = stage();
        let base: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut new = base.clone();
        new[5000] ^= 1;
        new[70_000..70_100].fill(9);
        new.extend_from_slice(b"appended tail");
        let mut p = Patch::create(fd.as_fd(), b"p").unwrap();
        for (i, c) in new.chunks(30_000).enumerate() {
            p.add(&base, (i * 30_000) as u64, c).unwrap();
        }
        assert!(
            p.bytes <= 4 * BLOCK,
            "{} bytes for three small changes",
            p.bytes
        );
        let extents = p.extents.clone();
        let pf = p.finish().unwrap();
        let target = d.path().join("t");
        std::fs::write(&target, &base).unwrap();
        let tf = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        apply_patch(&pf, &tf, &extents, new.len() as u64).unwrap();
        apply_patch(&pf, &tf, &extents, new.len() as u64).unwrap(); // idempotent
        assert_eq!(std::fs::read(&target).unwrap(), new);
        // Shrinking works too.
        let short = &base[..50_000];
        let mut p = Patch::create(fd.as_fd(), b"q").unwrap();
        p.add(&base, 0, short).unwrap();
        assert!(p.extents.is_empty());
        let pf = p.finish().unwrap();
        apply_patch(&pf, &tf, &[], short.len() as u64).unwrap();
        std::fs::write(&target, &base).unwrap();
        let tf = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        apply_patch(&pf, &tf, &[], short.len() as u64).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), short);
    }

    #[test]
    fn a_patch_rebuilds_with_moved_copies() {
        let (d, fd) = stage();
        let base: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let bf = d.path().join("base");
        std::fs::write(&bf, &base).unwrap();
        let b = Base::new(File::open(&bf).unwrap()).unwrap();
        // New: base[..1000] with a changed byte, 100 inserted bytes, then base[1000..] shifted.
        let mut new = base[..1000].to_vec();
        new[10] ^= 1;
        new.extend_from_slice(&[7u8; 100]);
        new.extend_from_slice(&base[1000..]);
        let mut p = Patch::create(fd.as_fd(), b"p").unwrap();
        p.add(b.bytes(), 0, &new[..1100]).unwrap();
        let r = Rebuild::create(fd.as_fd(), b"full").unwrap();
        let mut r = p.into_rebuild(&b, 1100, r).unwrap();
        r.copy(b.file(), 1000, 1100, 299_000).unwrap();
        r.finish(new.len() as u64).unwrap();
        assert_eq!(std::fs::read(d.path().join("full")).unwrap(), new);
    }

    #[test]
    fn patch_converts_to_a_full_copy() {
        let (d, fd) = stage();
        let base: Vec<u8> = vec![1u8; 10 << 20];
        let new: Vec<u8> = (0..(10u32 << 20)).map(|i| (i % 7) as u8).collect();
        let mut p = Patch::create(fd.as_fd(), b"p").unwrap();
        let mut pos = 0u64;
        let mut direct = None;
        for c in new.chunks(2 << 20) {
            match &mut direct {
                Some(w) => Direct::write(w, c).unwrap(),
                None => {
                    p.add(&base, pos, c).unwrap();
                    if p.too_big(pos + c.len() as u64) {
                        let w = Direct::create(fd.as_fd(), b"full").unwrap();
                        let taken = std::mem::replace(
                            &mut p,
                            Patch::create(fd.as_fd(), b"unused").unwrap(),
                        );
                        direct = Some(taken.into_direct(&base, pos + c.len() as u64, w).unwrap());
                    }
                }
            }
            pos += c.len() as u64;
        }
        direct.expect("converted").finish(new.len() as u64).unwrap();
        assert_eq!(std::fs::read(d.path().join("full")).unwrap(), new);
    }
}
