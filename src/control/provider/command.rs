//! The `command` provider: any cloud (or Terraform, or an in-house inventory) plugged in with
//! programs the operator writes. It is configured in the `[command]` table of
//! `coordinator.toml`:
//!
//! ```toml
//! [command]
//! create  = ["/opt/standby/cloud", "create", "--zone", "europe-west4-a"]
//! destroy = ["/opt/standby/cloud", "destroy"]
//! list    = "/opt/standby/list.sh"   # a plain string is a program without arguments
//! search  = "/opt/standby/search.sh" # optional
//! get     = "/opt/standby/get.sh"    # optional
//! timeout = "120s"                   # per call; default 120s
//! ```
//!
//! # Protocol
//!
//! Every call runs one program directly (no shell; the array is its argv) in its own process
//! group, with the coordinator's environment less its `STANDBY_*` variables, plus
//! `STANDBY_OP=<op>`. The request is one JSON object on stdin, followed by a newline, after
//! which stdin is closed. The reply is JSON on stdout (UTF-8, at most 16 MiB); stderr is free
//! text, logged at debug level and quoted in error messages. Unknown fields in replies are
//! ignored; fields marked `?` may be missing or `null`.
//!
//! | op | stdin | stdout on success |
//! |----|-------|-------------------|
//! | `search`  | `{"op":"search","role":"gpu"\|"cpu"}` | array of offers |
//! | `create`  | `{"op":"create","offer":OFFER,"label","pair","role","coordinator","join_token"}` | a machine |
//! | `get`     | `{"op":"get","id"}` | a machine, or `null` when the id is gone |
//! | `list`    | `{"op":"list","prefix"}` | array of machines whose label starts with `prefix` |
//! | `destroy` | `{"op":"destroy","id"}` | ignored |
//!
//! - An offer is `{"id", "place"?, "region"?, "gpu_name"?, "num_gpus"?, "price_per_hour"?,
//!   "reliability"?, "disk_gb"?, "inet_down_mbps"?}`: strings for the first four, numbers for
//!   the rest; a missing field is `""` or `0`. `id` may be a string or a number. `place` is the
//!   host or zone a failed boot blocklists besides the offer. `create` is given the chosen
//!   offer back in the same shape, every field present.
//! - A machine is `{"id", "label"?, "state"?, "place"?}`; `state` is `"starting"`, `"running"`
//!   or `"stopped"` (stopped, preempted or terminated but still known), default `"starting"`.
//!   For `create`, `label` defaults to the requested label. For `list`, machines without a
//!   label are ignored and the provider filters by `prefix` itself as well.
//! - `create` must give the machine the label `label` (it names the machine to the coordinator
//!   and is unique per attempt: creating the same label twice should return the existing
//!   machine) and make it start `agent-<role>` with `--coordinator <coordinator> --join-token
//!   <join_token> --machine <label>`. The join token travels only on stdin, never in argv or
//!   the environment, and the provider never logs it; scripts should not either.
//! - `destroy` exits 0 when the machine is destroyed or already gone, disk included.
//! - Without a `search` program, there is one offer `{"id":"default","reliability":1.0}` with
//!   `num_gpus` 1 for `gpu` and 0 for `cpu`. Without a `get` program, `get` runs `list` with
//!   prefix `""` and picks the id.
//!
//! Exit status 0 is success. Exit status 75 (`EX_TEMPFAIL`) is a temporary failure: retrying
//! may help; after a `create` the outcome is unknown and the coordinator settles it by listing
//! the label, never by creating again. Any other status is a refusal (retrying the same thing
//! will not help; a refused `create` must not have created anything). A program killed by a
//! signal, a reply on stdout that cannot be parsed, or a call that runs longer than `timeout`
//! counts as temporary. On timeout the program's whole process group is killed with SIGKILL
//! (so are those of a call the coordinator abandons); processes it started in a session or
//! group of their own (the machine itself, for a local cloud) are left alone. Once the program
//! has exited, its stdout is read for at most 2 more seconds: do not leave background processes
//! holding it open.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{Machine, MachineState, Offer, Provider, ProviderError, Startup};
use crate::types::Side;

