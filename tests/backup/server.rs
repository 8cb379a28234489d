//! moto's S3 server on loopback, in a virtualenv made once per test binary (pip-installed from
//! `tests/python/requirements-s3.txt`, from `STANDBY_WHEELHOUSE` when set, as `.ci/run` does).
//! Without it the tests skip with a printed reason; under `CI=true` they fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use standby::backup::{Bucket, BucketConfig, Credentials};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The `moto_server` program, or why there is none.
fn moto() -> Result<&'static Path, String> {
    static MOTO: OnceLock<Result<(tempfile::TempDir, PathBuf), String>> = OnceLock::new();
    MOTO.get_or_init(install)
        .as_ref()
        .map(|(_, p)| p.as_path())
        .map_err(Clone::clone)
}

fn install() -> Result<(tempfile::TempDir, PathBuf), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let venv = dir.path().join("venv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .map_err(|e| format!("python3 -m venv does not work (install python3-venv): {e}"))?;
    let started = Instant::now();
    let mut pip = Command::new(venv.join("bin/python"));
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-r",
    ])
    .arg(Path::new(ROOT).join("tests/python/requirements-s3.txt"));
    if let Some(wheels) = std::env::var_os("STANDBY_WHEELHOUSE") {
        pip.args(["--no-index", "--find-links"]).arg(wheels);
    }
    run(&mut pip).map_err(|e| format!("pip could not install moto[server]: {e}"))?;
    eprintln!(
        "moto[server] installed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((dir, venv.join("bin/moto_server")))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{:?} exited {}: {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A running moto server; killed when dropped.
pub struct S3 {
    child: Child,
    pub host: String,
    pub port: u16,
}

/// A server of its own for `test`, or None (with the reason printed) when moto cannot be had
/// outside CI.
pub fn start(test: &str) -> Option<S3> {
    let program = program(test)?;
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s3 = spawn(test, Command::new(program), "127.0.0.1", port);
    s3.wait_up();
    Some(s3)
}

/// The `moto_server` program, or None (with the reason printed) outside CI.
pub fn program(test: &str) -> Option<&'static Path> {
    match moto() {
        Ok(p) => Some(p),
        Err(why) if ci() => panic!("{test}: {why}, and CI=true requires this test to run"),
        Err(why) => {
            eprintln!("{test}: skipped: {why} (CI=true makes this a failure)");
            None
        }
    }
}

/// Starts moto with `cmd` (the program, or a wrapper such as `nsenter` that runs it) listening
/// on `host:port`; the caller waits for it from where it can reach it.
pub fn spawn(test: &str, mut cmd: Command, host: &str, port: u16) -> S3 {
    let child = cmd
        .args(["-H", host, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{test}: starting moto_server: {e}"));
    S3 {
        child,
        host: host.into(),
        port,
    }
}

impl S3 {
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Waits until the server takes connections (from this thread's network namespace).
    pub fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect((self.host.as_str(), self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes a bucket (moto's server takes an unsigned request).
    pub async fn create_bucket(&self, name: &str) {
        standby::trust::tls::install_default_provider();
        let r = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint()))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "creating bucket {name}: {}",
            r.status()
        );
    }

    /// The bucket `s3://name/prefix` on this server, with short timeouts so an outage shows
    /// quickly.
    pub fn bucket(&self, url: &str) -> Bucket {
        self.bucket_with_timeout(url, Duration::from_secs(3))
    }

    /// The bucket with another request timeout (a request must outlast its body's time on the
    /// link).
    pub fn bucket_with_timeout(&self, url: &str, timeout: Duration) -> Bucket {
        let mut cfg = BucketConfig::new(url);
        cfg.endpoint = Some(self.endpoint());
        cfg.region = Some("us-east-1".into());
        cfg.timeout = timeout;
        cfg.retries = 1;
        Bucket::open_with(&cfg, &creds()).unwrap()
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel, nothing answers.
    pub fn freeze(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

pub fn creds() -> Credentials {
    Credentials {
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        session_token: None,
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
