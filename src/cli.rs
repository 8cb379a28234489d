//! What the three binaries share on their command lines: defaults, configuration layering
//! (flag, then `STANDBY_*` environment variable, then TOML file, then default), human
//! durations, logging, and exit codes ([`Exit`]: 64 for a usage error, sysexits.h values for
//! the others).

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Every default in one place.
pub mod defaults {
    pub const DEBOUNCE: &str = "250ms";
    pub const HEARTBEAT: &str = "1s";
    pub const SUSPECT_AFTER_MISSED: u32 = 2;
    pub const FAILOVER_AFTER: &str = "3s";
    pub const TOKEN_TTL: &str = "1h";
    pub const BOOT_TIMEOUT: &str = "10m";
    pub const BLOCKLIST_FOR: &str = "1h";
    /// Under a constant trickle of writes the debounce never sees a pause: a generation then
    /// starts this long after the first change it carries. It bounds the RPO under steady
    /// writes (about this plus two generations' sync time; `bench/rpo.rs`).
    pub const MAX_DELAY: &str = "250ms";
    pub const RESCAN_INTERVAL: &str = "60s";
    pub const COMPRESS_LEVEL: i32 = 1;
    pub const INLINE_MAX: u64 = 128 << 10;
    pub const FLUSH_TIMEOUT: &str = "60s";
    /// Static (`coordinator cert`) and admin certificates.
    pub const CERT_DAYS: u32 = 365;
    /// History retention (restic's `forget` in spirit): every snapshot of the last hour, the
    /// newest of each hour for two days, of each day for two weeks, within a quarter of the disk.
    pub const KEEP_WITHIN: &str = "1h";
    pub const KEEP_HOURLY: u32 = 48;
    pub const KEEP_DAILY: u32 = 14;
    pub const HISTORY_BUDGET: &str = "25%";
    /// Certificates issued to joining agents (renewed over the heartbeat at two thirds).
    pub const CERT_LIFETIME: &str = "24h";
    /// How long after expiry an agent's certificate may still connect to renew.
    pub const RENEW_GRACE: &str = "30days";
    pub const COORDINATOR_PORT: u16 = 7700;
    pub const METRICS_PORT: u16 = 9464;
    pub const CPU_PORT: u16 = 7701;
    pub const GPU_PORT: u16 = 7702;
    pub const CPU_LISTEN: &str = "0.0.0.0:7701";
    pub const GPU_LISTEN: &str = "0.0.0.0:7702";
    /// Concurrent TCP connections one source address may hold on a listener (handshakes
    /// included).
    pub const CONNECTIONS_PER_ADDRESS: usize = 64;
    /// Concurrent heartbeat streams per agent certificate.
    pub const HEARTBEATS_PER_IDENTITY: usize = 2;
    /// Concurrent `Events` subscriptions per admin certificate.
    pub const EVENTS_PER_ADMIN: usize = 4;
}

/// How the three programs exit when they fail, so scripts can tell a missed drill target from
/// an unreachable coordinator. The values follow sysexits.h where one fits; [`EXIT_CODES`] is
/// the text each `--help` and the README show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Anything else (1).
    Failure,
    /// `coordinator drill` ran to the end and missed a target (3).
    TargetMissed,
    /// A bad command line, flag value or configuration (64, EX_USAGE).
    Usage,
    /// The coordinator or the agent could not be reached (69, EX_UNAVAILABLE).
    Unreachable,
    /// Not done in time, e.g. a flush (75, EX_TEMPFAIL: trying again may work).
    Timeout,
    /// Refused: no permission, a fenced agent, a pair in a state that does not allow it
    /// (77, EX_NOPERM).
    Refused,
}

/// The exit codes as `--help` (after_help) and the README list them.
pub const EXIT_CODES: &str = "Exit status: 0 success, 1 failure, 3 a drill target missed, \
64 usage error, 69 coordinator or agent unreachable, 75 timed out, 77 refused.";

/// Exit code for a usage error (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

impl Exit {
    pub fn code(self) -> i32 {
        match self {
            Exit::Failure => 1,
            Exit::TargetMissed => 3,
            Exit::Usage => EXIT_USAGE,
            Exit::Unreachable => 69,
            Exit::Timeout => 75,
            Exit::Refused => 77,
        }
    }

