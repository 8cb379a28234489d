//! The command-line habits operators and scripts rely on, on the real binaries:
//! - exit codes (`standby::cli::Exit`, listed in every `--help` and the README): 64 for usage
//!   errors (unknown config keys included, named), 69 when the coordinator or agent cannot be
//!   reached, 75 for a flush that timed out, 77 for a refusal (a drill's missed target, 3, is in
//!   `tests/demo.rs`);
//! - `--log-format json`: every line on stderr one JSON object, the final error too;
//! - `coordinator completions SHELL` and `coordinator man`.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use standby::trust::identity::Role;

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

#[test]
fn every_help_lists_the_exit_codes() {
    let helps: [(&str, &[&str]); 7] = [
        (COORDINATOR, &["--help"]),
        (COORDINATOR, &["serve", "--help"]),
        (COORDINATOR, &["drill", "--help"]),
        (COORDINATOR, &["pair", "create", "--help"]),
        (AGENT_GPU, &["--help"]),
        (AGENT_GPU, &["flush", "--help"]),
        (AGENT_CPU, &["--help"]),
    ];
    for (program, args) in helps {
        let out = run(program, args);
        assert_eq!(code(&out), Some(0), "{program} {args:?}: {}", stderr(&out));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains(standby::cli::EXIT_CODES),
            "{program} {args:?}:\n{help}"
        );
    }
}

#[test]
fn usage_errors_exit_64() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let d = dir.to_str().unwrap();
    assert_eq!(code(&run(COORDINATOR, &["init", "--dir", d])), Some(0));
    let out = run(COORDINATOR, &["serve", "--dir", d, "--provider", "locall"]);
    assert_eq!(code(&out), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("locall"), "{}", stderr(&out));
    // The same mistake in coordinator.toml.
    let toml = dir.join("coordinator.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str("\nprovider = \"locall\"\n");
    fs::write(&toml, text).unwrap();
    let out = run(
        COORDINATOR,
        &["serve", "--dir", d, "--listen", "127.0.0.1:0"],
    );
    assert_eq!(code(&out), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown provider \"locall\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&run(AGENT_GPU, &["flush", "--bogus"])), Some(64));
    let out = run(AGENT_GPU, &["flush", "--state-dir", d, "--timeout", "soon"]);
    assert_eq!(code(&out), Some(64), "{}", stderr(&out));
    fs::remove_file(&toml).unwrap();
    // The etcd store: endpoints are required, its options need it, and the values are checked
    // before anything connects.
    for (args, says) in [
        (&["--store", "etcd"][..], "--store etcd needs --etcd"),
        (&["--etcd", "http://127.0.0.1:1"][..], "need --store etcd"),
        (
            &[
                "--store",
                "etcd",
                "--etcd",
                "http://127.0.0.1:1",
                "--leader-lease",
                "1s",
            ][..],
            "at least 2s",
        ),
        (
            &[
                "--store",
                "etcd",
                "--etcd",
                "http://127.0.0.1:1",
                "--etcd-prefix",
                "x",
            ][..],
            "must start with /",
        ),
        (&["--store", "etcdd"][..], "etcdd"),
    ] {
        let out = run(COORDINATOR, &[&["serve", "--dir", d][..], args].concat());
        assert_eq!(code(&out), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn admin_verbs_exit_69_unreachable_and_77_refused() {
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &[]);
    assert!(coord.admin(&["pair", "create", "p1"]).status.success());
    let out = coord.admin(&["pair", "create", "p1"]);
    assert_eq!(code(&out), Some(77), "exists already: {}", stderr(&out));
    let out = coord.admin(&["failover", "nosuch"]);
    assert_eq!(code(&out), Some(77), "no such pair: {}", stderr(&out));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
    // Nothing listens on this port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let admin = coord.dir.join("admin");
    let out = Command::new(COORDINATOR)
        .args(["pairs", "--server", &port, "--tls-dir"])
        .arg(&admin)
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(69), "{}", stderr(&out));
    // The refused calls changed nothing.
    let pairs: Vec<_> = coord.pairs().iter().map(|p| p["pair"].clone()).collect();
    assert_eq!(pairs, [serde_json::json!("p1")]);
}

/// `agent-gpu flush`/`status` for `state`.
fn agent_verb(verb: &str, state: &Path, extra: &[&str]) -> Output {
    Command::new(AGENT_GPU)
        .arg(verb)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn agent_verbs_exit_69_without_an_agent_and_75_on_a_flush_timeout() {
    let t = tempfile::tempdir().unwrap();
    let out = agent_verb("status", t.path(), &[]);
    assert_eq!(code(&out), Some(69), "{}", stderr(&out));
    let out = agent_verb("flush", t.path(), &["--timeout", "1s"]);
    assert_eq!(code(&out), Some(69), "{}", stderr(&out));

    let pki = Pki::new();
    let mut cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let (ws, gst) = (t.path().join("ws"), t.path().join("gpu"));
    fs::create_dir_all(&ws).unwrap();
    fs::write(ws.join("model.pt"), b"good").unwrap();
    let _gpu = Proc(
        Command::new(AGENT_GPU)
            .args(gpu_args(&ws, &gst, &pki.node("p", Role::Gpu), &cpu.addr))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let up = wait_until(Duration::from_secs(30), || {
        agent_verb("flush", &gst, &["--timeout", "20s"])
            .status
            .success()
    });
    assert!(up, "agent-gpu did not come up");
    cpu.kill();
    fs::write(ws.join("model.pt"), b"newer, not flushed").unwrap();
    let out = agent_verb("flush", &gst, &["--timeout", "1s"]);
    assert_eq!(code(&out), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not durable after 1000 ms"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(cpu.workspace.join("model.pt")).unwrap(), b"good");
}

#[test]
fn unknown_config_keys_exit_64_naming_the_key() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let d = dir.to_str().unwrap();
    assert_eq!(code(&run(COORDINATOR, &["init", "--dir", d])), Some(0));
    let toml = dir.join("coordinator.toml");
    let text = fs::read_to_string(&toml).unwrap();
    for (typo, named) in [
        ("failover_afer = \"3s\"\n", "\"failover_afer\""),
        (
            "[vastai]\nimage = \"x\"\napi_key = \"k\"\n",
            "\"vastai.api_key\"",
        ),
    ] {
        fs::write(&toml, format!("{text}\n{typo}")).unwrap();
        let out = run(
            COORDINATOR,
            &["serve", "--dir", d, "--listen", "127.0.0.1:0"],
        );
        assert_eq!(code(&out), Some(64), "{}", stderr(&out));
        assert!(stderr(&out).contains(named), "{}", stderr(&out));
    }
    let agent_toml = t.path().join("agent.toml");
    let ws = t.path().join("ws");
    let state = t.path().join("state");
    let common = format!(
        "workspace = {:?}\nstate_dir = {:?}\ntls_dir = \"/nonexistent\"\n",
        ws, state
    );
    // history is agent-cpu's: agent-gpu does not read it.
    for (program, extra, named) in [
        (
            AGENT_GPU,
            "peer = \"127.0.0.1:1\"\ndebounse = \"1s\"\n",
            "\"debounse\"",
        ),
        (
            AGENT_GPU,
            "peer = \"127.0.0.1:1\"\nhistory = true\n",
            "\"history\"",
        ),
        (AGENT_CPU, "keep_hourley = 3\n", "\"keep_hourley\""),
    ] {
        fs::write(&agent_toml, format!("{common}{extra}")).unwrap();
        let out = Command::new(program)
            .arg("--config")
            .arg(&agent_toml)
            .output()
            .unwrap();
        assert_eq!(code(&out), Some(64), "{}", stderr(&out));
        assert!(stderr(&out).contains(named), "{}", stderr(&out));
        assert!(!state.exists(), "{program} went ahead");
    }
}

/// Each non-empty line of `text` as a JSON log line (timestamp, level, fields.message).
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v["timestamp"].is_string(), "{l}");
            assert!(v["level"].is_string(), "{l}");
            assert!(v["fields"]["message"].is_string(), "{l}");
            v
        })
        .collect()
}

