//! What the benchmarks share: a fresh filesystem to run on, a throwaway sshd for rsync on
//! loopback, rsync itself, and knobs from the environment.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Proc;

pub fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// A fresh ext4 filesystem in a sparse image, loop-mounted for the run.
/// Where a benchmark puts its data: `STANDBY_BENCH_DIR`, else a fresh ext4 image (as root),
/// else the temporary directory. Keep the `FreshFs` for as long as the data is used.
pub fn base_dir() -> (Option<FreshFs>, PathBuf) {
    match std::env::var("STANDBY_BENCH_DIR") {
        Ok(d) => (None, PathBuf::from(d)),
        Err(_) => match FreshFs::mount() {
            Some(f) => {
                let p = f.mnt.clone();
                (Some(f), p)
            }
            None => (None, std::env::temp_dir()),
        },
    }
}

pub struct FreshFs {
    img: tempfile::TempDir,
    mnt: PathBuf,
}

impl FreshFs {
    pub fn mount() -> Option<FreshFs> {
        if unsafe { libc::geteuid() } != 0 {
            println!("not root: running in the temporary directory");
            return None;
        }
        let img = tempfile::tempdir().ok()?;
        let file = img.path().join("fs.img");
        let mnt = img.path().join("mnt");
        fs::create_dir(&mnt).ok()?;
        let ok = Command::new("truncate")
            .args(["-s", "16G"])
            .arg(&file)
            .status()
            .ok()?
            .success()
            && Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&file)
                .status()
                .ok()?
                .success()
            && Command::new("mount")
                .args(["-o", "loop"])
                .arg(&file)
                .arg(&mnt)
                .status()
                .ok()?
                .success();
        if !ok {
            println!("could not mount a fresh ext4 image: running in the temporary directory");
            return None;
        }
        println!("running on a fresh ext4 filesystem (loop-mounted image)");
        Some(FreshFs { img, mnt })
    }
}

impl Drop for FreshFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = &self.img;
    }
}

pub struct Sshd {
    pub child: Proc,
    port: u16,
    key: PathBuf,
}

pub fn sshd(dir: &Path) -> Sshd {
    fs::create_dir_all(dir).unwrap();
    fs::create_dir_all("/run/sshd").unwrap();
    let host = dir.join("host_key");
    let key = dir.join("client_key");
    for k in [&host, &key] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .status()
            .unwrap();
        assert!(st.success());
    }
    fs::copy(key.with_extension("pub"), dir.join("authorized_keys")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = dir.join("sshd_config");
    fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin yes\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile {}\nLogLevel ERROR\n",
            host.display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let child = Proc(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd (apt-get install openssh-server)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd { child, port, key }
}

/// Runs rsync; returns wall time and bytes it sent.
pub fn rsync(s: &Sshd, src: &Path, dst: &Path, extra: &[&str]) -> (Duration, u64) {
    let ssh = format!(
        "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        s.port,
        s.key.display()
    );
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["-a", "--delete", "--stats", "-e", &ssh])
        .args(extra)
        .arg(format!("{}/", src.display()))
        .arg(format!("root@127.0.0.1:{}/", dst.display()))
        .output()
        .unwrap();
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = String::from_utf8_lossy(&out.stdout);
    let sent = stats
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().replace(',', "").parse().unwrap_or(0))
        .unwrap_or(0);
    (d, sent)
}

pub fn settle() {
    // Start each measurement without the previous one's write-back in flight.
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}
