//! The status page as one self-contained HTML document: no script, no external asset, one
//! inline style sheet (the Content-Security-Policy allows exactly that). Every text that comes
//! from outside this process (pair and machine names, addresses, reasons, event messages: agents
//! and providers write them) goes through [`escape`].

use std::fmt::Write;

use super::model::{Failover, MachineStatus, PairStatus, Status};
use crate::cli::format_time;

/// Seconds between the page's reloads (`<meta http-equiv="refresh">`).
pub const REFRESH_SECS: u32 = 5;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f0f0f0}.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}\
.muted{color:#777}.t{white-space:nowrap}";

/// `&`, `<`, `>`, `"` and `'` as entities: safe in text and in quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The whole document.
pub fn page(s: &Status) -> String {
    let mut h = String::with_capacity(16 << 10);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>Standby status</title><style>{STYLE}</style></head><body>\
         <h1>Standby</h1><p class=\"muted\">{} pair(s), as of {} (reloads every {REFRESH_SECS} s; \
         <a href=\"status.json\">JSON</a>)</p>",
        s.pairs.len(),
        format_time(s.generated_unix_ms as i64),
    );
    pairs(&mut h, &s.pairs);
    failovers(&mut h, &s.pairs);
    machines(&mut h, &s.pairs);
    events(&mut h, s);
    h.push_str("</body></html>\n");
    h
}

fn pairs(h: &mut String, pairs: &[PairStatus]) {
    h.push_str(
        "<h2>Pairs</h2><table id=\"pairs\"><tr><th>Pair</th><th>State</th><th>Epoch</th>\
         <th>Primary</th><th>RPO / lag</th><th>Pending</th><th>Protected</th><th>Reason</th>\
         </tr>",
    );
    for p in pairs {
        let (class, word) = match p.protected {
            true => ("ok", "yes"),
            false => ("bad", "no"),
        };
        let mut reason = escape(&p.reason);
        if !p.provisioning.is_empty() {
            let _ = write!(reason, "<br>{}", escape(&p.provisioning));
        }
        let _ = write!(
            h,
            "<tr data-pair=\"{name}\"><td class=\"pair\">{name}</td><td class=\"state\">{state}</td>\
             <td class=\"epoch\">{epoch}</td><td>{primary}</td><td>{rpo}</td><td>{pending}</td>\
             <td class=\"{class}\">{word}</td><td>{reason}</td></tr>",
            name = escape(&p.pair),
            state = escape(&p.state),
            epoch = p.epoch,
            primary = escape(&p.primary),
            rpo = millis(p.rpo_ms),
            pending = bytes(p.pending_bytes),
        );
    }
    h.push_str("</table>");
}

fn failovers(h: &mut String, pairs: &[PairStatus]) {
    h.push_str("<h2>Last failover</h2>");
    let mut any = false;
    for p in pairs {
        if let Some(f) = &p.last_failover {
            any = true;
            failover(h, &p.pair, f);
        }
    }
    if !any {
        h.push_str("<p class=\"muted\">None in the coordinator's recent events.</p>");
    }
}

fn failover(h: &mut String, pair: &str, f: &Failover) {
    let total = f.total_ms.map_or_else(|| "under way".to_string(), millis);
    let _ = write!(
        h,
        "<h3>{} (total: {total})</h3><table class=\"failover\"><tr><th>Phase</th><th>State</th>\
         <th>Began</th><th>Lasted</th></tr>",
        escape(pair)
    );
    for ph in &f.phases {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"t\">{}</td><td>{}</td></tr>",
            ph.name,
            escape(&ph.state),
            format_time(ph.unix_ms as i64),
            ph.lasted_ms.map_or_else(|| "—".to_string(), millis),
        );
    }
    h.push_str("</table>");
}

fn machines(h: &mut String, pairs: &[PairStatus]) {
    h.push_str(
        "<h2>Machines</h2><table id=\"machines\"><tr><th>Pair</th><th>Role</th><th>Machine</th>\
         <th>Address</th><th>Connected</th><th>Last heartbeat</th><th>Epoch</th></tr>",
    );
    for p in pairs {
        for m in &p.machines {
            machine(h, &p.pair, m);
        }
    }
    h.push_str("</table>");
}

fn machine(h: &mut String, pair: &str, m: &MachineStatus) {
    let seen = m
        .last_heartbeat_ms
        .map_or_else(|| "never".to_string(), |ms| format!("{} ago", millis(ms)));
    let _ = write!(
        h,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{seen}</td><td>{}</td></tr>",
        escape(pair),
        m.role,
        escape(&m.machine),
        escape(&m.address),
        if m.connected { "yes" } else { "no" },
        m.epoch,
    );
}

fn events(h: &mut String, s: &Status) {
    h.push_str(
        "<h2>Recent events</h2><table id=\"events\"><tr><th>Time</th><th>Pair</th><th>Kind</th>\
         <th>Epoch</th><th>Message</th></tr>",
    );
    for e in &s.events {
        let _ = write!(
            h,
            "<tr><td class=\"t\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"message\">{}</td></tr>",
            format_time(e.unix_ms as i64),
            escape(&e.pair),
            e.kind,
            e.epoch,
            escape(&e.message),
        );
    }
    h.push_str("</table>");
}

/// "850 ms", "12.3 s", "4.0 min".
fn millis(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{:.1} s", ms as f64 / 1e3),
        _ => format!("{:.1} min", ms as f64 / 60e3),
    }
}

/// "512 B", "3.4 MiB".
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}
