//! The Python client (`clients/python`, the `standby` package) against a real static pair:
//! pip installs the package into a fresh virtualenv and runs its pytest suite, which writes into
//! the workspace, calls `standby.flush()` and checks the bytes on agent-cpu's replica, reads
//! `standby.status()`, freezes agent-cpu (SIGSTOP) to see `flush()` time out with the last
//! flushed data intact, and runs the Lightning and Hugging Face callbacks' hooks (with stand-ins
//! for the libraries, which take too long to install) against the pair.
//!
//! The virtualenv installs `tests/python/requirements-client.txt` (from `STANDBY_WHEELHOUSE`
//! when set, as `.ci/run` does, else from the package index). Without `python3 -m venv` or the
//! packages it skips with a printed reason; under `CI=true` it fails.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use standby::trust::identity::Role;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Runs `cmd`; its output as the error when it cannot start or fails.
fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{:?} exited {}: {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// `python -m pip install ARGS`, from the wheelhouse when there is one.
fn pip(python: &Path, args: &[&std::ffi::OsStr]) -> Result<Output, String> {
    let mut pip = Command::new(python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(args);
    if let Some(wheels) = std::env::var_os("STANDBY_WHEELHOUSE") {
        // Also where pip finds the build backend (setuptools) for the client.
        pip.args(["--no-index", "--find-links"]).arg(wheels);
    }
    run(&mut pip)
}

/// A virtualenv under `dir` with pytest and the client installed from a copy of
/// `clients/python` (so pip's build leaves nothing in the source tree); returns its python and
/// the copy.
fn make_python(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let venv = dir.join("venv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .map_err(|e| format!("python3 -m venv does not work (install python3-venv): {e}"))?;
    let python = venv.join("bin/python");
    let reqs = Path::new(ROOT).join("tests/python/requirements-client.txt");
    pip(&python, &["-r".as_ref(), reqs.as_os_str()])
        .map_err(|e| format!("pip could not install pytest: {e}"))?;
    let client = dir.join("client");
    copy_tree(&Path::new(ROOT).join("clients/python"), &client);
    // The package is ours: failing to install it is this test failing, in or out of CI.
    pip(&python, &[client.as_os_str()])
        .unwrap_or_else(|e| panic!("pip could not install clients/python: {e}"));
    Ok((python, client))
}

/// Waits until agent-gpu answers on its control socket.
fn wait_socket(state: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = Command::new(AGENT_GPU)
            .args(["status", "--state-dir"])
            .arg(state)
            .output()
            .unwrap();
        if st.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent-gpu did not start: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn python_client_flushes_to_a_real_pair() {
    const TEST: &str = "python_client_flushes_to_a_real_pair";
    let t = tempfile::tempdir().unwrap();
    let (python, client) = match make_python(t.path()) {
        Ok(p) => p,
        Err(why) if ci() => panic!("{TEST}: {why}, and CI=true requires this test to run"),
        Err(why) => {
            eprintln!("{TEST}: skipped: {why} (CI=true makes this a failure)");
            return;
        }
    };
    let pki = Pki::new();
    let cpu = Cpu::start(
        &t.path().join("replica"),
        &t.path().join("cpu"),
        &pki.node("p", Role::Cpu),
    );
    let (ws, gst) = (t.path().join("ws"), t.path().join("gpu"));
    fs::create_dir_all(&ws).unwrap();
    let log = t.path().join("gpu.log");
    let _gpu = Proc(
        Command::new(AGENT_GPU)
            .args(gpu_args(&ws, &gst, &pki.node("p", Role::Gpu), &cpu.addr))
            .args(["--debounce", "100ms"])
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_socket(&gst, &log);

    let out = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-v",
            "-rs",
            "--durations=6",
            "tests",
        ])
        .current_dir(&client)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("STANDBY_STATE_DIR", &gst)
        .env("STANDBY_TEST_WORKSPACE", &ws)
        .env("STANDBY_TEST_STATE_DIR", &gst)
        .env("STANDBY_TEST_REPLICA", &cpu.workspace)
        .env("STANDBY_TEST_CPU_PID", cpu.child.id().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "pytest failed (above); agent-gpu's log: {}\nagent-cpu's log: {}",
        fs::read_to_string(&log).unwrap_or_default(),
        cpu.log_text()
    );
    // Every test ran against the pair: none skipped.
    assert!(!report.contains("SKIPPED"), "{report}");
    assert!(report.contains("test_flush_times_out_while_the_standby_is_stopped PASSED"));
    // What the tests left in the workspace is on the replica, exactly.
    let flushed = Command::new(AGENT_GPU)
        .args(["flush", "--state-dir"])
        .arg(&gst)
        .output()
        .unwrap();
    assert!(flushed.status.success(), "{flushed:?}");
    assert_same(&ws, &cpu.workspace);
}