#[test]
fn log_format_json_for_all_three_programs() {
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &["--log-format", "json"]);
    let lines = json_lines(&coord.log_text());
    assert!(lines.iter().any(|l| l["level"] == "INFO"), "{lines:?}");

    let pki = Pki::new();
    let cpu = Cpu::start_with(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
        "127.0.0.1:0",
        &["--log-format", "json"],
        &[],
    );
    let ws = t.path().join("ws");
    fs::create_dir_all(&ws).unwrap();
    fs::write(ws.join("f"), b"x").unwrap();
    let gtls = pki.node("p", Role::Gpu);
    let gst = t.path().join("gpu");
    let out = Command::new(AGENT_GPU)
        .args(gpu_args(&ws, &gst, &gtls, &cpu.addr))
        .args(["--once", "--log-format", "json"])
        .env("STANDBY_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!json_lines(&stderr(&out)).is_empty());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files_changed"], 1, "{report}");
    let cpu_lines = json_lines(&cpu.log_text());
    assert!(
        cpu_lines.iter().any(|l| l["level"] == "INFO"),
        "{cpu_lines:?}"
    );

    // The environment variable does the same, and the final error is a JSON line too.
    let out = Command::new(AGENT_GPU)
        .args(gpu_args(&ws, &gst, &gtls, "127.0.0.1:1"))
        .arg("--once")
        .env("STANDBY_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let lines = json_lines(&stderr(&out));
    assert_eq!(lines.last().unwrap()["level"], "ERROR", "{lines:?}");
}

#[test]
fn completions_and_manual_pages() {
    for (shell, marker) in [
        ("bash", "_coordinator()"),
        ("zsh", "#compdef coordinator"),
        ("fish", "complete -c coordinator"),
    ] {
        let out = run(COORDINATOR, &["completions", shell]);
        assert_eq!(code(&out), Some(0), "{shell}: {}", stderr(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("serve") && script.contains("log-format"),
            "{shell}"
        );
    }
    assert_eq!(code(&run(COORDINATOR, &["completions", "tcsh"])), Some(64));

    let out = run(COORDINATOR, &["man"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH coordinator 1"), "{page}");
    assert!(page.contains(standby::cli::EXIT_CODES), "{page}");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("man1");
    let out = run(COORDINATOR, &["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let serve = fs::read_to_string(dir.join("coordinator-serve.1")).unwrap();
    assert!(serve.contains("provider"), "{serve}");
    assert!(dir.join("coordinator-pair-create.1").exists());
}
