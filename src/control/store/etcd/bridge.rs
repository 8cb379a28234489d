//! A tokio runtime on a thread of its own, for the etcd client.
//!
//! The [`Store`](super::super::Store) trait is synchronous and the engine calls it from inside
//! its task. Blocking that task on a future of its own runtime would panic (`block_on` inside a
//! runtime) or deadlock (a current-thread runtime waiting on itself), so the client lives on
//! this thread's runtime: a synchronous call hands the future over and waits for its answer
//! (with `block_in_place` when the caller is a multi-threaded runtime's worker, so the worker's
//! other tasks move on meanwhile), and background tasks (the lease's keep-alive) are spawned
//! there. The thread ends,
//! and drops its runtime there, when the bridge is dropped.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;

pub(crate) struct Bridge {
    handle: Handle,
    /// Dropped with the bridge: the thread's `block_on` returns and the runtime goes with it.
    _stop: oneshot::Sender<()>,
}

/// The runtime thread went away (it only does when the bridge is dropped) or a call ran past
/// its limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lost {
    Timeout,
    Gone,
}

impl Bridge {
    pub(crate) fn start() -> std::io::Result<Bridge> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("etcd-client".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    let _ = stopped.await;
                });
            })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| std::io::Error::other("the etcd client's runtime thread died"))??;
        Ok(Bridge {
            handle,
            _stop: stop,
        })
    }

    /// Runs `fut` on the bridge's runtime and waits for it, at most `limit`.
    pub(crate) fn block<T, F>(&self, limit: Duration, fut: F) -> Result<T, Lost>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(tokio::time::timeout(limit, fut).await);
        });
        // The runtime's own timer answers first; this one only guards against a stalled thread.
        let wait = || rx.recv_timeout(limit + Duration::from_secs(1));
        let got = match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        };
        match got {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Lost::Timeout),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Lost::Gone),
        }
    }

    /// Spawns a task on the bridge's runtime (the lease's keep-alive).
    pub(crate) fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Called from a current-thread runtime (as `#[tokio::test]` runs), from a multi-threaded
    /// one (as the coordinator runs) and from a plain thread: the answer comes back, a slow
    /// future times out, and dropping the bridge inside a runtime does not panic.
    #[test]
    fn calls_from_any_context_come_back() {
        let b = Bridge::start().unwrap();
        assert_eq!(b.block(Duration::from_secs(5), async { 7 }), Ok(7));
        let slow = b.block(Duration::from_millis(50), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert_eq!(slow, Err(Lost::Timeout));
        for rt in [
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        ] {
            let b = Bridge::start().unwrap();
            rt.block_on(async move {
                assert_eq!(b.block(Duration::from_secs(5), async { 1 }), Ok(1));
                drop(b);
            });
        }
    }
}
