//! The agent's local control socket (`<state-dir>/agent.sock`): `agent-gpu flush` and `status`.
//!
//! One JSON object per line each way. The socket lives in the state directory (mode 0700), so
//! only its owner can use it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::node::Node;
use crate::agent::versions;
use crate::cli::{Exit, Exiting};
use crate::history::{Selector, Store, VerifyReport};
use crate::replication::continuous::Control;
use crate::replication::send::SenderFigures;

pub const SOCKET: &str = "agent.sock";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Flush {
        timeout_ms: u64,
    },
    Status,
    /// Fault injection for drills and tests: report a fatal GPU fault with the next heartbeat
    /// (as NVML would after an Xid 79), so the coordinator fails the pair over.
    Fault {
        reason: String,
    },
    /// The standby's snapshots (below `path` when not empty).
    Versions {
        path: String,
    },
    /// Files of a snapshot back from the standby: below `path`, into `to` (the workspace when
    /// None), from the snapshot `id` names, else the newest at or before `at_unix_ms`, else the
    /// newest.
    Restore {
        id: String,
        at_unix_ms: i64,
        path: String,
        to: Option<PathBuf>,
    },
    /// A standby's history: read back and check every chunk every kept snapshot needs.
    Verify,
}

/// A fatal fault injected through the control socket, reported like an NVML one.
pub type InjectedFault = Arc<Mutex<Option<String>>>;

/// Why a request failed, for callers that branch on it (the CLI's exit codes, the Python
/// client's exceptions) without reading the words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failure {
    /// Not done within the caller's timeout; the agent keeps trying.
    Timeout,
    /// The agent will not do it (fenced, a bad request, the standby said no).
    Refused,
    /// The agent, or the standby behind it, cannot be reached (stopping, not connected).
    Unavailable,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Failure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// What `versions` and `restore` answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Reply {
    fn done() -> Reply {
        Reply {
            ok: true,
            ..Default::default()
        }
    }

    /// A refusal as an error: its words, and the exit code its kind calls for.
    pub fn into_error(self, what: &str) -> Exiting {
        let exit = match self.kind {
            Some(Failure::Timeout) => Exit::Timeout,
            Some(Failure::Refused) => Exit::Refused,
            Some(Failure::Unavailable) => Exit::Unreachable,
            None => Exit::Failure,
        };
        let error = self.error.unwrap_or_else(|| "unknown error".into());
        Exiting::new(exit, format!("{what} failed: {error}"))
    }

    fn failed(kind: Failure, error: String) -> Reply {
        Reply {
            error: Some(error),
            kind: Some(kind),
            ..Default::default()
        }
    }
}