    /// What a gRPC status from the coordinator or an agent means for the exit code.
    pub fn of_status(code: tonic::Code) -> Exit {
        use tonic::Code;
        match code {
            Code::Unavailable => Exit::Unreachable,
            Code::DeadlineExceeded => Exit::Timeout,
            Code::InvalidArgument => Exit::Usage,
            Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::OutOfRange => Exit::Refused,
            _ => Exit::Failure,
        }
    }

    /// The exit code an error calls for: the first [`Exiting`] in its chain, else that of a
    /// gRPC status or transport (connection) error in it, else 1.
    pub fn of_error(e: &anyhow::Error) -> Exit {
        for c in e.chain() {
            if let Some(x) = c.downcast_ref::<Exiting>() {
                return x.exit;
            }
            if let Some(s) = c.downcast_ref::<tonic::Status>() {
                return Exit::of_status(s.code());
            }
            if c.is::<tonic::transport::Error>() {
                return Exit::Unreachable;
            }
        }
        Exit::Failure
    }
}

/// An error that says how the program exits.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exiting {
    pub exit: Exit,
    pub message: String,
}

impl Exiting {
    pub fn new(exit: Exit, message: impl std::fmt::Display) -> Exiting {
        Exiting {
            exit,
            message: message.to_string(),
        }
    }
}

/// A gRPC status as an error: its message, and the exit code its code calls for.
impl From<tonic::Status> for Exiting {
    fn from(s: tonic::Status) -> Exiting {
        Exiting::new(Exit::of_status(s.code()), s.message())
    }
}

/// Parses the command line; prints help/version and exits 0, or the error and exits 64. Every
/// command's `--help` ends with the exit codes ([`EXIT_CODES`]).
pub fn parse_or_exit<T: clap::Parser>() -> T {
    let mut cmd = with_exit_codes(T::command());
    let parsed = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|mut m| T::from_arg_matches_mut(&mut m))
        .map_err(|e| e.format(&mut cmd));
    match parsed {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => EXIT_USAGE,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

/// `cmd` and its subcommands, each with [`EXIT_CODES`] at the end of its after-help.
pub fn with_exit_codes(cmd: clap::Command) -> clap::Command {
    let text = match cmd.get_after_help() {
        Some(own) => format!("{own}\n\n{EXIT_CODES}"),
        None => EXIT_CODES.to_string(),
    };
    cmd.after_help(text).mut_subcommands(with_exit_codes)
}

/// A usage error found after parsing (a missing or invalid setting): print and exit 64.
pub fn usage_error(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(EXIT_USAGE);
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A point in time as a user gives it: RFC 3339 (`2026-12-01T10:00:00Z`, `2026-12-01 10:00:00`
/// in UTC), or a duration before `now` (`10m`, `2h 30m`, `1day`). Unix milliseconds.
pub fn parse_time(s: &str, now: std::time::SystemTime) -> Result<i64, String> {
    let s = s.trim();
    let at = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => {
            let back = humantime::parse_duration(s.trim_end_matches("ago").trim()).map_err(|_| {
                format!(
                    "invalid time {s:?}: give RFC 3339 (2026-12-01T10:00:00Z) or how long ago (10m, 2h)"
                )
            })?;
            now.checked_sub(back)
                .ok_or_else(|| format!("{s:?} ago is before 1970"))?
        }
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .map_err(|_| format!("{s:?} is before 1970"))
}

/// A size in bytes: a number with an optional unit, decimal (`kB`, `MB`, `GB`, `TB`) or binary
/// (`KiB`, `MiB`, `GiB`, `TiB`); `B` or nothing for bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?}")),
    };
    Ok((n * mult as f64) as u64)
}

/// Unix milliseconds as RFC 3339 in UTC, to the millisecond.
pub fn format_time(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms.clamp(0, LAST_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z): later times, which only
/// a forged or broken clock gives, are shown (and looked up) as that.
pub const LAST_MS: i64 = 253_402_300_799_999;

/// A TOML configuration file's settings (empty when there is none).
#[derive(Debug, Default)]
pub struct FileConfig {
    table: toml::Table,
    path: Option<String>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> Result<FileConfig, String> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        Ok(FileConfig {
            table,
            path: Some(path.display().to_string()),
        })
    }

    /// Refuses a key the program does not read, naming it (a misspelt setting would otherwise
    /// be ignored without a word). `keys` lists the top-level keys, and `section.key` for a
    /// section read key by key; a section listed whole is checked by its own deserializer
    /// (`#[serde(deny_unknown_fields)]`).
    pub fn deny_unknown(&self, keys: &[&str]) -> Result<(), String> {
        for (k, v) in &self.table {
            if keys.contains(&k.as_str()) {
                continue;
            }
            let prefix = format!("{k}.");
            let inner: Vec<&str> = keys
                .iter()
                .filter_map(|x| x.strip_prefix(&prefix))
                .collect();
            let Some(t) = v.as_table().filter(|_| !inner.is_empty()) else {
                return Err(self.unknown(k, keys));
            };
            if let Some(s) = t.keys().find(|s| !inner.contains(&s.as_str())) {
                return Err(self.unknown(&format!("{k}.{s}"), keys));
            }
        }
        Ok(())
    }

    fn unknown(&self, key: &str, keys: &[&str]) -> String {
        format!(
            "config file {}: unknown key {key:?} (known: {})",
            self.path.as_deref().unwrap_or("?"),
            keys.join(", ")
        )
    }

    /// The value of `key` (which may be `section.key`), if the file sets it.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        let mut cur: Option<&toml::Value> = None;
        let mut table = &self.table;
        for (i, part) in key.split('.').enumerate() {
            let v = match table.get(part) {
                Some(v) => v,
                None => return Ok(None),
            };
            if i + 1 < key.split('.').count() {
                match v.as_table() {
                    Some(t) => table = t,
                    None => return Ok(None),
                }
            } else {
                cur = Some(v);
            }
        }
        match cur {
            None => Ok(None),
            Some(v) => v.clone().try_into().map(Some).map_err(|e| {
                format!(
                    "config file {}: {key}: {e}",
                    self.path.as_deref().unwrap_or("?")
                )
            }),
        }
    }

    /// `flag` (already resolved against the environment by clap), else the file, else `default`.
    pub fn pick<T: DeserializeOwned>(
        &self,
        flag: Option<T>,
        key: &str,
        default: impl FnOnce() -> T,
    ) -> Result<T, String> {
        if let Some(v) = flag {
            return Ok(v);
        }
        Ok(self.get(key)?.unwrap_or_else(default))
    }

    pub fn pick_opt<T: DeserializeOwned>(
        &self,
        flag: Option<T>,
        key: &str,
    ) -> Result<Option<T>, String> {
        if flag.is_some() {
            return Ok(flag);
        }
        self.get(key)
    }

    /// A duration setting given as a human string ("250ms").
    pub fn pick_duration(
        &self,
        flag: Option<String>,
        key: &str,
        default: &str,
    ) -> Result<Duration, String> {
        let s = self.pick(flag, key, || default.to_string())?;
        parse_duration(&s).map_err(|e| format!("{key}: {e}"))
    }
}

