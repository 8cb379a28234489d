//! The durable journal of what this machine has put in the bucket (ARCHITECTURE.md, "Off-site
//! backup"). This file is the only writer of `backup.journal`.
//!
//! An append-only log of framed records (`disk::crashsafe`: magic, version, length, blake3):
//! `Uploaded` once an object is complete in the bucket, `Deleted` once it is gone. A torn last
//! record (a crash mid-append) is cut off at open; the object it described is then found again
//! by the bucket listing and adopted. The log is rewritten crash-safely when dead records
//! outnumber live ones.
//!
//! The journal is what makes deletions safe: the mirror deletes only objects recorded here
//! whose local file is gone, never an object it merely finds in the bucket (a fresh machine
//! with an empty store must not wipe the backup it may be restored from).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::crashsafe::{self, FrameError};

/// An object of the bucket, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// The local name (`packs/….pack`, `snapshots/….snap`).
    pub local: String,
    /// Its name in the bucket (the keyed hash).
    pub object: String,
    /// Its sealed size.
    pub sealed: u64,
    /// The local file's mtime, which is the snapshot's time for a snapshot.
    pub mtime_ns: i64,
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Uploaded(Uploaded),
    Deleted { local: String },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("backup journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "backup journal {path} is damaged ({detail}); move it aside: the next pass lists the bucket and adopts what is there (objects of files deleted meanwhile then stay in the bucket)"
    )]
    Damaged { path: PathBuf, detail: String },
}

/// The journal, open for appending.
pub struct Journal {
    path: PathBuf,
    file: File,
    live: BTreeMap<String, Uploaded>,
    records: usize,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, cutting off a torn last record.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let io_err = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err)?;
        let (live, records, good) = Self::replay(path, &mut file)?;
        if good < file.metadata().map_err(io_err)?.len() {
            file.set_len(good).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io_err)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            live,
            records,
        })
    }

    /// What the journal at `path` records, read without changing it (a torn tail is ignored,
    /// not cut off), for reports and tests while a mirror may be appending.
    pub fn read(path: &Path) -> Result<BTreeMap<String, Uploaded>, JournalError> {
        let mut file = File::open(path).map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::replay(path, &mut file)?.0)
    }

    /// Reads every record; returns what is live, how many records there were and the length
    /// of the good prefix.
    fn replay(
        path: &Path,
        file: &mut File,
    ) -> Result<(BTreeMap<String, Uploaded>, usize, u64), JournalError> {
        let damaged = |detail: String| JournalError::Damaged {
            path: path.to_path_buf(),
            detail,
        };
        let mut r = io::BufReader::new(&*file);
        let (mut live, mut records, mut good) = (BTreeMap::new(), 0, 0u64);
        loop {
            match crashsafe::read_frame(&mut r, crashsafe::kind::BACKUP_JOURNAL) {
                Ok(Some(payload)) => {
                    let rec: Record = serde_json::from_slice(&payload)
                        .map_err(|e| damaged(format!("record {records}: {e}")))?;
                    good +=
                        (crashsafe::frame(crashsafe::kind::BACKUP_JOURNAL, &payload)).len() as u64;
                    records += 1;
                    match rec {
                        Record::Uploaded(u) => {
                            live.insert(u.local.clone(), u);
                        }
                        Record::Deleted { local } => {
                            live.remove(&local);
                        }
                    }
                }
                Ok(None) | Err(FrameError::Truncated) => return Ok((live, records, good)),
                Err(e) => return Err(damaged(format!("record {records}: {e}"))),
            }
        }
    }

    /// What the bucket holds by this journal, by local name.
    pub fn live(&self) -> &BTreeMap<String, Uploaded> {
        &self.live
    }

    /// Records a complete upload, durably, before the caller counts it as done.
    pub fn uploaded(&mut self, u: Uploaded) -> Result<(), JournalError> {
        self.append(&Record::Uploaded(u.clone()))?;
        self.live.insert(u.local.clone(), u);
        Ok(())
    }

    /// Records that the object of `local` is gone from the bucket.
    pub fn deleted(&mut self, local: &str) -> Result<(), JournalError> {
        if !self.live.contains_key(local) {
            return Ok(());
        }
        self.append(&Record::Deleted {
            local: local.into(),
        })?;
        self.live.remove(local);
        self.compact_if_sparse()
    }

    fn append(&mut self, rec: &Record) -> Result<(), JournalError> {
        let payload = serde_json::to_vec(rec).expect("records serialize");
        let framed = crashsafe::frame(crashsafe::kind::BACKUP_JOURNAL, &payload);
        self.file
            .write_all(&framed)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.records += 1;
        Ok(())
    }

    /// Rewrites the log with live records only once it is mostly dead ones.
    fn compact_if_sparse(&mut self) -> Result<(), JournalError> {
        if self.records < 1024 || self.records < 2 * self.live.len() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for u in self.live.values() {
            let payload = serde_json::to_vec(&Record::Uploaded(u.clone())).expect("serialize");
            bytes.extend(crashsafe::frame(crashsafe::kind::BACKUP_JOURNAL, &payload));
        }
        crashsafe::write_atomic(&self.path, &bytes).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })?;
        *self = Journal::open(&self.path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(i: usize) -> Uploaded {
        Uploaded {
            local: format!("snapshots/{i:016x}.snap"),
            object: format!("{i:064x}"),
            sealed: i as u64,
            mtime_ns: i as i64,
        }
    }

    #[test]
    fn survives_reopen_and_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("backup.journal");
        let mut j = Journal::open(&p).unwrap();
        j.uploaded(up(1)).unwrap();
        j.uploaded(up(2)).unwrap();
        j.deleted(&up(1).local).unwrap();
        drop(j);
        // A crash in the middle of appending a third record.
        let good = std::fs::metadata(&p).unwrap().len();
        let torn = crashsafe::frame(crashsafe::kind::BACKUP_JOURNAL, b"{\"Uploaded\":");
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);
        let mut j = Journal::open(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), good);
        assert_eq!(j.live().keys().collect::<Vec<_>>(), [&up(2).local]);
        j.uploaded(up(3)).unwrap();
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.live().len(), 2);
    }

    #[test]
    fn damage_in_the_middle_is_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("backup.journal");
        let mut j = Journal::open(&p).unwrap();
        j.uploaded(up(1)).unwrap();
        j.uploaded(up(2)).unwrap();
        drop(j);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = Journal::open(&p).err().unwrap();
        assert!(matches!(e, JournalError::Damaged { .. }), "{e}");
        assert!(e.to_string().contains("move it aside"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }

    #[test]
    fn compaction_keeps_exactly_the_live_records() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("backup.journal");
        let mut j = Journal::open(&p).unwrap();
        for i in 0..1500 {
            j.uploaded(up(i)).unwrap();
        }
        for i in 0..1400 {
            j.deleted(&up(i).local).unwrap();
        }
        assert!(j.records < 1500, "compacted: {} records", j.records);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.live().len(), 100);
        assert_eq!(j.live().values().next().unwrap(), &up(1400));
    }
}
