//! Support for end-to-end tests: certificates, the real agent binaries on loopback, seeded
//! trees, and exact snapshots of a directory (content, mode, mtime, link target).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use standby::trust::identity::{Identity, Role};
use standby::trust::pki::Ca;

pub const AGENT_GPU: &str = env!("CARGO_BIN_EXE_agent-gpu");
pub const AGENT_CPU: &str = env!("CARGO_BIN_EXE_agent-cpu");
pub const COORDINATOR: &str = env!("CARGO_BIN_EXE_coordinator");

/// A seed from `STANDBY_TEST_SEED` or the clock, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("STANDBY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {s} (replay with STANDBY_TEST_SEED={s})");
    s
}

/// A CA and the certificates of one or more pairs, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
        standby::trust::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        ca.save(&dir.path().join("ca")).unwrap();
        Pki { dir, ca }
    }

    /// Writes the certificate of `pair`/`role` and returns its TLS directory.
    pub fn node(&self, pair: &str, role: Role) -> PathBuf {
        let out = self.dir.path().join(format!("{pair}-{role}"));
        if !out.exists() {
            self.ca
                .issue(&Identity::node(pair, role).unwrap(), 30)
                .unwrap()
                .write_dir(&out)
                .unwrap();
        }
        out
    }
}

/// A running agent-cpu.
pub struct Cpu {
    pub child: Child,
    pub workspace: PathBuf,
    pub state: PathBuf,
    pub tls: PathBuf,
    pub addr: String,
    pub log: PathBuf,
}

impl Cpu {
    pub fn start(workspace: &Path, state: &Path, tls: &Path) -> Cpu {
        Self::start_on(workspace, state, tls, "127.0.0.1:0")
    }

    pub fn start_on(workspace: &Path, state: &Path, tls: &Path, listen: &str) -> Cpu {
        fs::create_dir_all(state).unwrap();
        let addr_file = state.join("listen.addr");
        let _ = fs::remove_file(&addr_file);
        let log = state.with_extension("log");
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(AGENT_CPU)
            .arg("--workspace")
            .arg(workspace)
            .arg("--state-dir")
            .arg(state)
            .arg("--tls-dir")
            .arg(tls)
            .arg("--listen")
            .arg(listen)
            .env(
                "STANDBY_LOG",
                std::env::var("STANDBY_TEST_CPU_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut cpu = Cpu {
            child,
            workspace: workspace.to_path_buf(),
            state: state.to_path_buf(),
            tls: tls.to_path_buf(),
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(a) = fs::read_to_string(&addr_file)
                && !a.is_empty()
            {
                cpu.addr = a;
                break;
            }
            if let Ok(Some(st)) = cpu.child.try_wait() {
                panic!("agent-cpu exited with {st}: {}", cpu.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent-cpu did not start: {}",
                cpu.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cpu
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Restarts on the same address (the sender keeps its peer URL).
    pub fn restart(&mut self) {
        self.kill();
        let addr = self.addr.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Cpu::start_on(&self.workspace, &self.state, &self.tls, &addr)
            }));
            match next {
                Ok(c) => {
                    *self = c; // the old process is already gone
                    return;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }
}

impl Drop for Cpu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process killed when dropped (a failing test never leaves agents behind).
pub struct Proc(pub Child);

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Arguments of agent-gpu for a static pair.
pub fn gpu_args(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> Vec<String> {
    vec![
        "--workspace".into(),
        workspace.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--tls-dir".into(),
        tls.display().to_string(),
        "--peer".into(),
        peer.to_string(),
    ]
}

/// `agent-gpu --once`; returns the parsed report, or panics with stderr.
pub fn once(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> serde_json::Value {
    let out = once_raw(workspace, state, tls, peer);
    if std::env::var_os("STANDBY_TEST_SHOW_LOGS").is_some() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "agent-gpu --once failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON line expected: {stdout}"
    );
    serde_json::from_str(&stdout).unwrap()
}

pub fn once_raw(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> Output {
    Command::new(AGENT_GPU)
        .args(gpu_args(workspace, state, tls, peer))
        .arg("--once")
        .output()
        .unwrap()
}

pub fn spawn_once(workspace: &Path, state: &Path, tls: &Path, peer: &str) -> Proc {
    Proc(
        Command::new(AGENT_GPU)
            .args(gpu_args(workspace, state, tls, peer))
            .arg("--once")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// What a snapshot records of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { mode: u32, mtime: i64, hash: String },
    Dir { mode: u32, mtime: i64 },
    Link { target: Vec<u8>, mtime: i64 },
}

pub type Snapshot = BTreeMap<Vec<u8>, Node>;

/// Every path below `root` (not `root` itself), skipping the names in `skip` at the top.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        if rel == b".standby-stage" {
            continue;
        }
        let m = fs::symlink_metadata(&p).unwrap();
        let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
        let node = if m.file_type().is_symlink() {
            Node::Link {
                target: fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec(),
                mtime,
            }
        } else if m.is_dir() {
            walk(root, &p, out);
            Node::Dir {
                mode: m.mode() & 0o7777,
                mtime,
            }
        } else {
            Node::File {
                mode: m.mode() & 0o7777,
                mtime,
                hash: blake3::Hasher::new()
                    .update_mmap(&p)
                    .unwrap()
                    .finalize()
                    .to_hex()
                    .to_string(),
            }
        };
        out.insert(rel, node);
    }
}

/// A readable account of how two snapshots differ (empty when equal).
pub fn diff(a: &Snapshot, b: &Snapshot) -> String {
    let mut s = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => s += &format!("only in first: {}\n", String::from_utf8_lossy(k)),
            Some(w) if w != v => {
                s += &format!("differs: {}: {v:?} vs {w:?}\n", String::from_utf8_lossy(k))
            }
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            s += &format!("only in second: {}\n", String::from_utf8_lossy(k));
        }
    }
    if s.len() > 4000 {
        s.truncate(4000);
        s += "...";
    }
    s
}

pub fn assert_same(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let d = diff(&sa, &sb);
    assert!(
        d.is_empty(),
        "{} and {} differ:\n{d}",
        a.display(),
        b.display()
    );
}

/// Deterministic pseudo-random bytes (fast).
pub fn bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Compressible text-like bytes.
pub fn text(rng: &mut StdRng, n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "epoch",
        "loss",
        "step",
        "grad",
        "0.0031",
        "checkpoint",
        "weights",
        "layer",
        "\n",
    ];
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
        v.push(b' ');
    }
    v.truncate(n);
    v
}

