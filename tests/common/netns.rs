//! Network namespaces for multi-host tests: hosts joined by veth links that can be cut
//! (`ip link set down`) and shaped (`tc tbf`). Needs root and iproute2; everything lives in
//! namespaces this test created and is removed when dropped.

use std::process::{Command, Stdio};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Net {
    tag: String,
    namespaces: Vec<String>,
    pub links: Vec<Link>,
}

#[derive(Clone, Debug)]
pub struct Link {
    pub a: String,
    pub b: String,
    pub if_a: String,
    pub if_b: String,
    pub ip_a: String,
    pub ip_b: String,
}

impl Net {
    pub fn new() -> Net {
        let tag: String = format!("{:04x}", rand::random::<u16>());
        Net {
            tag,
            namespaces: Vec::new(),
            links: Vec::new(),
        }
    }

    /// The full name of host `name`'s namespace.
    pub fn ns(&self, name: &str) -> String {
        format!("sb{}-{name}", self.tag)
    }

    pub fn host(&mut self, name: &str) {
        let ns = self.ns(name);
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns);
    }

    /// Joins hosts `a` and `b` with a point-to-point link on 10.`subnet`.0.0/24.
    pub fn link(&mut self, a: &str, b: &str, subnet: u8) -> Link {
        let n = self.links.len();
        let (if_a, if_b) = (format!("v{}{n}a", self.tag), format!("v{}{n}b", self.tag));
        let (ns_a, ns_b) = (self.ns(a), self.ns(b));
        ip(&["link", "add", &if_a, "type", "veth", "peer", "name", &if_b]);
        ip(&["link", "set", &if_a, "netns", &ns_a]);
        ip(&["link", "set", &if_b, "netns", &ns_b]);
        let (ip_a, ip_b) = (format!("10.{subnet}.0.1"), format!("10.{subnet}.0.2"));
        ip(&[
            "-n",
            &ns_a,
            "addr",
            "add",
            &format!("{ip_a}/24"),
            "dev",
            &if_a,
        ]);
        ip(&[
            "-n",
            &ns_b,
            "addr",
            "add",
            &format!("{ip_b}/24"),
            "dev",
            &if_b,
        ]);
        ip(&["-n", &ns_a, "link", "set", &if_a, "up"]);
        ip(&["-n", &ns_b, "link", "set", &if_b, "up"]);
        let l = Link {
            a: ns_a,
            b: ns_b,
            if_a,
            if_b,
            ip_a,
            ip_b,
        };
        self.links.push(l.clone());
        l
    }

    /// A command that runs inside host `name`.
    pub fn cmd(&self, name: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(name), program]);
        c.stdin(Stdio::null());
        c
    }
}

impl Link {
    /// Cuts (false) or restores (true) the link, on both ends.
    pub fn set(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.a, "link", "set", &self.if_a, state]);
        ip(&["-n", &self.b, "link", "set", &self.if_b, state]);
    }

    /// Shapes traffic leaving `a` to `rate` (e.g. "80mbit") with a token bucket filter.
    pub fn shape(&self, rate: &str) {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.a, "tc", "qdisc", "replace", "dev", &self.if_a, "root",
                "tbf",
            ])
            .args(["rate", rate, "burst", "64kb", "latency", "50ms"])
            .output()
            .expect("tc");
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Processes still inside would keep the namespace's links alive: kill them first.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