/// Default limit of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit status of a temporary failure (`EX_TEMPFAIL` in sysexits.h).
pub const EXIT_TEMPFAIL: i32 = 75;
/// Most stdout a call may print.
const MAX_STDOUT: usize = 16 << 20;
/// How much of stderr error messages quote.
const STDERR_TAIL: usize = 400;
/// How much of an unparseable reply error messages quote.
const REPLY_QUOTE: usize = 200;
/// How long stdout and stderr are still read once the program has exited.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The `[command]` settings of `coordinator.toml`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandSettings {
    /// Creates a machine (required).
    #[serde(deserialize_with = "de_argv")]
    pub create: Vec<String>,
    /// Destroys a machine (required).
    #[serde(deserialize_with = "de_argv")]
    pub destroy: Vec<String>,
    /// Lists machines by label prefix (required).
    #[serde(deserialize_with = "de_argv")]
    pub list: Vec<String>,
    /// Lists offers (optional: empty means one default offer).
    #[serde(deserialize_with = "de_argv")]
    pub search: Vec<String>,
    /// Looks one machine up by id (optional: empty means `list` is used).
    #[serde(deserialize_with = "de_argv")]
    pub get: Vec<String>,
    /// Limit of one call (a duration such as "120s"; None means [`DEFAULT_TIMEOUT`]).
    #[serde(deserialize_with = "de_timeout")]
    pub timeout: Option<Duration>,
}

/// A program: a path, or an argv array whose first element is the path.
fn de_argv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a program path or an array of strings (program and arguments)")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            Ok(vec![s.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut v = Vec::new();
            while let Some(s) = a.next_element::<String>()? {
                v.push(s);
            }
            Ok(v)
        }
    }
    d.deserialize_any(V)
}

fn de_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    super::de_duration(d).map(Some)
}

/// The `command` provider (see the module documentation for the protocol).
#[derive(Clone, Debug)]
pub struct CommandProvider {
    create: Vec<String>,
    destroy: Vec<String>,
    list: Vec<String>,
    search: Option<Vec<String>>,
    get: Option<Vec<String>>,
    timeout: Duration,
}

