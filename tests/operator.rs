//! What an operator's tools see of running programs: the coordinator's status page in a real
//! headless Chromium (the DOM it builds, and a screenshot kept under `target/status-page/`), and
//! the readiness notices systemd would get (`READY=1`, `STOPPING=1`) on a unix datagram socket
//! that stands in for `$NOTIFY_SOCKET`.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A pair of managed agents, Syncing.
struct Pair {
    gpu: Managed,
    _cpu: Managed,
}

fn pair(coord: &Coord, t: &Path, name: &str, gpu_env: &[(&str, &str)]) -> Pair {
    let ws = t.join(format!("{name}-ws"));
    fs::create_dir_all(&ws).unwrap();
    fs::write(ws.join("train.py"), b"print('training')\n").unwrap();
    let cpu = Managed::cpu(
        &coord.addr,
        Some(&coord.token(name, "cpu", "10m")),
        &t.join(format!("{name}-replica")),
        &t.join(format!("{name}-cpu")),
        &[],
    );
    let gpu = Managed::gpu(
        &coord.addr,
        Some(&coord.token(name, "gpu", "10m")),
        &ws,
        &t.join(format!("{name}-gpu")),
        &["--debounce", "100ms"],
        gpu_env,
    );
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Syncing")
    });
    assert!(
        ok,
        "pair {name} did not reach Syncing:\n{}\n{}\n{}",
        coord.log_text(),
        gpu.log_text(),
        cpu.log_text()
    );
    Pair { gpu, _cpu: cpu }
}

fn epoch(coord: &Coord, name: &str) -> u64 {
    coord.pair(name).unwrap()["epoch"].as_u64().unwrap()
}

/// Chromium, or None (skip) outside CI when it is not installed; with CI=true it must be.
fn chromium() -> Option<&'static str> {
    for prog in ["chromium", "chromium-browser"] {
        if Command::new(prog).arg("--version").output().is_ok() {
            return Some(prog);
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "chromium is required with CI=true (apt-get install chromium; .ci/run installs it)"
    );
    eprintln!("skipped: chromium not installed (apt-get install chromium)");
    None
}

/// Runs headless Chromium on `url` with `what` (`--dump-dom`, `--screenshot=...`); its stdout.
fn browse(prog: &str, profile: &Path, what: &str, url: &str) -> String {
    let t = Instant::now();
    let out = Command::new(prog)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args([what, url])
        .output()
        .unwrap();
    eprintln!("chromium {what}: {:?}", t.elapsed());
    assert!(
        out.status.success(),
        "chromium {what} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shots() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page");
    fs::create_dir_all(&d).unwrap();
    d
}

/// The row the page shows for `name`: pair, state and epoch cells, as Chromium serialises them.
fn row(name: &str, state: &str, epoch: u64) -> String {
    format!(
        "<td class=\"pair\">{name}</td><td class=\"state\">{state}</td><td class=\"epoch\">{epoch}</td>"
    )
}

