//! The alert rules and the metrics they read, checked by Prometheus' own tools: every rule in
//! `deploy/prometheus/standby-alerts.yml` passes `promtool check rules` and the unit tests in
//! `standby-alerts.test.yml` (`promtool test rules`), every alert has a case where it fires and
//! one where it stays quiet and a section in `docs/runbook.md`; a running coordinator's
//! `/metrics`, with a pair that failed over, passes `promtool check metrics`.
//!
//! promtool comes with Debian's `prometheus` package (`.ci/run` installs it). With `CI=true` a
//! missing promtool fails these tests; elsewhere they print why they skip.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const RUNBOOK_BASE: &str = "https://github.com/standby/standby/blob/main/docs/runbook.md#";

fn prometheus_dir() -> PathBuf {
    Path::new(ROOT).join("deploy/prometheus")
}

/// `promtool` with `args`, or None (and why) when it is not installed outside CI.
fn promtool(args: &[&str], stdin: Option<&str>) -> Option<Output> {
    let mut cmd = Command::new("promtool");
    cmd.args(args)
        .current_dir(prometheus_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool is required in CI (apt-get install prometheus): {e}"
            );
            eprintln!("skipping: promtool is not installed ({e}); apt-get install prometheus");
            return None;
        }
    };
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    Some(child.wait_with_output().unwrap())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(check) = promtool(&["check", "rules", "standby-alerts.yml"], None) else {
        return;
    };
    assert!(
        check.status.success(),
        "promtool check rules:\n{}",
        text(&check)
    );
    let test = promtool(&["test", "rules", "standby-alerts.test.yml"], None).unwrap();
    // The output goes to the test log: the note quotes it.
    eprintln!(
        "promtool test rules standby-alerts.test.yml:\n{}",
        text(&test)
    );
    assert!(
        test.status.success(),
        "promtool test rules:\n{}",
        text(&test)
    );
}

/// The rules file's alerts, each with its `expr` and `runbook_url`, in file order.
struct Rule {
    name: String,
    body: String,
}

fn rules() -> Vec<Rule> {
    let text = fs::read_to_string(prometheus_dir().join("standby-alerts.yml")).unwrap();
    let mut out: Vec<Rule> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            out.push(Rule {
                name: name.trim().to_string(),
                body: String::new(),
            });
        } else if let Some(r) = out.last_mut() {
            r.body.push_str(line);
            r.body.push('\n');
        }
    }
    assert!(out.len() >= 10, "too few alerts parsed: {}", out.len());
    out
}

/// For each alert named in the unit tests: (cases where it fires, cases where it is quiet).
fn cases() -> BTreeMap<String, (usize, usize)> {
    let text = fs::read_to_string(prometheus_dir().join("standby-alerts.test.yml")).unwrap();
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = Some(name.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current.take().expect("exp_alerts after an alertname");
            let e = out.entry(name).or_default();
            if rest.trim() == "[]" {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
    }
    out
}

#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let cases = cases();
    let names: BTreeSet<String> = rules().into_iter().map(|r| r.name).collect();
    for n in &names {
        let (firing, quiet) = cases.get(n).copied().unwrap_or_default();
        assert!(
            firing >= 1 && quiet >= 1,
            "{n}: {firing} firing and {quiet} quiet cases in standby-alerts.test.yml; each alert needs both"
        );
    }
    for n in cases.keys() {
        assert!(
            names.contains(n),
            "the unit tests name {n}, which is no alert"
        );
    }
    // The cases the issue names are there.
    let test = fs::read_to_string(prometheus_dir().join("standby-alerts.test.yml")).unwrap();
    for case in [
        "a first failover from a counter exported at 0",
        "a first failover from a counter born at 1",
        "a hibernated pair is not unprotected",
        "a recovery that goes as planned",
        "a coordinator that stops answering scrapes",
        "no coordinator target at all",
        "the bucket falls behind while snapshots are recorded, then catches up",
    ] {
        assert!(test.contains(case), "no unit test \"{case}\"");
    }
}

