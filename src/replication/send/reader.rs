//! The response reader: one task per session reads the receiver's side of the stream.
//! Signatures (in parts) go to the file waiting for them; commit results and manifest chunks go
//! to the session as events. The first failure is recorded for the session, handed to every
//! file still waiting for a signature, and sent as the last event.

use std::collections::HashMap;

use tokio::sync::mpsc;

use super::SyncError;
use super::session::{Event, Failure, SigWaiters};
use crate::proto::{Signature, SyncResponse, sync_response};

/// The most signature data one file may receive (its memory is held until the last part).
const MAX_SIGNATURE: usize = 256 << 20;

/// Reads responses until the session ends or the session stops listening.
pub(super) async fn read_responses(
    mut inbound: tonic::Streaming<SyncResponse>,
    sigs: SigWaiters,
    events: mpsc::Sender<Result<Event, SyncError>>,
    failure: Failure,
) {
    let mut reader = Reader {
        sigs,
        failure,
        partial: HashMap::new(),
    };
    let end = loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break SyncError::Connection("receiver closed the session".into()),
            Err(s) => break SyncError::from_status(&s),
        };
        let event = match msg.msg {
            Some(sync_response::Msg::Signature(s)) => match reader.signature(s) {
                Ok(()) => continue,
                Err(e) => break e,
            },
            Some(sync_response::Msg::Commit(c)) => Event::Commit(c),
            Some(sync_response::Msg::Manifest(m)) => Event::Manifest(m),
            Some(sync_response::Msg::Hello(_)) | None => {
                break SyncError::Refused("unexpected message from receiver".into());
            }
        };
        if events.send(Ok(event)).await.is_err() {
            return;
        }
    };
    let e = reader.fail(end);
    let _ = events.send(Err(e)).await;
}

struct Reader {
    sigs: SigWaiters,
    failure: Failure,
    /// Signatures still arriving, by file id.
    partial: HashMap<u32, Vec<u8>>,
}

impl Reader {
    /// Takes one part of a signature; the last part goes to the file waiting for it.
    fn signature(&mut self, s: Signature) -> Result<(), SyncError> {
        if s.missing {
            self.deliver(s.file, None);
            return Ok(());
        }
        let buf = self.partial.entry(s.file).or_default();
        if buf.len() + s.data.len() > MAX_SIGNATURE {
            return Err(SyncError::Refused("signature larger than 256 MiB".into()));
        }
        buf.extend_from_slice(&s.data);
        if s.last {
            let data = self.partial.remove(&s.file).unwrap_or_default();
            self.deliver(s.file, Some((data, s.base_size)));
        }
        Ok(())
    }

    fn deliver(&self, file: u32, sig: Option<(Vec<u8>, u64)>) {
        if let Some(w) = self.sigs.lock().expect("sigs").remove(&file) {
            let _ = w.send(Ok(sig));
        }
    }

    /// Records why the session ended (unless something was recorded first) and tells every
    /// file still waiting for a signature.
    fn fail(&self, e: SyncError) -> SyncError {
        self.failure
            .lock()
            .expect("failure")
            .get_or_insert_with(|| e.clone());
        for (_, w) in self.sigs.lock().expect("sigs").drain() {
            let _ = w.send(Err(e.clone()));
        }
        e
    }
}