/// How log lines are written: for people, or one JSON object per line for a log collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The `--log-format` flag every program takes (before or after its subcommand).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct LogArgs {
    /// Log lines as text, or as one JSON object per line (with timestamp, level, fields).
    #[arg(
        long,
        global = true,
        env = "STANDBY_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// The format chosen on the command line; set once at the top of `main`, before logging or
/// [`fail`] write anything (a process-wide choice, like the global subscriber itself).
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

impl LogArgs {
    pub fn apply(self) {
        let _ = LOG_FORMAT.set(self.log_format);
    }
}

fn log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or_default()
}

/// Logs to stderr in the chosen [`LogFormat`]; the filter comes from `STANDBY_LOG`, else
/// `RUST_LOG`, else `default`.
pub fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("STANDBY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match log_format() {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM).
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Raises the soft limit on open files to the hard limit (a coordinator holds one connection
/// per agent). Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// Prints `error: <chain>` on one line and exits with the code the error calls for
/// ([`Exit::of_error`]).
pub fn fail(e: &anyhow::Error) -> ! {
    let mut s = e.to_string();
    for c in e.chain().skip(1) {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
    }
    let s = s.replace('\n', " ");
    match log_format() {
        LogFormat::Text => eprintln!("error: {s}"),
        // The shape of the JSON log lines, so a collector reads the last line like the others.
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now())
                    .to_string(),
                "level": "ERROR",
                "fields": { "message": s },
            })
        ),
    }
    std::process::exit(Exit::of_error(e).code());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert!(parse_size("20 gallons").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn times_are_rfc3339_or_how_long_ago() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_time("10m", now), Ok(1_800_000_000_000 - 600_000));
        assert_eq!(parse_time("2h ago", now), Ok(1_800_000_000_000 - 7_200_000));
        let t = parse_time("2026-12-01T10:00:00Z", now).unwrap();
        assert_eq!(format_time(t), "2026-12-01T10:00:00.000Z");
        assert_eq!(parse_time("2026-12-01 10:00:00", now), Ok(t));
        assert!(
            parse_time("yesterday-ish", now)
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(parse_time("100years", now).is_err());
        assert_eq!(format_time(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn exit_codes_follow_the_error() {
        let status = |c| anyhow::Error::new(Exiting::from(tonic::Status::new(c, "m")));
        assert_eq!(
            Exit::of_error(&status(tonic::Code::Unavailable)),
            Exit::Unreachable
        );
        assert_eq!(
            Exit::of_error(&status(tonic::Code::FailedPrecondition)),
            Exit::Refused
        );
        assert_eq!(
            Exit::of_error(&status(tonic::Code::Internal)),
            Exit::Failure
        );
        let raw = anyhow::Error::new(tonic::Status::deadline_exceeded("slow"));
        assert_eq!(Exit::of_error(&raw.context("flushing")), Exit::Timeout);
        let tagged = anyhow::Error::new(Exiting::new(Exit::TargetMissed, "missed"));
        assert_eq!(Exit::of_error(&tagged.context("drill")), Exit::TargetMissed);
        assert_eq!(Exit::of_error(&anyhow::anyhow!("plain")), Exit::Failure);
        let codes = [1, 3, 64, 69, 75, 77];
        for (exit, code) in [
            Exit::Failure,
            Exit::TargetMissed,
            Exit::Usage,
            Exit::Unreachable,
            Exit::Timeout,
            Exit::Refused,
        ]
        .into_iter()
        .zip(codes)
        {
            assert_eq!(exit.code(), code);
            assert!(
                EXIT_CODES.contains(&format!(" {code} ")),
                "{code} undocumented"
            );
        }
    }

    #[test]
    fn layering() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "debounce = \"500ms\"\n[gpu]\nlevel = 3\n").unwrap();
        let f = FileConfig::load(Some(&p)).unwrap();
        assert_eq!(
            f.pick_duration(None, "debounce", "250ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            f.pick_duration(Some("2s".into()), "debounce", "250ms")
                .unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(
            f.pick_duration(None, "absent", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(f.pick(None, "gpu.level", || 1i32).unwrap(), 3);
        assert!(f.pick_duration(None, "gpu.level", "1s").is_err());
        std::fs::write(&p, "not = [valid").unwrap();
        assert!(FileConfig::load(Some(&p)).is_err());
    }

    #[test]
    fn every_help_ends_with_the_exit_codes() {
        let cmd = clap::Command::new("p")
            .subcommand(clap::Command::new("a").after_help("Its own note."))
            .subcommand(clap::Command::new("b").subcommand(clap::Command::new("c")));
        let cmd = with_exit_codes(cmd);
        let help = |c: &clap::Command| c.get_after_help().unwrap().to_string();
        assert_eq!(help(&cmd), EXIT_CODES);
        let a = cmd.find_subcommand("a").unwrap();
        assert_eq!(help(a), format!("Its own note.\n\n{EXIT_CODES}"));
        let b = cmd.find_subcommand("b").unwrap();
        assert_eq!(help(b.find_subcommand("c").unwrap()), EXIT_CODES);
    }

    #[test]
    fn unknown_keys_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        let keys = ["debounce", "gpu.level", "backup"];
        let check = |text: &str| {
            std::fs::write(&p, text).unwrap();
            FileConfig::load(Some(&p)).unwrap().deny_unknown(&keys)
        };
        assert_eq!(
            check("debounce = \"1s\"\n[gpu]\nlevel = 3\n[backup]\nany = 1\n"),
            Ok(())
        );
        let e = check("debounse = \"1s\"\n").unwrap_err();
        assert!(
            e.contains("unknown key \"debounse\"") && e.contains("c.toml"),
            "{e}"
        );
        assert!(e.contains("known: debounce, gpu.level, backup"), "{e}");
        let e = check("[gpu]\nlevel = 3\nlevle = 4\n").unwrap_err();
        assert!(e.contains("unknown key \"gpu.levle\""), "{e}");
        let e = check("gpu = 3\n").unwrap_err();
        assert!(e.contains("unknown key \"gpu\""), "{e}");
        assert_eq!(FileConfig::default().deny_unknown(&[]), Ok(()));
    }
}