/// GitHub's anchor for a heading: lower case, spaces to hyphens, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_a_runbook_section() {
    let runbook = fs::read_to_string(Path::new(ROOT).join("docs/runbook.md")).unwrap();
    let mut sections: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in runbook.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            current = Some(h.trim().to_string());
            sections.insert(h.trim().to_string(), String::new());
        } else if let Some(h) = &current {
            let s = sections.get_mut(h).unwrap();
            s.push_str(line);
            s.push('\n');
        }
    }
    let rules = rules();
    for r in &rules {
        let want = format!("runbook_url: \"{RUNBOOK_BASE}{}\"", anchor(&r.name));
        assert!(r.body.contains(&want), "{}: no `{want}` annotation", r.name);
        let body = sections
            .get(&r.name)
            .unwrap_or_else(|| panic!("docs/runbook.md has no \"## {}\" section", r.name));
        for part in ["**Means.**", "**Check.**", "**Do.**"] {
            assert!(
                body.contains(part),
                "docs/runbook.md, {}: no {part} paragraph",
                r.name
            );
        }
    }
    for s in sections.keys() {
        assert!(
            rules.iter().any(|r| &r.name == s),
            "docs/runbook.md has a section for {s}, which is no alert"
        );
    }
}

#[test]
fn the_coordinator_down_alert_watches_the_scrape_job() {
    let config = fs::read_to_string(prometheus_dir().join("prometheus.yml")).unwrap();
    let jobs: Vec<&str> = config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- job_name: "))
        .map(str::trim)
        .filter(|j| j.contains("coordinator"))
        .collect();
    assert_eq!(jobs.len(), 1, "{config}");
    let down = rules()
        .into_iter()
        .find(|r| r.name == "StandbyCoordinatorDown")
        .expect("a StandbyCoordinatorDown alert");
    for job in jobs {
        for part in [
            format!("up{{job=\"{job}\"}} == 0"),
            format!("absent(up{{job=\"{job}\"}})"),
        ] {
            assert!(down.body.contains(&part), "no `{part}` in {}", down.body);
        }
    }
}