impl CommandProvider {
    /// Checks the settings: `create`, `destroy` and `list` are required, `timeout` positive.
    pub fn new(settings: CommandSettings) -> Result<CommandProvider, ProviderError> {
        fn required(name: &str, v: Vec<String>) -> Result<Vec<String>, ProviderError> {
            if v.first().is_none_or(|p| p.trim().is_empty()) {
                return Err(ProviderError::Rejected(format!(
                    "command provider: no `{name}` program (set {name} = [\"/path/to/program\", \
                     \"arg\", ...] in the [command] table of coordinator.toml)"
                )));
            }
            Ok(v)
        }
        fn optional(name: &str, v: Vec<String>) -> Result<Option<Vec<String>>, ProviderError> {
            if v.is_empty() {
                Ok(None)
            } else {
                required(name, v).map(Some)
            }
        }
        let timeout = settings.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(ProviderError::Rejected(
                "command provider: timeout must be longer than 0s (e.g. timeout = \"120s\")".into(),
            ));
        }
        Ok(CommandProvider {
            create: required("create", settings.create)?,
            destroy: required("destroy", settings.destroy)?,
            list: required("list", settings.list)?,
            search: optional("search", settings.search)?,
            get: optional("get", settings.get)?,
            timeout,
        })
    }

    /// Runs `argv` for `op` with `input` on stdin; its stdout when it exits 0.
    async fn call(
        &self,
        op: &str,
        argv: &[String],
        input: &Value,
    ) -> Result<Vec<u8>, ProviderError> {
        let prog = argv[0].as_str();
        let what = format!("command provider: {op} program {prog}");
        let mut cmd = program(op, argv);
        tracing::debug!(op, program = prog, "running");
        let mut child = spawn(&mut cmd, &what).await?;
        // From here on, dropping this call (the coordinator's own time limit) kills the group.
        let mut group = GroupKill(child.id().and_then(|p| i32::try_from(p).ok()));
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        let mut err = StderrSink::new(op, prog);
        let end = converse(&mut child, input, deadline, &mut out, &mut err)
            .await
            .map_err(|e| ProviderError::Transient(format!("{what}: waiting for it: {e}")))?;
        if !end.exited() {
            group.kill();
            // Reap it (the process itself; kill_on_drop and tokio's reaper cover the rest).
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
        group.0 = None;
        self.verdict(end, out, &what, &err.tail())
    }

    /// The reply of a call that ended with `end`: stdout on exit status 0, else the error its
    /// ending and exit status mean (see the module documentation); `tail` quotes stderr.
    fn verdict(
        &self,
        end: Ending,
        out: Vec<u8>,
        what: &str,
        tail: &str,
    ) -> Result<Vec<u8>, ProviderError> {
        let status = match end {
            Ending::TimedOut => {
                return Err(ProviderError::Transient(format!(
                    "{what} timed out after {} s and was killed{tail}",
                    self.timeout.as_secs_f64()
                )));
            }
            Ending::Overflow { .. } => {
                return Err(ProviderError::Transient(format!(
                    "{what} printed more than {} MiB on stdout and was killed{tail}",
                    MAX_STDOUT >> 20
                )));
            }
            Ending::Exited(status) => status,
        };
        match status.code() {
            Some(0) => Ok(out),
            Some(EXIT_TEMPFAIL) => Err(ProviderError::Transient(format!(
                "{what} failed temporarily (exit status {EXIT_TEMPFAIL}; retrying may help){tail}"
            ))),
            Some(c) => Err(ProviderError::Rejected(format!(
                "{what} failed (exit status {c}){tail}"
            ))),
            None => Err(ProviderError::Transient(format!(
                "{what} was killed by signal {}{tail}",
                status.signal().unwrap_or(0)
            ))),
        }
    }

    /// Runs `op` and parses its reply as `T`.
    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        op: &str,
        argv: &[String],
        input: &Value,
    ) -> Result<T, ProviderError> {
        let out = self.call(op, argv, input).await?;
        serde_json::from_slice(&out).map_err(|e| {
            let n = out.len().min(REPLY_QUOTE);
            let quote = String::from_utf8_lossy(&out[..n]);
            let more = if out.len() > n { "..." } else { "" };
            ProviderError::Transient(format!(
                "command provider: {op} program {} printed an unexpected reply ({e}): \
                 {quote:?}{more} (see the protocol in the command provider's documentation)",
                argv[0]
            ))
        })
    }

    async fn list_all(&self, prefix: &str) -> Result<Vec<Machine>, ProviderError> {
        let input = json!({"op": "list", "prefix": prefix});
        let v: Vec<WireMachine> = self.call_json("list", &self.list, &input).await?;
        let mut out = Vec::new();
        for w in v {
            let m = w.into_machine("list", "")?;
            if !m.label.is_empty() && m.label.starts_with(prefix) {
                out.push(m);
            }
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl Provider for CommandProvider {
    fn name(&self) -> &'static str {
        "command"
    }

    async fn search(&self, role: Side) -> Result<Vec<Offer>, ProviderError> {
        let Some(argv) = &self.search else {
            return Ok(vec![Offer {
                id: "default".into(),
                num_gpus: u32::from(role == Side::Gpu),
                reliability: 1.0,
                ..Offer::default()
            }]);
        };
        let input = json!({"op": "search", "role": role.as_str()});
        let v: Vec<WireOffer> = self.call_json("search", argv, &input).await?;
        v.into_iter().map(WireOffer::into_offer).collect()
    }

    async fn create(&self, offer: &Offer, s: &Startup) -> Result<Machine, ProviderError> {
        let input = json!({
            "op": "create",
            "offer": offer,
            "label": s.label,
            "pair": s.pair,
            "role": s.role.as_str(),
            "coordinator": s.coordinator,
            "join_token": s.join_token,
        });
        let w: WireMachine = self.call_json("create", &self.create, &input).await?;
        let m = w.into_machine("create", &s.label)?;
        if m.label != s.label {
            tracing::warn!(
                asked = %s.label,
                got = %m.label,
                "command provider: create returned a machine with another label"
            );
        }
        Ok(m)
    }

    async fn get(&self, id: &str) -> Result<Option<Machine>, ProviderError> {
        let Some(argv) = &self.get else {
            return Ok(self.list_all("").await?.into_iter().find(|m| m.id == id));
        };
        let input = json!({"op": "get", "id": id});
        let w: Option<WireMachine> = self.call_json("get", argv, &input).await?;
        w.map(|w| w.into_machine("get", "")).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Machine>, ProviderError> {
        self.list_all(prefix).await
    }

    async fn destroy(&self, id: &str) -> Result<(), ProviderError> {
        let input = json!({"op": "destroy", "id": id});
        self.call("destroy", &self.destroy, &input).await.map(drop)
    }
}

/// The command for `argv`: no `STANDBY_*` variables but `STANDBY_OP`, every stream piped, in a
/// process group of its own (so a timeout can kill all it started).
fn program(op: &str, argv: &[String]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STANDBY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("STANDBY_OP", op)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// How the exchange with a program ended.
enum Ending {
    /// It exited, and its stdout and stderr were read (or their grace period ran out).
    Exited(ExitStatus),
    /// It ran past the deadline.
    TimedOut,
    /// It printed more than [`MAX_STDOUT`]; `exited` says whether it had exited already.
    Overflow { exited: bool },
}

impl Ending {
    /// Whether the program has exited (otherwise its group is still to be killed).
    fn exited(&self) -> bool {
        match self {
            Ending::Exited(_) => true,
            Ending::TimedOut => false,
            Ending::Overflow { exited } => *exited,
        }
    }
}

/// Writes `input` (and a newline) to the program's stdin and closes it, reads its stdout into
/// `out` and its stderr into `err`, and waits for it to exit, until `deadline`. Once it has
/// exited, stdout and stderr are read for at most [`DRAIN_GRACE`] more.
async fn converse(
    child: &mut tokio::process::Child,
    input: &Value,
    deadline: Instant,
    out: &mut Vec<u8>,
    err: &mut StderrSink<'_>,
) -> std::io::Result<Ending> {
    let mut payload = serde_json::to_vec(input).expect("a JSON value serialises");
    payload.push(b'\n');
    let stdin = child.stdin.take();
    let write = async move {
        if let Some(mut w) = stdin {
            // A program that exits without reading its request is its own business.
            let _ = w.write_all(&payload).await;
            let _ = w.shutdown().await;
        }
    };
    let (op, prog) = (err.op, err.prog);
    let read_out = read_capped(child.stdout.take(), out);
    let read_err = err.drain(child.stderr.take());
    tokio::pin!(write, read_out, read_err);
    let (mut written, mut out_done, mut err_done) = (false, false, false);
    let mut status = None;
    let grace = tokio::time::sleep_until(deadline);
    tokio::pin!(grace);
    loop {
        if let Some(s) = status
            && out_done
            && err_done
        {
            return Ok(Ending::Exited(s));
        }
        tokio::select! {
            _ = &mut write, if !written => written = true,
            r = &mut read_out, if !out_done => {
                out_done = true;
                if !r {
                    return Ok(Ending::Overflow { exited: status.is_some() });
                }
            }
            _ = &mut read_err, if !err_done => err_done = true,
            s = child.wait(), if status.is_none() => {
                status = Some(s?);
                let cutoff = (Instant::now() + DRAIN_GRACE).min(deadline);
                grace.as_mut().reset(cutoff);
            }
            _ = &mut grace => {
                let Some(s) = status else { return Ok(Ending::TimedOut) };
                tracing::warn!(
                    op,
                    program = prog,
                    "exited, but something it started still holds its stdout or stderr open; \
                     not waiting for it"
                );
                return Ok(Ending::Exited(s));
            }
        }
    }
}

/// Kills a process group when dropped, unless emptied.
struct GroupKill(Option<i32>);

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take()
            && pgid > 0
        {
            // SAFETY: kill(2) on the group we created for the program (process_group(0)); its
            // leader is not reaped yet, so the id cannot have been reused.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns, retrying briefly on ETXTBSY (a program file that was just written can be busy while
/// another thread forks).
async fn spawn(
    cmd: &mut tokio::process::Command,
    what: &str,
) -> Result<tokio::process::Child, ProviderError> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Ok(c) => return Ok(c),
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        " (check the path in the [command] table of coordinator.toml)"
                    }
                    std::io::ErrorKind::PermissionDenied => " (is it executable? chmod +x)",
                    _ => "",
                };
                let msg = format!("{what} could not be started: {e}{hint}");
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                        ProviderError::Rejected(msg)
                    }
                    _ if e.raw_os_error() == Some(libc::ENOEXEC) => ProviderError::Rejected(msg),
                    _ => ProviderError::Transient(msg),
                });
            }
        }
    }
}

