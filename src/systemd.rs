//! Telling systemd (a `Type=notify` unit) when a program is ready and when it stops: one datagram
//! to the unix socket named by `$NOTIFY_SOCKET` (the `sd_notify` protocol). Without the variable
//! (not started by systemd, or a unit of another type) every call does nothing.
//!
//! Written directly on std rather than with libsystemd or the `sd-notify` crate: the protocol is
//! one `sendto` of `KEY=VALUE` lines, and the only subtlety, an abstract socket name (`@...`), is
//! std's `SocketAddrExt::from_abstract_name`. The variable is left in the environment, so hooks
//! and provider programs this process starts inherit it; the units say `NotifyAccess=main`, so
//! systemd ignores anything they might send (ARCHITECTURE.md, "Running under systemd").

use std::os::unix::net::{SocketAddr, UnixDatagram};

use tokio_util::sync::CancellationToken;

/// What a program tells systemd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Start-up is complete: the program serves (its listeners are bound).
    Ready,
    /// The program began to shut down.
    Stopping,
}

impl Notice {
    /// The datagram's text.
    fn text(self) -> &'static str {
        match self {
            Notice::Ready => "READY=1\n",
            Notice::Stopping => "STOPPING=1\n",
        }
    }
}

/// Why a notice could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract name (@...)")]
    BadAddress(String),
    #[error("sending {what} to NOTIFY_SOCKET={socket:?}: {source}")]
    Send {
        what: &'static str,
        socket: String,
        source: std::io::Error,
    },
}

/// Sends `notice` to `$NOTIFY_SOCKET`; Ok(false) when the variable is unset or empty.
pub fn notify(notice: Notice) -> Result<bool, NotifyError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(s) if !s.is_empty() => {
            send_to(&s.to_string_lossy(), notice)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `notice` to the socket `socket` names (a path, or `@name` for an abstract socket).
pub fn send_to(socket: &str, notice: Notice) -> Result<(), NotifyError> {
    let addr = address(socket)?;
    let send = |e: std::io::Error| NotifyError::Send {
        what: notice.text().trim_end(),
        socket: socket.to_string(),
        source: e,
    };
    let sock = UnixDatagram::unbound().map_err(send)?;
    sock.send_to_addr(notice.text().as_bytes(), &addr)
        .map_err(send)?;
    Ok(())
}

fn address(socket: &str) -> Result<SocketAddr, NotifyError> {
    let bad = || NotifyError::BadAddress(socket.to_string());
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad());
    }
    if !socket.starts_with('/') {
        return Err(bad());
    }
    SocketAddr::from_pathname(socket).map_err(|_| bad())
}

/// Sends `notice`, logging (not failing on) an error: a program that serves is not stopped
/// because systemd could not be told; systemd's start timeout then says so.
pub fn tell(notice: Notice) {
    match notify(notice) {
        Ok(true) => tracing::debug!(?notice, "told systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!("{e}"),
    }
}

/// Tells systemd `READY=1` now, and `STOPPING=1` once `shutdown` is cancelled.
pub fn ready_until(shutdown: &CancellationToken) {
    tell(Notice::Ready);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tell(Notice::Stopping);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_and_stopping_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let name = path.to_str().unwrap();
        send_to(name, Notice::Ready).unwrap();
        assert_eq!(received(&systemd), "READY=1\n");
        send_to(name, Notice::Stopping).unwrap();
        assert_eq!(received(&systemd), "STOPPING=1\n");
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("standby-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), Notice::Ready).unwrap();
        assert_eq!(received(&systemd), "READY=1\n");
    }

    #[test]
    fn a_relative_or_missing_socket_is_an_error_that_names_it() {
        let e = send_to("run/notify", Notice::Ready).unwrap_err();
        assert!(e.to_string().contains("run/notify"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let e = send_to(gone.to_str().unwrap(), Notice::Ready).unwrap_err();
        assert!(e.to_string().contains("READY=1"), "{e}");
        assert!(e.to_string().contains("gone"), "{e}");
    }

    /// The environment is shared by the test threads, so this one test owns `NOTIFY_SOCKET`:
    /// unset, `notify` does nothing; set, it sends.
    #[test]
    fn notify_follows_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        systemd.set_nonblocking(true).unwrap();
        // Edition 2024 makes changing this process's environment unsafe: a child gets its own.
        let me = std::env::current_exe().unwrap();
        let run = |env: Option<&std::path::Path>| {
            let mut c = std::process::Command::new(&me);
            c.args([
                "--exact",
                "systemd::tests::child_notifies",
                "--ignored",
                "--nocapture",
            ]);
            c.env("STANDBY_NOTIFY_CHILD", "1");
            match env {
                Some(p) => c.env("NOTIFY_SOCKET", p),
                None => c.env_remove("NOTIFY_SOCKET"),
            };
            let out = c.output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let out = run(None);
        assert!(out.contains("sent=false"), "{out}");
        assert!(
            systemd.recv(&mut [0u8; 16]).is_err(),
            "a datagram without NOTIFY_SOCKET"
        );
        let out = run(Some(&path));
        assert!(out.contains("sent=true"), "{out}");
        systemd.set_nonblocking(false).unwrap();
        assert_eq!(received(&systemd), "READY=1\n");
    }

    /// Run by `notify_follows_the_environment` in a child process with its own environment.
    #[test]
    #[ignore = "run as a child of notify_follows_the_environment"]
    fn child_notifies() {
        if std::env::var_os("STANDBY_NOTIFY_CHILD").is_none() {
            return;
        }
        println!("sent={}", notify(Notice::Ready).unwrap());
    }
}