#[test]
fn the_status_page_shows_pairs_in_a_real_browser() {
    let Some(chrome) = chromium() else { return };
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &["--status-listen", "127.0.0.1:0"]);
    let status = fs::read_to_string(coord.dir.join("status.addr")).unwrap();
    let url = format!("http://{status}/");
    let _p = pair(&coord, t.path(), "alpha", &[]);
    let profile = t.path().join("chromium");
    let e = epoch(&coord, "alpha");
    let dom = browse(chrome, &profile, "--dump-dom", &url);
    assert!(dom.contains(&row("alpha", "Syncing", e)), "{dom}");
    assert!(
        dom.contains("<td class=\"ok\">yes</td>"),
        "protected: {dom}"
    );
    let shot = shots().join("syncing.png");
    browse(
        chrome,
        &profile,
        &format!("--screenshot={}", shot.display()),
        &url,
    );
    assert!(
        fs::metadata(&shot).unwrap().len() > 1000,
        "{}",
        shot.display()
    );

    // A failover (by hand: the provider is `none`, so the pair stays FailedOver).
    assert!(coord.admin(&["failover", "alpha"]).status.success());
    assert!(wait_until(Duration::from_secs(30), || {
        coord
            .pair("alpha")
            .is_some_and(|p| p["state"] == "FailedOver")
    }));
    let e2 = epoch(&coord, "alpha");
    assert!(e2 > e);
    let dom = browse(chrome, &profile, "--dump-dom", &url);
    assert!(dom.contains(&row("alpha", "FailedOver", e2)), "{dom}");
    assert!(
        dom.contains("<td class=\"bad\">no</td>"),
        "unprotected: {dom}"
    );
    assert!(dom.contains("<h3>alpha (total: under way)</h3>"), "{dom}");
    assert!(
        dom.contains("<td>failover</td><td>FailedOver</td>"),
        "{dom}"
    );
    let shot = shots().join("failed-over.png");
    browse(
        chrome,
        &profile,
        &format!("--screenshot={}", shot.display()),
        &url,
    );
    assert!(
        fs::metadata(&shot).unwrap().len() > 1000,
        "{}",
        shot.display()
    );

    let raw = http_get(&status, "/");
    let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(raw.contains("<meta http-equiv=\"refresh\""), "{raw}");
    let json = http_get(&status, "/status.json");
    let body = json.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["pairs"][0]["state"], "FailedOver");
    assert_eq!(v["pairs"][0]["epoch"], e2);
}

/// Text from agents is data: a page made with a `<script>` in a reason, a machine name and an
/// event shows it as text, and Chromium's DOM holds no script element.
#[test]
fn hostile_text_is_shown_as_text_in_a_real_browser() {
    use standby::control::status::{Status, page};
    use standby::proto::{Event, EventKind, MachineView, PairState, PairView};
    let Some(chrome) = chromium() else { return };
    let evil = "<script>document.title='owned'</script>";
    let view = PairView {
        pair: "p".into(),
        state: PairState::Degraded.into(),
        epoch: 3,
        reason: evil.into(),
        gpu: Some(MachineView {
            machine: evil.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let event = Event {
        unix_ms: 1,
        pair: "p".into(),
        kind: EventKind::Refused.into(),
        message: evil.into(),
        ..Default::default()
    };
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("page.html");
    fs::write(&file, page(&Status::build(vec![view], &[event], 1))).unwrap();
    let dom = browse(
        chrome,
        &t.path().join("chromium"),
        "--dump-dom",
        &format!("file://{}", file.display()),
    );
    assert!(!dom.contains("<script"), "{dom}");
    assert!(!dom.contains("owned</title>"), "{dom}");
    let shown = "&lt;script&gt;document.title='owned'&lt;/script&gt;";
    assert_eq!(dom.matches(shown).count(), 3, "{dom}");
}

fn listen(path: &Path) -> UnixDatagram {
    let s = UnixDatagram::bind(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn next(s: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).expect("no notice within 30 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn the_programs_tell_systemd_when_they_serve_and_when_they_stop() {
    let t = tempfile::tempdir().unwrap();
    let coord_sock = t.path().join("coord.notify");
    let gpu_sock = t.path().join("gpu.notify");
    let coord_rx = listen(&coord_sock);
    let gpu_rx = listen(&gpu_sock);
    let sock = coord_sock.to_str().unwrap();
    let mut coord = Coord::start_env(&t.path().join("coord"), &[], &[("NOTIFY_SOCKET", sock)]);
    // `start_env` returned once serve.addr was written: READY=1 follows it at once.
    assert_eq!(next(&coord_rx), "READY=1\n");
    let p = pair(
        &coord,
        t.path(),
        "beta",
        &[("NOTIFY_SOCKET", gpu_sock.to_str().unwrap())],
    );
    assert_eq!(next(&gpu_rx), "READY=1\n");
    signal(p.gpu.pid(), libc::SIGTERM);
    assert_eq!(next(&gpu_rx), "STOPPING=1\n");
    let pid = coord.proc.as_ref().unwrap().0.id() as i32;
    signal(pid, libc::SIGTERM);
    assert_eq!(next(&coord_rx), "STOPPING=1\n");
    coord.kill();
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}