/// Reads all of `r` into `out`; false when it held more than [`MAX_STDOUT`] bytes.
async fn read_capped(r: Option<impl AsyncRead + Unpin>, out: &mut Vec<u8>) -> bool {
    let Some(r) = r else { return true };
    let mut r = r.take(MAX_STDOUT as u64 + 1);
    // A read error ends the reply early; the parse that follows reports it.
    let _ = r.read_to_end(out).await;
    out.len() <= MAX_STDOUT
}

/// The program's stderr: each line logged at debug level, the end kept for error messages.
struct StderrSink<'a> {
    op: &'a str,
    prog: &'a str,
    tail: Vec<u8>,
    line: Vec<u8>,
}

impl<'a> StderrSink<'a> {
    fn new(op: &'a str, prog: &'a str) -> StderrSink<'a> {
        StderrSink {
            op,
            prog,
            tail: Vec::new(),
            line: Vec::new(),
        }
    }

    async fn drain(&mut self, r: Option<impl AsyncRead + Unpin>) {
        let Some(mut r) = r else { return };
        let mut buf = [0u8; 8192];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > 4 * STDERR_TAIL {
                self.tail.drain(..self.tail.len() - STDERR_TAIL);
            }
            for &b in chunk {
                if b == b'\n' {
                    self.flush_line();
                } else if self.line.len() < 4096 {
                    self.line.push(b);
                }
            }
        }
        self.flush_line();
    }

    fn flush_line(&mut self) {
        if !self.line.is_empty() {
            tracing::debug!(
                op = self.op,
                program = self.prog,
                "stderr: {}",
                String::from_utf8_lossy(&self.line).trim_end()
            );
            self.line.clear();
        }
    }

    /// ": <last bytes of stderr>", or "" when it printed nothing.
    fn tail(&self) -> String {
        let start = self.tail.len().saturating_sub(STDERR_TAIL);
        let s = String::from_utf8_lossy(&self.tail[start..]);
        let s = s.trim();
        if s.is_empty() {
            String::new()
        } else {
            format!(": {s}")
        }
    }
}

