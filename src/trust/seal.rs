//! The backup key and the sealed objects it makes (ARCHITECTURE.md, "Off-site backup").
//!
//! The coordinator holds one 32-byte backup key beside its CA key (`backup.key`, mode 0600); the
//! bucket never sees it. Three keys are derived from it with blake3's `derive_key`, one per
//! purpose, so no use of the key can leak another: the AEAD key, the key that names objects, and
//! the fingerprint (16 hex digits, printable, not the key).
//!
//! A sealed object is streamed in segments so that no file is ever held whole in memory:
//!
//! ```text
//! header  = "SBK1" | version u8 = 1 | fingerprint [8] | nonce [12]        (25 bytes)
//! segment = ChaCha20-Poly1305(plaintext ≤ 1 MiB) | tag [16]
//! object  = header | segment* (every segment but the last holds exactly 1 MiB; the last holds
//!           less, possibly nothing)
//! ```
//!
//! Segment `i` is sealed with the nonce `nonce XOR i` (in the last 8 bytes) and the associated
//! data `header | i | last | object name`. So a segment cannot be moved, an object cannot be cut
//! short at a segment boundary (the new last segment was not sealed as last), and an object cannot
//! be stored under another object's name: each shows as a typed error, never a panic.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The backup key's file, beside `ca.key` in the coordinator's directory.
pub const KEY_FILE: &str = "backup.key";
/// Plaintext bytes per segment.
pub const SEGMENT: usize = 1 << 20;
/// Bytes of the object header.
pub const HEADER_LEN: usize = 4 + 1 + FINGERPRINT_LEN + NONCE_LEN;
/// Bytes an AEAD tag adds to each segment.
pub const TAG_LEN: usize = 16;

const MAGIC: [u8; 4] = *b"SBK1";
const VERSION: u8 = 1;
const FINGERPRINT_LEN: usize = 8;
const NONCE_LEN: usize = 12;

const CONTEXT_AEAD: &str = "standby 2026-12-01 backup object encryption";
const CONTEXT_NAMES: &str = "standby 2026-12-01 backup object names";
const CONTEXT_PAIR: &str = "standby 2026-12-01 backup key of one pair";
const CONTEXT_FINGERPRINT: &str = "standby 2026-12-01 backup key fingerprint";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a backup key (expected 32 bytes, found {len}); restore it from the coordinator's backup"
    )]
    BadKeyFile { path: PathBuf, len: usize },
    #[error("a backup key is written as 64 hex digits")]
    BadKeyText,
    #[error("object {object} is not a Standby backup object (bad magic)")]
    NotSealed { object: String },
    #[error(
        "object {object} has format version {found}; this build reads version {VERSION} (upgrade Standby)"
    )]
    Version { object: String, found: u8 },
    #[error("object {object}: this backup was sealed with key {sealed}; the key given is {given}")]
    WrongKey {
        object: String,
        sealed: Fingerprint,
        given: Fingerprint,
    },
    #[error("object {object} is truncated ({detail})")]
    Truncated { object: String, detail: String },
    #[error(
        "object {object} fails authentication at segment {segment}: it was altered, or stored under another name"
    )]
    Tampered { object: String, segment: u64 },
    #[error(
        "object {object}: segment {segment} holds {len} bytes; only the last may hold less than {SEGMENT}"
    )]
    ShortSegment {
        object: String,
        segment: u64,
        len: usize,
    },
}

/// The key's public name: 8 bytes derived from it, shown as 16 hex digits in groups of four.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = crate::text::hex(&self.0);
        let groups: Vec<&str> = (0..4).map(|i| &hex[i * 4..i * 4 + 4]).collect();
        f.write_str(&groups.join("-"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The 32-byte backup key. `Debug` shows only its fingerprint.
#[derive(Clone)]
pub struct BackupKey {
    key: [u8; 32],
}

impl fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackupKey({})", self.fingerprint())
    }
}

impl BackupKey {
    /// A new key from the system's random source.
    pub fn generate() -> BackupKey {
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .expect("the system random source works");
        BackupKey { key }
    }

    pub fn from_bytes(key: [u8; 32]) -> BackupKey {
        BackupKey { key }
    }