pub fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// Files staged in a receiver's stage directory (below its bucket directories).
pub fn staged_files(stage: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(stage).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            for f in fs::read_dir(e.path()).unwrap() {
                eprintln!("staged: {}", f.unwrap().path().display());
                n += 1;
            }
        } else {
            eprintln!("staged: {}", e.path().display());
            n += 1;
        }
    }
    n
}

/// A varied tree: nested directories, `n_small` small files (some compressible), the given big
/// files, unicode and spaces in names, symlinks (relative, absolute, dangling), modes, empty
/// directories. Mtimes are set to fixed past values so the tree is exactly reproducible.
pub fn make_tree(root: &Path, rng: &mut StdRng, n_small: usize, big: &[usize]) {
    fs::create_dir_all(root).unwrap();
    let dirs = [
        "",
        "src",
        "src/models",
        "data/train",
        "data/val",
        "runs/exp 1",
        "ünïcødé/日本語",
        "deep/a/b/c/d/e/f",
    ];
    for d in dirs {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::create_dir_all(root.join("empty/also empty")).unwrap();
    for i in 0..n_small {
        let d = dirs[i % dirs.len()];
        let name = match i % 5 {
            0 => format!("file {i}.txt"),
            1 => format!("ñame-{i}.py"),
            2 => format!("x{i}"),
            3 => format!(".hidden{i}"),
            _ => format!("f{i}.bin"),
        };
        let size = rng.random_range(0..6000);
        let data = if i % 2 == 0 {
            text(rng, size)
        } else {
            bytes(rng, size)
        };
        let p = root.join(d).join(name);
        fs::write(&p, data).unwrap();
        let mode = [0o644, 0o600, 0o755, 0o444, 0o640][i % 5];
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(
            &p,
            1_700_000_000 + i as i64,
            (i as i64 * 7919) % 1_000_000_000,
        );
    }
    for (k, &n) in big.iter().enumerate() {
        let p = root.join(format!("data/big-{k}.bin"));
        write_big(&p, rng, n);
        set_mtime(&p, 1_700_100_000 + k as i64, 123);
    }
    symlink("src/models", root.join("models")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    symlink("../../data", root.join("runs/exp 1/data-link")).unwrap();
    set_mtime(&root.join("models"), 1_700_200_000, 5);
    fs::set_permissions(root.join("data/val"), fs::Permissions::from_mode(0o750)).unwrap();
    fix_dir_mtimes(root);
}

/// Writes `n` random bytes without holding them all in memory.
pub fn write_big(p: &Path, rng: &mut StdRng, n: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(p).unwrap());
    let mut left = n;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let k = left.min(buf.len());
        rng.fill(&mut buf[..k]);
        f.write_all(&buf[..k]).unwrap();
        left -= k;
    }
}