fn id_string(op: &str, v: &Value) -> Result<String, ProviderError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(ProviderError::Transient(format!(
            "command provider: {op} replied with an entry whose id is {other} (want a non-empty \
             string or a number)"
        ))),
    }
}

#[derive(serde::Deserialize)]
struct WireOffer {
    #[serde(default)]
    id: Value,
    place: Option<String>,
    region: Option<String>,
    gpu_name: Option<String>,
    num_gpus: Option<u32>,
    price_per_hour: Option<f64>,
    reliability: Option<f64>,
    disk_gb: Option<f64>,
    inet_down_mbps: Option<f64>,
}

impl WireOffer {
    fn into_offer(self) -> Result<Offer, ProviderError> {
        Ok(Offer {
            id: id_string("search", &self.id)?,
            place: self.place.unwrap_or_default(),
            region: self.region.unwrap_or_default(),
            gpu_name: self.gpu_name.unwrap_or_default(),
            num_gpus: self.num_gpus.unwrap_or(0),
            price_per_hour: self.price_per_hour.unwrap_or(0.0),
            reliability: self.reliability.unwrap_or(0.0),
            disk_gb: self.disk_gb.unwrap_or(0.0),
            inet_down_mbps: self.inet_down_mbps.unwrap_or(0.0),
        })
    }
}

#[derive(serde::Deserialize)]
struct WireMachine {
    #[serde(default)]
    id: Value,
    label: Option<String>,
    state: Option<String>,
    place: Option<String>,
}

impl WireMachine {
    /// The machine; its label is `label` when the reply has none.
    fn into_machine(self, op: &str, label: &str) -> Result<Machine, ProviderError> {
        let state = match self.state.as_deref().unwrap_or("starting") {
            "starting" => MachineState::Starting,
            "running" => MachineState::Running,
            "stopped" => MachineState::Stopped,
            other => {
                return Err(ProviderError::Transient(format!(
                    "command provider: {op} replied with a machine in state {other:?} (want \
                     \"starting\", \"running\" or \"stopped\")"
                )));
            }
        };
        Ok(Machine {
            id: id_string(op, &self.id)?,
            label: self
                .label
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| label.to_string()),
            state,
            place: self.place.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests;
