//! What the benchmarks share: a fresh filesystem to run on, a throwaway sshd for rsync on
//! loopback, rsync itself, knobs from the environment, and the meters the benchmarks read: bytes
//! a filesystem's block device wrote, bytes a process wrote, bytes over loopback.
// Each benchmark uses a part of this; what one of them leaves unused is not an error.
#![allow(dead_code)]

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
        Self::mount_with("16G", &[])
    }

    /// A filesystem whose block device counts only what is written to it from now on: inode
    /// tables and journal initialised by mkfs, not by a background thread during the run (one
    /// inode per `bytes_per_inode`). For [`FreshFs::written`].
    pub fn mount_quiet(size: &str, bytes_per_inode: u64) -> Option<FreshFs> {
        let i = bytes_per_inode.to_string();
        Self::mount_with(
            size,
            &["-E", "lazy_itable_init=0,lazy_journal_init=0", "-i", &i],
        )
    }

    fn mount_with(size: &str, mkfs: &[&str]) -> Option<FreshFs> {
        if unsafe { libc::geteuid() } != 0 {
            println!("not root: running in the temporary directory");
            return None;
        }
        let img = tempfile::tempdir().ok()?;
        let file = img.path().join("fs.img");
        let mnt = img.path().join("mnt");
        fs::create_dir(&mnt).ok()?;
        let ok = Command::new("truncate")
            .args(["-s", size])
            .arg(&file)
            .status()
            .ok()?
            .success()
            && Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .args(mkfs)
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

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Bytes the filesystem's block device has written so far (sectors written, from
    /// `/sys/block/<loop>/stat`): data, metadata and journal, once they reach the device. `sync`
    /// this filesystem first to count what is still in the page cache.
    pub fn written(&self) -> u64 {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "--target"])
            .arg(&self.mnt)
            .output()
            .expect("findmnt");
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let name = dev.rsplit('/').next().unwrap_or_default();
        let stat = fs::read_to_string(format!("/sys/block/{name}/stat"))
            .unwrap_or_else(|e| panic!("/sys/block/{name}/stat ({dev}): {e}"));
        let sectors: u64 = stat
            .split_whitespace()
            .nth(6)
            .and_then(|v| v.parse().ok())
            .expect("sectors written");
        sectors * 512
    }

    /// Writes back everything this filesystem holds in memory (data, metadata, journal).
    pub fn sync(&self) {
        let st = Command::new("sync").arg("-f").arg(&self.mnt).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "sync -f {}",
            self.mnt.display()
        );
    }
}

impl Drop for FreshFs {
    fn drop(&mut self) {
        // A process that just died (a killed agent, an ssh session) can hold the mount for a
        // moment: retry, then detach it lazily rather than leave a 16 GiB image behind.
        for _ in 0..20 {
            let done = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
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
    let r = rsync_stats(s, src, dst, extra);
    (r.time, r.sent)
}

/// One rsync run: wall time and its `--stats` totals.
pub struct Rsync {
    pub time: Duration,
    /// "Total bytes sent": the sending side's protocol bytes (file list, literals, matches).
    pub sent: u64,
    /// "Total bytes received": what the receiving side sent back (block checksums).
    pub received: u64,
}

pub fn rsync_stats(s: &Sshd, src: &Path, dst: &Path, extra: &[&str]) -> Rsync {
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
    let total = |what: &str| {
        stats
            .lines()
            .find(|l| l.starts_with(what))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().replace(',', "").parse().unwrap_or(0))
            .unwrap_or(0)
    };
    Rsync {
        time: d,
        sent: total("Total bytes sent:"),
        received: total("Total bytes received:"),
    }
}

/// Moves this process into a network namespace of its own with only loopback up, so that
/// [`loopback_bytes`] counts exactly the traffic of the tools it starts (TCP/IP headers, TLS or
/// SSH framing included). Call it first, before any thread starts: children inherit it. False
/// (and nothing changed) when that is not possible, e.g. not root.
pub fn own_loopback() -> bool {
    if unsafe { libc::geteuid() } != 0 || unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!("no network namespace of its own: bytes on the wire are not measured");
        return false;
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        up,
        "ip link set lo up (in the benchmark's own network namespace)"
    );
    println!("in a network namespace of its own: loopback bytes are the tools' traffic");
    true
}

/// Bytes sent over loopback in this process's network namespace (each byte crosses it once).
pub fn loopback_bytes() -> u64 {
    let dev = fs::read_to_string("/proc/self/net/dev").expect("/proc/self/net/dev");
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|v| v.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .expect("lo in /proc/self/net/dev")
}

/// Bytes a process has caused to be written to storage (`write_bytes` of `/proc/<pid>/io`).
pub fn process_write_bytes(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/<pid>/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes")
}

/// The median of a non-empty list (the lower middle of an even one).
pub fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    s[(s.len() - 1) / 2]
}

pub fn settle() {
    // Start each measurement without the previous one's write-back in flight.
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// A continuous agent-gpu on `src` (state `<dir>/gpu`, log `<dir>/gpu.log`) replicating to
/// `peer`, once its first flush returned: everything in `src` is durable on the standby.
/// Returns the agent, its state directory and how long that took from its start.
pub fn continuous_gpu(
    dir: &Path,
    src: &Path,
    tls: &Path,
    peer: &str,
    extra: &[String],
) -> (Proc, PathBuf, Duration) {
    let gst = dir.join("gpu");
    let t0 = Instant::now();
    let gpu = Proc(
        Command::new(crate::common::AGENT_GPU)
            .args(crate::common::gpu_args(src, &gst, tls, peer))
            .args(extra)
            .stderr(fs::File::create(dir.join("gpu.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let sock = standby::agent::socket::socket_path(&gst);
    assert!(
        crate::common::wait_until(Duration::from_secs(600), || sock.exists()),
        "agent-gpu never opened its control socket"
    );
    let out = crate::common::flush(&gst, "30m");
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "first flush failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(dir.join("gpu.log")).unwrap_or_default()
    );
    (gpu, gst, took)
}
