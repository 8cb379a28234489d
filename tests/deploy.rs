//! The files under `deploy/` for operators: scripts pass `bash -n` and shellcheck, every metric
//! the dashboard and the alert rules use is one the coordinator exports, the example
//! configuration loads, and the systemd units start our programs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn scripts_pass_bash_n_and_shellcheck() {
    let scripts = files(&deploy(), "sh");
    assert!(scripts.len() >= 2, "{scripts:?}");
    for s in &scripts {
        let out = Command::new("bash").arg("-n").arg(s).output().unwrap();
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            s.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cloud = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/command-cloud");
    let mut all = scripts.clone();
    all.extend(
        ["create", "destroy", "list", "get", "search"]
            .iter()
            .map(|n| cloud.join(n)),
    );
    match Command::new("shellcheck").arg("-x").args(&all).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "shellcheck is required in CI (apt-get install shellcheck): {e}"
            );
            eprintln!("skipping shellcheck: not installed ({e})");
        }
    }
}

/// Every `standby_*` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("standby_") {
        let start = i + off;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.push(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = standby::control::metrics::Metrics::names();
    let known = |n: &str| {
        exported.iter().any(|e| e == n)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                n.strip_suffix(s)
                    .is_some_and(|b| exported.iter().any(|e| e == b))
            })
    };
    assert!(!known("standby_no_such_metric"));
    assert!(known("standby_recovery_seconds_bucket"));
    let mut used = 0;
    for f in [
        deploy().join("grafana/standby-dashboard.json"),
        deploy().join("prometheus/standby-alerts.yml"),
    ] {
        let text = std::fs::read_to_string(&f).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{} names no metric", f.display());
        for n in names {
            assert!(
                known(&n),
                "{} uses {n}, which the coordinator does not export (it exports {exported:?})",
                f.display()
            );
            used += 1;
        }
    }
    // The dashboard is JSON Grafana can import.
    let d: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/standby-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(d["panels"].as_array().is_some_and(|p| !p.is_empty()));
    // The alert rules the issue asks for are there.
    let alerts = std::fs::read_to_string(deploy().join("prometheus/standby-alerts.yml")).unwrap();
    for a in [
        "standby_pair_protected",
        "standby_pair_rpo_age_seconds",
        "standby_failovers_total",
        "standby_orphans_destroyed_total",
    ] {
        assert!(alerts.contains(a), "no alert on {a}");
    }
    assert!(used > 10);
}

#[test]
fn the_example_configuration_loads() {
    let f = standby::cli::FileConfig::load(Some(&deploy().join("coordinator.toml"))).unwrap();
    let gcp: standby::control::provider::gcp::GcpSettings = f.get("gcp").unwrap().unwrap();
    assert!(!gcp.zones.is_empty());
    let gpu: standby::control::provider::OfferFilter = f.get("provision.gpu").unwrap().unwrap();
    assert!(gpu.max_price_per_hour.is_some());
    for k in [
        "heartbeat_interval",
        "failover_after",
        "boot_timeout",
        "blocklist_for",
    ] {
        let v: String = f.get(k).unwrap().unwrap();
        standby::cli::parse_duration(&v).unwrap();
    }
    let p: String = f.get("provider").unwrap().unwrap();
    let c: String = f.get("cpu_provider").unwrap().unwrap();
    assert_eq!((p.as_str(), c.as_str()), ("vastai", "gcp"));
}

#[test]
fn systemd_units_start_our_programs() {
    let units = files(&deploy().join("systemd"), "service");
    assert_eq!(units.len(), 3);
    for u in units {
        let text = std::fs::read_to_string(&u).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{} has no ExecStart", u.display()));
        let prog = Path::new(exec.split_whitespace().next().unwrap());
        let name = prog.file_name().unwrap().to_str().unwrap();
        assert!(
            ["coordinator", "agent-gpu", "agent-cpu"].contains(&name),
            "{}: {exec}",
            u.display()
        );
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{} lacks {section}", u.display());
        }
    }
}