    /// Parses 64 hex digits (surrounding white space allowed), as `to_hex` writes them.
    pub fn from_hex(text: &str) -> Result<BackupKey, SealError> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return Err(SealError::BadKeyText);
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16)
                .map_err(|_| SealError::BadKeyText)?;
        }
        Ok(BackupKey { key })
    }

    /// The key as 64 hex digits, for the control channel or an operator's safe.
    pub fn to_hex(&self) -> String {
        crate::text::hex(&self.key)
    }

    /// Reads a key file (32 raw bytes).
    pub fn load(path: &Path) -> Result<BackupKey, SealError> {
        let bytes = std::fs::read(path).map_err(|source| SealError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SealError::BadKeyFile {
                path: path.to_path_buf(),
                len: bytes.len(),
            })?;
        Ok(BackupKey { key })
    }

    /// The key of the coordinator directory `dir`, made (mode 0600, written crash-safely) when
    /// the directory has none yet: `coordinator init` calls this, and so does `serve` at start,
    /// so a directory made before backups existed gets its key.
    pub fn load_or_create(dir: &Path) -> Result<BackupKey, SealError> {
        let path = dir.join(KEY_FILE);
        if path.exists() {
            return BackupKey::load(&path);
        }
        let key = BackupKey::generate();
        crate::trust::pki::write_private(&path, &key.key).map_err(|e| SealError::Io {
            path: path.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(key)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        let d = blake3::derive_key(CONTEXT_FINGERPRINT, &self.key);
        Fingerprint(d[..FINGERPRINT_LEN].try_into().expect("8 bytes"))
    }

    /// The key of one pair's backup, derived from the coordinator's: what the coordinator hands
    /// a pair's standby, so a standby can read and write its own pair's objects only (another
    /// pair's names and seals are under another key). `restore-backup --pair` derives it again.
    pub fn for_pair(&self, pair: &str) -> BackupKey {
        let mut material = self.key.to_vec();
        material.extend_from_slice(pair.as_bytes());
        BackupKey {
            key: blake3::derive_key(CONTEXT_PAIR, &material),
        }
    }

    /// The name an object gets in the bucket for the local name `local`: a keyed hash, so the
    /// bucket learns neither file names nor content hashes, and equal names always meet again.
    pub fn object_name(&self, local: &str) -> String {
        let k = blake3::derive_key(CONTEXT_NAMES, &self.key);
        blake3::keyed_hash(&k, local.as_bytes())
            .to_hex()
            .to_string()
    }

    fn aead_key(&self) -> LessSafeKey {
        let k = blake3::derive_key(CONTEXT_AEAD, &self.key);
        LessSafeKey::new(UnboundKey::new(&aead::CHACHA20_POLY1305, &k).expect("32-byte key"))
    }

    /// Starts sealing the object named `object` (its full name in the bucket).
    pub fn sealer(&self, object: &str) -> Sealer {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&MAGIC);
        header[4] = VERSION;
        header[5..5 + FINGERPRINT_LEN].copy_from_slice(&self.fingerprint().0);
        header[5 + FINGERPRINT_LEN..].copy_from_slice(&nonce);
        Sealer {
            cipher: Cipher {
                key: self.aead_key(),
                header,
                nonce,
                object: object.to_string(),
            },
            next: 0,
        }
    }

    /// Checks an object's header (magic, version, key) and starts opening it.
    pub fn opener(&self, object: &str, header: &[u8]) -> Result<Opener, SealError> {
        if header.len() < HEADER_LEN {
            return Err(SealError::Truncated {
                object: object.into(),
                detail: format!("{} bytes, shorter than the header", header.len()),
            });
        }
        if header[..4] != MAGIC {
            return Err(SealError::NotSealed {
                object: object.into(),
            });
        }
        if header[4] != VERSION {
            return Err(SealError::Version {
                object: object.into(),
                found: header[4],
            });
        }
        let sealed = Fingerprint(header[5..5 + FINGERPRINT_LEN].try_into().expect("8 bytes"));
        if sealed != self.fingerprint() {
            return Err(SealError::WrongKey {
                object: object.into(),
                sealed,
                given: self.fingerprint(),
            });
        }
        Ok(Opener {
            cipher: Cipher {
                key: self.aead_key(),
                header: header[..HEADER_LEN].try_into().expect("header"),
                nonce: header[5 + FINGERPRINT_LEN..HEADER_LEN]
                    .try_into()
                    .expect("nonce"),
                object: object.to_string(),
            },
            next: 0,
            buf: Vec::new(),
        })
    }

    /// Seals `plain` whole (small objects, tests).
    pub fn seal(&self, object: &str, plain: &[u8]) -> Vec<u8> {
        let mut s = self.sealer(object);
        let mut out = s.header().to_vec();
        let mut rest = plain;
        loop {
            let n = rest.len().min(SEGMENT);
            let last = rest.len() < SEGMENT;
            out.extend(s.seal_segment(&rest[..n], last).expect("whole segments"));
            rest = &rest[n..];
            if last {
                return out;
            }
        }
    }

    /// Opens a whole sealed object.
    pub fn open(&self, object: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut o = self.opener(object, sealed)?;
        let mut out = Vec::new();
        o.feed(&sealed[HEADER_LEN..], &mut |p| {
            out.extend_from_slice(p);
            Ok(())
        })?;
        o.finish(&mut |p| {
            out.extend_from_slice(p);
            Ok(())
        })?;
        Ok(out)
    }
}