/// The wait after a failed `accept`, doubled on each failure in a row up to the cap.
const ACCEPT_PAUSE_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(5);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Serves the control socket until `shutdown`.
pub async fn serve(
    state_dir: &Path,
    (node, history): (Node, Option<Arc<Store>>),
    tx: mpsc::Sender<Control>,
    fault: InjectedFault,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let mut pause = ACCEPT_PAUSE_FIRST;
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let conn = match r {
            Ok((conn, _)) => {
                pause = ACCEPT_PAUSE_FIRST;
                conn
            }
            Err(e) => {
                // Out of descriptors, say: the socket waits and goes on serving (it used to end
                // for good, silently), never retrying at once.
                tracing::warn!(error = %e, retry_in = ?pause, "control socket: accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        let tx = tx.clone();
        let parts = (node.clone(), history.clone());
        let fault = fault.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, parts, tx, fault).await {
                tracing::debug!(error = %e, "control connection failed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(
    conn: UnixStream,
    (node, history): (Node, Option<Arc<Store>>),
    tx: mpsc::Sender<Control>,
    fault: InjectedFault,
) -> std::io::Result<()> {
    let figures = node.figures();
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::failed(Failure::Refused, format!("bad request: {e}")),
        Ok(Request::Fault { reason }) => inject(&fault, reason),
        Ok(Request::Status) => Reply {
            status: Some(status_json(&node)),
            ..Reply::done()
        },
        Ok(Request::Flush { timeout_ms }) => flush(&tx, &figures, timeout_ms).await,
        Ok(Request::Versions { path }) => list_versions(&node, &path).await,
        Ok(Request::Restore {
            id,
            at_unix_ms,
            path,
            to,
        }) => restore(&node, versions::selector(id, at_unix_ms), &path, to).await,
        Ok(Request::Verify) => verify(history).await,
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    w.write_all(&out).await
}

/// The agent's figures for `status`: the sender's, with the RPO age (how old the oldest change
/// not yet durable on the standby is, 0: none), the mode, and the replica's durable epoch and
/// generation (a fenced or receiving agent has no sender figures of its own).
fn status_json(node: &Node) -> serde_json::Value {
    let f = node.figures().lock().expect("figures").clone();
    let now = crate::replication::send::unix_ms(std::time::SystemTime::now());
    let rpo_age_ms = f
        .oldest_pending_unix_ms
        .map_or(0, |t| now.saturating_sub(t));
    let replica = node.receiver().figures();
    let mut v = serde_json::to_value(&f).unwrap_or_default();
    v["mode"] = node.mode().name().into();
    v["rpo_age_ms"] = rpo_age_ms.into();
    v["epoch"] = node.durable_epoch().0.into();
    v["generation"] = f.last_durable_generation.max(replica.generation.0).into();
    v
}

fn inject(fault: &InjectedFault, reason: String) -> Reply {
    tracing::warn!(%reason, "fault injected through the control socket");
    *fault.lock().expect("fault") = Some(format!("injected: {reason}"));
    Reply::done()
}

/// Asks the sending loop for a flush barrier and waits for it at most `timeout_ms`; a timeout
/// says what went wrong last.
async fn flush(
    tx: &mpsc::Sender<Control>,
    figures: &Mutex<SenderFigures>,
    timeout_ms: u64,
) -> Reply {
    let (rtx, rrx) = oneshot::channel();
    let _ = tx
        .send(Control::Flush {
            asked: Instant::now(),
            reply: rtx,
        })
        .await;
    match tokio::time::timeout(Duration::from_millis(timeout_ms), rrx).await {
        Ok(Ok(Ok(g))) => Reply {
            generation: Some(g),
            ..Reply::done()
        },
        Ok(Ok(Err(e))) => Reply::failed(Failure::Refused, e),
        Ok(Err(_)) => Reply::failed(Failure::Unavailable, "agent stopped".into()),
        Err(_) => {
            let last_error = figures.lock().expect("figures").last_error.clone();
            Reply::failed(
                Failure::Timeout,
                format!(
                    "not durable after {} ms{}",
                    timeout_ms,
                    last_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ),
            )
        }
    }
}

async fn list_versions(node: &Node, path: &str) -> Reply {
    let channel = match node.standby_channel() {
        Ok(c) => c,
        Err(e) => return Reply::failed(Failure::Unavailable, e),
    };
    match versions::versions(channel, path).await {
        Ok(list) => Reply {
            result: Some(serde_json::Value::Array(
                list.iter().map(versions::summary_json).collect(),
            )),
            ..Reply::done()
        },
        Err(st) => Reply::failed(
            Failure::Refused,
            format!("the standby answered: {}", st.message()),
        ),
    }
}

/// Fetches the files into `to` (the workspace by default), where they replicate like any write.
async fn restore(node: &Node, selector: Selector, path: &str, to: Option<PathBuf>) -> Reply {
    let channel = match node.standby_channel() {
        Ok(c) => c,
        Err(e) => return Reply::failed(Failure::Unavailable, e),
    };
    let to = to.unwrap_or_else(|| node.workspace().to_path_buf());
    match versions::fetch_into(channel, &selector, path, &to).await {
        Ok(f) => Reply {
            result: serde_json::to_value(&f).ok(),
            ..Reply::done()
        },
        Err(e) => Reply::failed(Failure::Refused, crate::text::error_chain(&*e)),
    }
}

/// Verifies the history this agent keeps, beside its recording.
async fn verify(history: Option<Arc<Store>>) -> Reply {
    let Some(store) = history else {
        return Reply::failed(
            Failure::Refused,
            "this agent keeps no history (agent-cpu --history)".into(),
        );
    };
    match tokio::task::spawn_blocking(move || store.verify()).await {
        Ok(Ok(r)) => Reply {
            result: Some(verify_json(&r)),
            ..Reply::done()
        },
        Ok(Err(e)) => Reply::failed(Failure::Refused, e.to_string()),
        Err(e) => Reply::failed(Failure::Refused, e.to_string()),
    }
}

/// A verification as `agent-cpu verify` prints it.
pub fn verify_json(r: &VerifyReport) -> serde_json::Value {
    serde_json::json!({
        "ok": r.is_ok(),
        "snapshots": r.snapshots,
        "chunks": r.chunks,
        "bytes": r.bytes,
        "problems": r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    })
}

/// Sends one request to a running agent and returns its reply; no agent there, or one that
/// hangs up, is [`Exit::Unreachable`].
pub async fn request(state_dir: &Path, req: &Request) -> Result<Reply, Exiting> {
    let path = socket_path(state_dir);
    let gone = |e: std::io::Error| {
        Exiting::new(
            Exit::Unreachable,
            format!(
                "no agent is running with state directory {} ({}: {e})",
                state_dir.display(),
                path.display()
            ),
        )
    };
    let conn = UnixStream::connect(&path).await.map_err(gone)?;
    let (r, mut w) = conn.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| Exiting::new(Exit::Failure, e))?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(gone)?;
    let mut resp = String::new();
    BufReader::new(r).read_line(&mut resp).await.map_err(gone)?;
    serde_json::from_str(&resp)
        .map_err(|e| Exiting::new(Exit::Failure, format!("bad reply from the agent: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_says_its_kind_and_exit_code() {
        let r = Reply::failed(Failure::Timeout, "not durable after 5 ms".into());
        let wire = serde_json::to_value(&r).unwrap();
        assert_eq!(wire["kind"], "timeout");
        assert_eq!(wire["ok"], false);
        let e = r.into_error("flush");
        assert_eq!(e.exit, Exit::Timeout);
        assert_eq!(e.message, "flush failed: not durable after 5 ms");
        for (kind, exit) in [
            (Failure::Refused, Exit::Refused),
            (Failure::Unavailable, Exit::Unreachable),
        ] {
            assert_eq!(Reply::failed(kind, "x".into()).into_error("v").exit, exit);
        }
        // A success carries no kind; a reply from an agent without the field still reads.
        let done = serde_json::to_value(Reply::done()).unwrap();
        assert!(done.get("kind").is_none(), "{done}");
        let old: Reply = serde_json::from_str(r#"{"ok":false,"error":"e"}"#).unwrap();
        assert_eq!(old.into_error("flush").exit, Exit::Failure);
    }
}
