//! Real etcd members on loopback for the tests (random free ports, data in a temporary
//! directory), or all inside one network namespace on its address, killed when dropped. Shared by the library's unit tests (`control::store::etcd`
//! includes this file) and the end-to-end tests. Without an `etcd` binary the tests skip with a printed
//! reason, unless `CI=true`, where they fail.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub members: Vec<Member>,
    tls: Option<Tls>,
    /// The network namespace the members run in (None: this one); the test's own client
    /// calls go there too ([`on_net`]).
    ns: Option<String>,
    _dir: tempfile::TempDir,
}

pub struct Member {
    pub client: String,
    bin: PathBuf,
    ns: Option<String>,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `etcd` binary, or None (after saying why) when the test should skip.
fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "etcd is not installed (apt-get install etcd-server); CI=true requires it"
        );
        eprintln!("SKIPPED: etcd is not installed (apt-get install etcd-server)");
    }
    found
}

/// Client TLS on the members: their CA, their certificate and key (PEM files); clients must
/// present a certificate of that CA (`--client-cert-auth`), as `client` (cert, key) does.
#[derive(Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Cluster {
    /// Starts `n` members and waits until the cluster answers; None when etcd is missing.
    pub fn start(n: usize) -> Option<Cluster> {
        Self::start_with(n, None)
    }

    /// The same, with client TLS (`https://` client URLs) when given.
    pub fn start_with(n: usize, tls: Option<Tls>) -> Option<Cluster> {
        Self::start_at(n, tls, None)
    }

    /// `n` members inside network namespace `ns` (made by the test), on its address `ip`, with
    /// ports from 2379 up (the namespace is the test's own).
    pub fn start_in(n: usize, ns: &str, ip: &str) -> Option<Cluster> {
        Self::start_at(n, None, Some((ns.to_string(), ip.to_string())))
    }

    fn start_at(n: usize, tls: Option<Tls>, place: Option<(String, String)>) -> Option<Cluster> {
        let bin = etcd_binary()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = tempfile::tempdir().expect("tempdir");
        let (ns, ip) = match place {
            Some((ns, ip)) => (Some(ns), ip),
            None => (None, "127.0.0.1".to_string()),
        };
        let port = |i: usize, k: usize| match ns {
            Some(_) => 2379 + 2 * i as u16 + k as u16,
            None => free_port(),
        };
        let peers: Vec<(String, String, String)> = (0..n)
            .map(|i| {
                (
                    format!("m{i}"),
                    format!("{scheme}://{ip}:{}", port(i, 0)),
                    format!("http://{ip}:{}", port(i, 1)),
                )
            })
            .collect();
        let initial: Vec<String> = peers.iter().map(|(n, _, p)| format!("{n}={p}")).collect();
        let mut members = Vec::new();
        for (name, client, peer) in &peers {
            let data = dir.path().join(name);
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=standby-test".into(),
            ];
            if let Some(t) = &tls {
                args.extend([
                    format!("--cert-file={}", t.cert.display()),
                    format!("--key-file={}", t.key.display()),
                    format!("--trusted-ca-file={}", t.ca.display()),
                    "--client-cert-auth".into(),
                ]);
            }
            let mut m = Member {
                client: client.clone(),
                bin: bin.clone(),
                ns: ns.clone(),
                child: None,
                args,
                log: dir.path().join(format!("{name}.log")),
            };
            m.start();
            members.push(m);
        }
        let c = Cluster {
            members,
            tls,
            ns,
            _dir: dir,
        };
        c.wait_healthy(Duration::from_secs(30));
        Some(c)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// A client's options: the cluster's own certificate as the client's, with TLS.
    fn options(&self) -> Option<etcd_client::ConnectOptions> {
        let t = self.tls.as_ref()?;
        let read = |p: &PathBuf| std::fs::read(p).expect("TLS file");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)))
            .identity(etcd_client::Identity::from_pem(read(&t.cert), read(&t.key)));
        Some(etcd_client::ConnectOptions::new().with_tls(tls))
    }

    /// `f` with a plain client of the cluster, on a runtime of its own.
    fn with_client<T: Send>(&self, f: impl AsyncFnOnce(&mut etcd_client::Client) -> T + Send) -> T {
        on_net(self.ns.as_deref(), || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut c = etcd_client::Client::connect(self.endpoints(), None)
                    .await
                    .expect("etcd");
                f(&mut c).await
            })
        })
    }

    /// etcd's current revision: it grows with every write.
    pub fn revision(&self) -> i64 {
        self.with_client(async |c| {
            let r = c.get("/", None).await.expect("etcd get");
            r.header().expect("a header").revision()
        })
    }

    /// The keys written after revision `since`, with their revisions (deleted keys are not
    /// listed).
    pub fn written_since(&self, since: i64) -> Vec<(String, i64)> {
        self.with_client(async |c| {
            let opts = etcd_client::GetOptions::new().with_prefix();
            let r = c.get("/", Some(opts)).await.expect("etcd get");
            r.kvs()
                .iter()
                .filter(|kv| kv.mod_revision() > since)
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.mod_revision(),
                    )
                })
                .collect()
        })
    }

    /// The member raft elected leader, as the members that answer say (None: none says so).
    pub fn leader_index(&self) -> Option<usize> {
        on_net(self.ns.as_deref(), || self.leader_here())
    }

    fn leader_here(&self) -> Option<usize> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for (i, ep) in self.endpoints().iter().enumerate() {
                let Ok(mut c) = etcd_client::Client::connect([ep], self.options()).await else {
                    continue;
                };
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
                else {
                    continue;
                };
                if s.header().map(|h| h.member_id()) == Some(s.leader()) {
                    return Some(i);
                }
            }
            None
        })
    }

    /// Waits until a put through any member succeeds (a leader is elected).
    fn wait_healthy(&self, limit: Duration) {
        on_net(self.ns.as_deref(), || self.wait_healthy_here(limit))
    }

    fn wait_healthy_here(&self, limit: Duration) {
        let end = Instant::now() + limit;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let eps = self.endpoints();
        loop {
            let ok = rt.block_on(async {
                let Ok(mut c) = etcd_client::Client::connect(&eps, self.options()).await else {
                    return false;
                };
                let put = c.put("/health-probe", "x", None);
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), put).await,
                    Ok(Ok(_))
                )
            });
            if ok {
                return;
            }
            if Instant::now() > end {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
                    .collect();
                panic!("etcd did not become healthy:\n{}", logs.join("\n---\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Member {
    /// The running member's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
    }

    /// Starts it again on its data directory (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `f` here, or with `ns` on a thread of its own inside that network namespace: sockets it
/// opens live there (and threads it starts inherit the namespace).
pub fn on_net<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    let Some(ns) = ns else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .expect("a thread inside a network namespace")
    })
}

/// Moves the calling thread into network namespace `ns` (`/run/netns/<ns>`).
pub fn enter_netns(ns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("the namespace");
    // SAFETY: setns on a descriptor we hold open; it changes only this thread's namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns into {ns}: {}", std::io::Error::last_os_error());
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}