/// The sealed length of `plain_len` plaintext bytes: the header and one tag per segment (a
/// plaintext that fills its last segment gets one more, empty, last segment).
pub fn sealed_len(plain_len: u64) -> u64 {
    let segments = plain_len / SEGMENT as u64 + 1;
    HEADER_LEN as u64 + plain_len + segments * TAG_LEN as u64
}

struct Cipher {
    key: LessSafeKey,
    header: [u8; HEADER_LEN],
    nonce: [u8; NONCE_LEN],
    object: String,
}

impl Cipher {
    fn nonce(&self, segment: u64) -> Nonce {
        let mut n = self.nonce;
        for (b, c) in n[4..].iter_mut().zip(segment.to_be_bytes()) {
            *b ^= c;
        }
        Nonce::assume_unique_for_key(n)
    }

    fn aad(&self, segment: u64, last: bool) -> Vec<u8> {
        let mut a = Vec::with_capacity(HEADER_LEN + 9 + self.object.len());
        a.extend_from_slice(&self.header);
        a.extend_from_slice(&segment.to_be_bytes());
        a.push(u8::from(last));
        a.extend_from_slice(self.object.as_bytes());
        a
    }
}

/// Seals one object segment by segment.
pub struct Sealer {
    cipher: Cipher,
    next: u64,
}

impl Sealer {
    /// The object's first bytes.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        self.cipher.header
    }

    /// Seals the next segment: exactly [`SEGMENT`] bytes, or fewer when `last`.
    pub fn seal_segment(&mut self, plain: &[u8], last: bool) -> Result<Vec<u8>, SealError> {
        if plain.len() > SEGMENT
            || (!last && plain.len() != SEGMENT)
            || last && plain.len() == SEGMENT
        {
            return Err(SealError::ShortSegment {
                object: self.cipher.object.clone(),
                segment: self.next,
                len: plain.len(),
            });
        }
        let mut out = plain.to_vec();
        let c = &self.cipher;
        c.key
            .seal_in_place_append_tag(
                c.nonce(self.next),
                Aad::from(c.aad(self.next, last)),
                &mut out,
            )
            .expect("a segment is far below ChaCha20's limit");
        self.next += 1;
        Ok(out)
    }
}

/// Opens one object from its bytes as they arrive, in pieces of any size.
pub struct Opener {
    cipher: Cipher,
    next: u64,
    buf: Vec<u8>,
}

/// Bytes of a sealed segment that is not the last.
pub const SEALED_SEGMENT: usize = SEGMENT + TAG_LEN;

impl Opener {
    /// Takes the next bytes after the header; hands each opened segment but the last to `out`.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), SealError> {
        while !bytes.is_empty() {
            let room = SEALED_SEGMENT + 1 - self.buf.len().min(SEALED_SEGMENT + 1);
            let n = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            // More than a whole segment is buffered: the first one is not the last.
            if self.buf.len() > SEALED_SEGMENT {
                let rest = self.buf.split_off(SEALED_SEGMENT);
                let seg = std::mem::replace(&mut self.buf, rest);
                let plain = self.open_segment(seg, false)?;
                out(&plain).map_err(|e| self.io(e))?;
            }
        }
        Ok(())
    }

    /// The end of the object: opens the last segment and hands it to `out`.
    pub fn finish(mut self, out: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Result<(), SealError> {
        let seg = std::mem::take(&mut self.buf);
        if seg.len() < TAG_LEN {
            return Err(SealError::Truncated {
                object: self.cipher.object.clone(),
                detail: format!(
                    "segment {} has {} bytes, less than a tag",
                    self.next,
                    seg.len()
                ),
            });
        }
        // A whole segment at the end was either sealed as the last one or the object was cut
        // at a segment boundary: tell the two apart.
        if seg.len() == SEALED_SEGMENT {
            let segment = self.next;
            return match self.open_segment(seg.clone(), false) {
                Ok(_) => Err(SealError::Truncated {
                    object: self.cipher.object.clone(),
                    detail: format!("it ends after segment {segment}, which is not the last"),
                }),
                Err(e) => Err(e),
            };
        }
        let plain = self.open_segment(seg, true)?;
        out(&plain).map_err(|e| self.io(e))
    }

    /// Opens the next segment, given whole, when the caller knows where segments end (the
    /// first segment of an object fetched by range).
    pub fn open_segment(&mut self, mut seg: Vec<u8>, last: bool) -> Result<Vec<u8>, SealError> {
        let c = &self.cipher;
        let n = c
            .key
            .open_in_place(
                c.nonce(self.next),
                Aad::from(c.aad(self.next, last)),
                &mut seg,
            )
            .map_err(|_| SealError::Tampered {
                object: c.object.clone(),
                segment: self.next,
            })?
            .len();
        seg.truncate(n);
        self.next += 1;
        Ok(seg)
    }

    fn io(&self, source: io::Error) -> SealError {
        SealError::Io {
            path: PathBuf::from(&self.cipher.object),
            source,
        }
    }
}

#[cfg(test)]
mod tests;
