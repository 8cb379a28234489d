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

    /// A command that runs inside host `name`: in its network namespace only (nsenter, not `ip
    /// netns exec`, which would also give it a mount namespace of its own where namespaces it
    /// adds stay invisible to the test).
    pub fn cmd(&self, name: &str, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(name)))
            .args(["--", program]);
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
            kill_all_in(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Hosts on one LAN: each host's namespace has one veth port on a bridge that lives in a switch
/// namespace of its own, all on 10.`subnet`.0.0/24. Links can be cut per host (its port goes
/// down: cut from everything) or per pair of hosts (blackhole routes on both, the rest of the
/// LAN untouched), and a host's outgoing traffic shaped with `tc tbf`. Namespaces whose name
/// starts with [`Lan::prefix`] are removed on drop, also those a test cloud added.
pub struct Lan {
    pub net: Net,
    pub subnet: u8,
    hosts: Vec<(String, String, String, String)>, // (name, ip, host-side if, switch-side if)
}

impl Lan {
    pub fn new(subnet: u8) -> Lan {
        let mut net = Net::new();
        let sw = net.ns("sw");
        ip(&["netns", "add", &sw]);
        net.namespaces.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        Lan {
            net,
            subnet,
            hosts: Vec::new(),
        }
    }

    /// The prefix of every namespace of this LAN (`<prefix>sw` is the switch).
    pub fn prefix(&self) -> String {
        self.net.ns("")
    }

    /// The random tag of this LAN, for interface names made by others.
    pub fn tag(&self) -> &str {
        &self.net.tag
    }

    /// Adds host `name` at 10.`subnet`.0.`n` and returns its address.
    pub fn host(&mut self, name: &str, n: u8) -> String {
        self.net.host(name);
        let ns = self.net.ns(name);
        let sw = self.net.ns("sw");
        let k = self.hosts.len();
        let (h, p) = (
            format!("v{}h{k}", self.net.tag),
            format!("v{}p{k}", self.net.tag),
        );
        ip(&["link", "add", &h, "type", "veth", "peer", "name", &p]);
        ip(&["link", "set", &h, "netns", &ns]);
        ip(&["link", "set", &p, "netns", &sw]);
        ip(&["-n", &sw, "link", "set", &p, "master", "br0"]);
        ip(&["-n", &sw, "link", "set", &p, "up"]);
        let addr = format!("10.{}.0.{n}", self.subnet);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &h]);
        ip(&["-n", &ns, "link", "set", &h, "up"]);
        self.hosts.push((name.into(), addr.clone(), h, p));
        addr
    }

    fn get(&self, name: &str) -> &(String, String, String, String) {
        self.hosts
            .iter()
            .find(|h| h.0 == name)
            .unwrap_or_else(|| panic!("no host {name} on the LAN"))
    }

    pub fn ip(&self, name: &str) -> String {
        self.get(name).1.clone()
    }

    pub fn ns(&self, name: &str) -> String {
        self.net.ns(name)
    }

    /// Cuts host `name` from the whole LAN (its switch port down), or reconnects it.
    pub fn isolate(&self, name: &str, cut: bool) {
        assert!(self.set_port(&self.get(name).3, !cut));
    }

    /// The switch-side interface of host `name`.
    pub fn port(&self, name: &str) -> String {
        self.get(name).3.clone()
    }

    /// Sets a switch port up or down (also one a test cloud added); false when it is gone.
    pub fn set_port(&self, port: &str, up: bool) -> bool {
        let state = if up { "up" } else { "down" };
        Command::new("ip")
            .args(["-n", &self.net.ns("sw"), "link", "set", port, state])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The value of CLOUD_LAN for the test cloud (tests/command-cloud/common.sh), so that the
    /// machines it creates are hosts on this LAN.
    pub fn cloud_lan(&self) -> String {
        format!(
            "{} {} {} {}",
            self.prefix(),
            self.net.ns("sw"),
            self.subnet,
            self.net.tag
        )
    }

    /// Cuts (or heals) the path between hosts `a` and `b` only: each drops what it would send
    /// to the other.
    pub fn cut(&self, a: &str, b: &str, cut: bool) {
        for (from, to) in [(a, b), (b, a)] {
            cut_route(&self.ns(from), &self.ip(to), cut);
        }
    }

    /// Shapes what host `name` sends to `rate` (e.g. "16mbit") with a token bucket filter;
    /// None removes the shaping.
    pub fn shape(&self, name: &str, rate: Option<&str>) {
        let (ns, dev) = (self.ns(name), self.get(name).2.clone());
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns, "tc", "qdisc"]);
        match rate {
            Some(r) => c
                .args(["replace", "dev", &dev, "root", "tbf", "rate", r])
                .args(["burst", "64kb", "latency", "100ms"]),
            None => c.args(["del", "dev", &dev, "root"]),
        };
        let out = c.output().expect("tc");
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command that runs inside host `name`.
    pub fn cmd(&self, name: &str, program: &str) -> Command {
        self.net.cmd(name, program)
    }
}

/// Adds (or removes) a blackhole route to `to` inside namespace `ns`.
pub fn cut_route(ns: &str, to: &str, cut: bool) {
    assert!(
        try_cut_route(ns, to, cut),
        "cannot change the route to {to} in {ns}"
    );
}

/// [`cut_route`] for a namespace that may be gone; false when it failed.
pub fn try_cut_route(ns: &str, to: &str, cut: bool) -> bool {
    let verb = if cut { "replace" } else { "del" };
    Command::new("ip")
        .args(["-n", ns, "route", verb, "blackhole", &format!("{to}/32")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Namespaces a test cloud added on this LAN (the Net removes its own after this).
        let prefix = self.prefix();
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&prefix) && !self.net.namespaces.iter().any(|n| n == name) {
                    kill_all_in(name);
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
    }
}

/// SIGKILLs every process inside namespace `ns`.
fn kill_all_in(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(p) = pid.parse::<i32>() {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
}