/// A managed pair with data replicated, on `coord`; each agent serves its own `/metrics`.
fn pair(coord: &Coord, t: &Path, name: &str) -> (Managed, Managed) {
    let ws = t.join(format!("{name}-ws"));
    fs::create_dir_all(&ws).unwrap();
    fs::write(ws.join("model.pt"), vec![7u8; 200_000]).unwrap();
    let cpu = Managed::cpu(
        &coord.addr,
        Some(&coord.token(name, "cpu", "10m")),
        &t.join(format!("{name}-replica")),
        &t.join(format!("{name}-cpu")),
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let gpu = Managed::gpu(
        &coord.addr,
        Some(&coord.token(name, "gpu", "10m")),
        &ws,
        &t.join(format!("{name}-gpu")),
        &["--debounce", "100ms", "--metrics-listen", "127.0.0.1:0"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Syncing")
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(
        ok,
        "pair {name} did not reach Syncing:\n{}\n{}\n{}",
        coord.log_text(),
        gpu.log_text(),
        cpu.log_text()
    );
    (gpu, cpu)
}

/// Where an agent serves its metrics.
fn metrics_addr(agent: &Managed) -> String {
    fs::read_to_string(agent.state.join("metrics.addr")).unwrap()
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// `/metrics` as a plain client gets it (the 0.0.4 text format), and the content type given.
fn scrape(coord: &Coord) -> (String, String) {
    let r = http_get(&coord.metrics, "/metrics");
    let ctype = r
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("")
        .to_string();
    (body(&r).to_string(), ctype)
}

fn promtool_check_metrics(exposition: &str) -> Option<()> {
    let out = promtool(&["check", "metrics"], Some(exposition))?;
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "promtool check metrics complains:\n{}\n--- the exposition:\n{exposition}",
        text(&out)
    );
    Some(())
}

#[test]
fn a_running_coordinators_metrics_pass_promtool_check_metrics() {
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &[]);
    let (mut gpu, _cpu) = pair(&coord, t.path(), "a");
    // Heartbeats carry figures every second; wait for both sides' disk figures.
    let ok = wait_until(Duration::from_secs(10), || {
        let (m, _) = scrape(&coord);
        m.contains("standby_pair_disk_free_bytes{pair=\"a\",side=\"gpu\"}")
            && m.contains("standby_pair_disk_free_bytes{pair=\"a\",side=\"cpu\"}")
    });
    let (before, ctype) = scrape(&coord);
    assert!(ok, "no disk-free figures: {before}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    // The failover counter exists at 0 before the first failover (StandbyFailedOver needs it).
    assert!(
        before.contains("standby_failovers_total{pair=\"a\"} 0\n"),
        "{before}"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        before.contains(&format!("standby_build_info{{version=\"{version}\"")),
        "{before}"
    );
    if promtool_check_metrics(&before).is_none() {
        return;
    }
    // The agents' own expositions pass too, and say what the heartbeats say.
    for (agent, role) in [(&gpu, "gpu"), (&_cpu, "cpu")] {
        let m = body(&http_get(&metrics_addr(agent), "/metrics")).to_string();
        assert!(
            m.contains(&format!("standby_agent_info{{pair=\"a\",role=\"{role}\"")),
            "{m}"
        );
        for name in [
            "standby_agent_rpo_age_seconds ",
            "standby_agent_pending_bytes ",
            "standby_agent_last_generation_seconds ",
            "standby_agent_sent_bytes_total ",
            "standby_agent_certificate_expiry_timestamp_seconds ",
            "standby_agent_disk_free_bytes ",
        ] {
            assert!(m.contains(name), "{role}: no {name}in\n{m}");
        }
        promtool_check_metrics(&m);
    }
    // The figures follow the heartbeats (every second): the flushed generation shows.
    let sent = || {
        body(&http_get(&metrics_addr(&gpu), "/metrics"))
            .lines()
            .find_map(|l| l.strip_prefix("standby_agent_sent_bytes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let ok = wait_until(Duration::from_secs(5), || sent() > 0.0);
    assert!(ok, "the GPU agent sent data but counts {} bytes", sent());

    // A failover fills the histograms, counters and state series; check again.
    gpu.proc.kill();
    let ok = wait_until(Duration::from_secs(20), || {
        coord.pair("a").is_some_and(|p| p["state"] != "Syncing")
            && scrape(&coord)
                .0
                .contains("standby_failovers_total{pair=\"a\"} 1\n")
    });
    let (after, _) = scrape(&coord);
    assert!(ok, "no failover counted: {after}\n{}", coord.log_text());
    assert!(
        after.contains("standby_time_to_detect_seconds_count 1"),
        "{after}"
    );
    promtool_check_metrics(&after);

    // One meaning per label name: `kind` is only a certificate's kind.
    for line in after.lines().filter(|l| l.contains("kind=\"")) {
        assert!(
            line.starts_with("standby_certificate_expiry_timestamp_seconds{"),
            "`kind` outside the certificate metric: {line}"
        );
    }
    assert!(after.contains("standby_machines{role=\"gpu\"}"), "{after}");
    assert!(
        after.contains("# TYPE standby_pair_restore_progress_ratio gauge"),
        "{after}"
    );

    // Prometheus asks for OpenMetrics and gets it.
    let om = http_get_accept(
        &coord.metrics,
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    );
    assert!(
        om.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{om}"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
}

/// A GET with an `Accept` header, as Prometheus sends it.
fn http_get_accept(addr: &str, accept: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `curl -s URL`, parsed as JSON (Prometheus' HTTP API).
fn curl_json(url: &str) -> Option<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", url])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus on loopback, scraping `target` every second with the alert rules loaded.
struct Prometheus {
    _proc: Proc,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: &str, agents: &[String]) -> Option<Prometheus> {
        fs::create_dir_all(dir).unwrap();
        let rules = prometheus_dir().join("standby-alerts.yml");
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: standby-coordinator\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n  \
                 - job_name: standby-agents\n    \
                 static_configs:\n      - targets: [{}]\n",
                rules.display(),
                agents
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "prometheus is required in CI (apt-get install prometheus): {e}"
                );
                eprintln!("skipping: prometheus is not installed ({e})");
                return None;
            }
        };
        let p = Prometheus {
            _proc: Proc(child),
            url: format!("http://{listen}"),
            log,
        };
        let ok = wait_until(Duration::from_secs(30), || {
            curl_json(&format!("{}/api/v1/status/buildinfo", p.url)).is_some()
        });
        assert!(ok, "prometheus did not start:\n{}", p.log_text());
        Some(p)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of `query` for `pair`, if the query returns a series for it.
    fn value(&self, query: &str, pair: &str) -> Option<f64> {
        let v = curl_json(&format!("{}/api/v1/query?query={query}", self.url))?;
        v["data"]["result"]
            .as_array()?
            .iter()
            .find(|s| s["metric"]["pair"] == pair)
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
    }

    /// How many series `query` returns now.
    fn series(&self, query: &str) -> usize {
        curl_json(&format!("{}/api/v1/query?query={query}", self.url))
            .and_then(|v| v["data"]["result"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// The alerts Prometheus holds now: (name, pair, state).
    fn alerts(&self) -> Vec<(String, String, String)> {
        let Some(v) = curl_json(&format!("{}/api/v1/alerts", self.url)) else {
            return Vec::new();
        };
        let field = |a: &serde_json::Value, k: &str| a[k].as_str().unwrap_or("").to_string();
        v["data"]["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|a| {
                        let l = &a["labels"];
                        (field(l, "alertname"), field(l, "pair"), field(a, "state"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn a_real_prometheus_fires_the_failover_alert_after_a_kill_9() {
    let t = tempfile::tempdir().unwrap();
    let coord = Coord::start(&t.path().join("coord"), &[]);
    let (mut gpu, cpu) = pair(&coord, t.path(), "live");
    let agents = [metrics_addr(&gpu), metrics_addr(&cpu)];
    let Some(prom) = Prometheus::start(&t.path().join("prom"), &coord.metrics, &agents) else {
        return;
    };
    // Prometheus has seen the pair's counter at 0 before the failover.
    let ok = wait_until(Duration::from_secs(30), || {
        prom.value("standby_failovers_total", "live") == Some(0.0)
    });
    assert!(
        ok,
        "the scrape never showed the counter at 0:\n{}",
        prom.log_text()
    );
    // And the agents' own figures, from both agents.
    let ok = wait_until(Duration::from_secs(30), || {
        prom.value("standby_agent_info", "live") == Some(1.0)
            && prom.series("standby_agent_rpo_age_seconds") == 2
    });
    assert!(ok, "no agent metrics scraped:\n{}", prom.log_text());
    assert!(
        !prom.alerts().iter().any(|a| a.0 == "StandbyFailedOver"),
        "{:?}",
        prom.alerts()
    );
    let killed = std::time::Instant::now();
    gpu.proc.kill();
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        seen = prom.alerts();
        seen.iter().any(|(name, pair, state)| {
            name == "StandbyFailedOver" && pair == "live" && state == "firing"
        })
    });
    assert!(
        ok,
        "StandbyFailedOver did not fire: {seen:?}\n{}\n{}",
        coord.log_text(),
        prom.log_text()
    );
    eprintln!(
        "kill -9 of the GPU agent to StandbyFailedOver firing in Prometheus: {} ms",
        killed.elapsed().as_millis()
    );
    // An expected failover raises no critical alert about the pair or the coordinator.
    for (name, pair, state) in &seen {
        assert!(
            !(name == "StandbyPairUnprotected" || name == "StandbyCoordinatorDown"),
            "{name} {pair} {state}"
        );
    }
    drop(prom);
}