/// Sets every directory's mtime to a fixed value (deepest first), so trees are reproducible.
pub fn fix_dir_mtimes(root: &Path) {
    let mut dirs = Vec::new();
    collect_dirs(root, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for (i, d) in dirs.iter().enumerate() {
        set_mtime(d, 1_600_000_000 + i as i64, 0);
    }
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.push(e.path());
            collect_dirs(&e.path(), out);
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Whether privileged tests (tmpfs, network namespaces) can run; in CI they must.
pub fn privileged(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs root, and CI=true requires it to run");
        }
        eprintln!(
            "{test}: skipped: needs root (run as root, or with CI=true to make this a failure)"
        );
    }
    root
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A coordinator process with its directory (CA, admin certificate, state).
pub struct Coord {
    pub proc: Option<Proc>,
    pub dir: PathBuf,
    pub addr: String,
    pub metrics: String,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Coord {
    /// `coordinator init` in `dir`, then `serve` on loopback ports.
    pub fn start(dir: &Path, args: &[&str]) -> Coord {
        let st = Command::new(COORDINATOR)
            .args(["init", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut c = Coord {
            proc: None,
            dir: dir.to_path_buf(),
            addr: "127.0.0.1:0".into(),
            metrics: "127.0.0.1:0".into(),
            log: dir.join("coordinator.log"),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        c.serve();
        c
    }

    fn serve(&mut self) {
        let _ = fs::remove_file(self.dir.join("serve.addr"));
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(COORDINATOR)
            .args(["serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr, "--metrics-listen", &self.metrics])
            .args(if self.args.iter().any(|a| a == "--provider") {
                &[][..]
            } else {
                &["--provider", "none"][..]
            })
            .args(&self.args)
            .env("STANDBY_LOG", "info")
            .stderr(logf)
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
        let ok = wait_until(Duration::from_secs(30), || {
            fs::read_to_string(self.dir.join("serve.addr")).is_ok_and(|a| !a.is_empty())
        });
        assert!(
            ok,
            "coordinator did not start: {}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        self.addr = fs::read_to_string(self.dir.join("serve.addr")).unwrap();
        self.metrics = fs::read_to_string(self.dir.join("metrics.addr")).unwrap();
    }

    pub fn kill(&mut self) {
        self.proc.take();
    }

    /// Restarts on the same ports (agents keep their coordinator address).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve()));
            match r {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    pub fn token(&self, pair: &str, role: &str, ttl: &str) -> String {
        join_token(&self.dir, pair, role, ttl)
    }

    /// `coordinator pairs --json`.
    pub fn pairs(&self) -> Vec<serde_json::Value> {
        let out = self.admin(&["pairs", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn pair(&self, name: &str) -> Option<serde_json::Value> {
        self.pairs().into_iter().find(|p| p["pair"] == name)
    }

    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(COORDINATOR)
            .args(args)
            .args(["--server", &self.addr, "--tls-dir"])
            .arg(self.dir.join("admin"))
            .output()
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// More `serve` arguments from the next (re)start on.
    pub fn args_push(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|s| s.to_string()));
    }
}

/// `coordinator token` for the coordinator directory `dir`.
pub fn join_token(dir: &Path, pair: &str, role: &str, ttl: &str) -> String {
    let out = Command::new(COORDINATOR)
        .args(["token", "--dir"])
        .arg(dir)
        .args(["--pair", pair, "--role", role, "--ttl", ttl])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The scripts of the directory-backed test cloud (`tests/command-cloud/`).
pub fn command_cloud() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/command-cloud")
}

/// Writes `<dir>/coordinator.toml` pointing the `command` provider at the test cloud.
pub fn command_cloud_config(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let toml = dir.join("coordinator.toml");
    fs::write(
        &toml,
        format!(
            "[command]\ncreate = \"{0}/create\"\ndestroy = \"{0}/destroy\"\nlist = \"{0}/list\"\n\
             get = \"{0}/get\"\nsearch = [\"{0}/search\"]\ntimeout = \"30s\"\n",
            command_cloud().display()
        ),
    )
    .unwrap();
    toml
}

/// The machines of the test cloud under `cloud` (its directories; lock directories excluded).
pub fn cloud_machines(cloud: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(cloud)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A plain HTTP GET (the metrics endpoint).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// An agent managed by a coordinator.
pub struct Managed {
    pub proc: Proc,
    pub workspace: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Managed {
    fn start(
        bin: &str,
        role: &str,
        coord: &str,
        token: Option<&str>,
        (ws, state): (&Path, &Path),
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Managed {
        fs::create_dir_all(state).unwrap();
        let log = state.with_extension(format!("{role}.log"));
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--workspace")
            .arg(ws)
            .arg("--state-dir")
            .arg(state)
            .args(["--coordinator", coord, "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("STANDBY_LOG", "info")
            .stderr(logf);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Managed {
            proc: Proc(cmd.spawn().unwrap()),
            workspace: ws.to_path_buf(),
            state: state.to_path_buf(),
            log,
        }
    }

    pub fn gpu(
        coord: &str,
        token: Option<&str>,
        ws: &Path,
        state: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Managed {
        Self::start(AGENT_GPU, "gpu", coord, token, (ws, state), extra, env)
    }

    pub fn cpu(
        coord: &str,
        token: Option<&str>,
        ws: &Path,
        state: &Path,
        extra: &[&str],
    ) -> Managed {
        Self::start(AGENT_CPU, "cpu", coord, token, (ws, state), extra, &[])
    }

    pub fn pid(&self) -> i32 {
        self.proc.0.id() as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Kills the agents of the machines under a directory (`<dir>/<label>/pid`: the local
/// provider's layout, and the test cloud's) when a test ends, passed or not: they outlive the
/// coordinator by design.
pub struct MachineReaper(pub PathBuf);

impl Drop for MachineReaper {
    fn drop(&mut self) {
        standby::control::provider::local::Local::stop_all(&self.0);
    }
}

/// A pair joined by hand under `dir` (`gpu-ws`, `gpu-state`, `cpu-ws`, `cpu-state`): a seeded
/// tree of `n_small` files and a 1 MiB file, both agents started with join tokens, and the pair
/// `Syncing` with the tree flushed to the CPU. Returns (cpu, gpu).
pub fn hand_joined_pair(
    coord: &Coord,
    dir: &Path,
    name: &str,
    n_small: usize,
) -> (Managed, Managed) {
    let ws = dir.join("gpu-ws");
    make_tree(&ws, &mut rng(seed(name)), n_small, &[1 << 20]);
    let cpu = Managed::cpu(
        &coord.addr,
        Some(&coord.token(name, "cpu", "10m")),
        &dir.join("cpu-ws"),
        &dir.join("cpu-state"),
        &[],
    );
    let gpu = Managed::gpu(
        &coord.addr,
        Some(&coord.token(name, "gpu", "10m")),
        &ws,
        &dir.join("gpu-state"),
        &["--debounce", "100ms"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Syncing")
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(ok, "{}", coord.log_text());
    (cpu, gpu)
}

/// `agent-gpu flush` for a state directory.
pub fn flush(state: &Path, timeout: &str) -> Output {
    Command::new(AGENT_GPU)
        .args(["flush", "--state-dir"])
        .arg(state)
        .args(["--timeout", timeout])
        .output()
        .unwrap()
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[allow(dead_code)]
pub mod fake_gce;
#[allow(dead_code)]
pub mod fake_vast;
pub mod netns;
#[allow(dead_code)]
pub mod site;
