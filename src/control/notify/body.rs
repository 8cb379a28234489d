//! The bodies a webhook is sent: generic JSON, Slack's incoming-webhook shape, or a PagerDuty
//! Events API v2 event. Pure functions of the notice, so each shape is unit-tested.

use serde::Deserialize;
use serde_json::{Value, json};

use super::notice::{Notice, NoticeKind};

/// The shape of a webhook's body (`format = ...` in `[[notify]]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Every field of the notice (ARCHITECTURE.md, "Notifications").
    #[default]
    Json,
    /// `{"text": ..., "blocks": [...]}` for a Slack incoming webhook (Mattermost and others
    /// take the same `text`).
    Slack,
    /// An Events API v2 event for `https://events.pagerduty.com/v2/enqueue`.
    Pagerduty,
}

/// Which coordinator speaks: its fleet id (the label prefix of its machines, from its CA) and
/// its host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub id: String,
    pub host: String,
}

impl Origin {
    /// This host, for the coordinator whose machine labels start with `id`.
    pub fn here(id: &str) -> Origin {
        Origin {
            id: id.to_string(),
            host: crate::host::name(),
        }
    }
}

/// The body of `n` in `format`; `routing_key` is PagerDuty's integration key.
pub fn render(format: Format, n: &Notice, origin: &Origin, routing_key: &str) -> Vec<u8> {
    let v = match format {
        Format::Json => generic(n, origin),
        Format::Slack => slack(n, origin),
        Format::Pagerduty => pagerduty(n, origin, routing_key),
    };
    serde_json::to_vec(&v).expect("a JSON value serializes")
}

fn generic(n: &Notice, origin: &Origin) -> Value {
    json!({
        "version": 1,
        "id": n.id,
        "kind": n.kind.as_str(),
        "pair": n.pair,
        "epoch": n.epoch,
        "unix_ms": n.unix_ms,
        "time": crate::cli::format_time(n.unix_ms as i64),
        "text": n.text,
        "coordinator": { "id": origin.id, "host": origin.host },
    })
}

/// One line of plain text (`text`, what notifications and older clients show) and blocks.
fn slack(n: &Notice, origin: &Origin) -> Value {
    let pair = escape(&n.pair);
    let text = format!(
        "{} Standby pair {pair}: {} (epoch {}): {}",
        icon(n.kind),
        title(n.kind),
        n.epoch,
        escape(&n.text)
    );
    let context = format!(
        "coordinator {} on {} · {}",
        escape(&origin.id),
        escape(&origin.host),
        crate::cli::format_time(n.unix_ms as i64)
    );
    json!({
        "text": text,
        "blocks": [
            { "type": "section", "text": { "type": "mrkdwn", "text": format!(
                "{} *{}* — pair `{pair}`, epoch {}\n{}",
                icon(n.kind), title(n.kind), n.epoch, escape(&n.text)) } },
            { "type": "context", "elements": [ { "type": "mrkdwn", "text": context } ] },
        ],
    })
}

/// A trigger, or for `recovered` a resolve, under one dedup key per pair and coordinator, so
/// the incident a failover opened is the one its recovery closes.
fn pagerduty(n: &Notice, origin: &Origin, routing_key: &str) -> Value {
    let dedup_key = format!("standby/{}/{}", origin.id, n.pair);
    if n.kind.resolves() {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key,
        });
    }
    let summary = format!("Standby pair {}: {}: {}", n.pair, title(n.kind), n.text);
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": truncate(summary, 1024),
            "severity": severity(n.kind),
            "source": origin.host,
            "component": n.pair,
            "group": origin.id,
            "class": n.kind.as_str(),
            "timestamp": crate::cli::format_time(n.unix_ms as i64),
            "custom_details": { "epoch": n.epoch, "id": n.id, "text": n.text },
        },
    })
}

/// PagerDuty's severity: a failover is critical (the job runs on the CPU now); a lost standby
/// is an error (the GPU runs unprotected); a failed attempt a warning; a chosen pause info.
fn severity(kind: NoticeKind) -> &'static str {
    match kind {
        NoticeKind::Failover => "critical",
        NoticeKind::Degraded => "error",
        NoticeKind::ProvisioningFailed => "warning",
        NoticeKind::Hibernated | NoticeKind::Woken | NoticeKind::Recovered => "info",
    }
}

fn title(kind: NoticeKind) -> &'static str {
    match kind {
        NoticeKind::Failover => "failed over to the CPU standby",
        NoticeKind::Degraded => "degraded (standby lost)",
        NoticeKind::Recovered => "recovered",
        NoticeKind::Hibernated => "hibernated",
        NoticeKind::Woken => "waking",
        NoticeKind::ProvisioningFailed => "provisioning attempt failed",
    }
}

fn icon(kind: NoticeKind) -> &'static str {
    match kind {
        NoticeKind::Failover | NoticeKind::Degraded => ":rotating_light:",
        NoticeKind::ProvisioningFailed => ":warning:",
        NoticeKind::Recovered => ":white_check_mark:",
        NoticeKind::Hibernated | NoticeKind::Woken => ":zzz:",
    }
}

/// Slack's three control characters in text (its formatting rules).
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` bytes, cut on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            id: "sb-0123abcd".into(),
            host: "coord-1".into(),
        }
    }

    fn notice(kind: NoticeKind) -> Notice {
        Notice {
            id: "00ff".into(),
            pair: "train-7".into(),
            kind,
            epoch: 2,
            unix_ms: 1_796_000_000_123,
            text: "GPU silent for 3 s <and> the CPU cannot reach it".into(),
        }
    }

    fn parse(b: Vec<u8>) -> Value {
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn generic_json_carries_every_field() {
        let v = parse(render(
            Format::Json,
            &notice(NoticeKind::Failover),
            &origin(),
            "",
        ));
        assert_eq!(v["version"], 1);
        assert_eq!(v["id"], "00ff");
        assert_eq!(v["kind"], "failover");
        assert_eq!(v["pair"], "train-7");
        assert_eq!(v["epoch"], 2);
        assert_eq!(v["unix_ms"], 1_796_000_000_123u64);
        assert_eq!(v["time"], "2026-11-30T00:53:20.123Z");
        assert_eq!(
            v["text"],
            "GPU silent for 3 s <and> the CPU cannot reach it"
        );
        assert_eq!(v["coordinator"]["id"], "sb-0123abcd");
        assert_eq!(v["coordinator"]["host"], "coord-1");
    }

    #[test]
    fn slack_has_text_and_escaped_blocks() {
        let v = parse(render(
            Format::Slack,
            &notice(NoticeKind::Degraded),
            &origin(),
            "",
        ));
        let text = v["text"].as_str().unwrap();
        assert!(text.contains("train-7"), "{text}");
        assert!(text.contains("degraded"), "{text}");
        assert!(text.contains("&lt;and&gt;"), "{text}");
        assert!(!text.contains('<'), "{text}");
        assert_eq!(v["blocks"][0]["type"], "section");
        assert_eq!(v["blocks"][0]["text"]["type"], "mrkdwn");
        let ctx = v["blocks"][1]["elements"][0]["text"].as_str().unwrap();
        assert!(
            ctx.contains("sb-0123abcd") && ctx.contains("coord-1"),
            "{ctx}"
        );
    }

    #[test]
    fn pagerduty_triggers_and_recovery_resolves_the_same_incident() {
        let o = origin();
        let t = parse(render(
            Format::Pagerduty,
            &notice(NoticeKind::Failover),
            &o,
            "R0UT1NG",
        ));
        assert_eq!(t["routing_key"], "R0UT1NG");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["dedup_key"], "standby/sb-0123abcd/train-7");
        assert_eq!(t["payload"]["severity"], "critical");
        assert_eq!(t["payload"]["source"], "coord-1");
        assert_eq!(t["payload"]["class"], "failover");
        assert!(
            t["payload"]["summary"]
                .as_str()
                .unwrap()
                .starts_with("Standby pair train-7: failed over")
        );
        let r = parse(render(
            Format::Pagerduty,
            &notice(NoticeKind::Recovered),
            &o,
            "R0UT1NG",
        ));
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(r["dedup_key"], t["dedup_key"]);
        assert!(r.get("payload").is_none());
        // Another pair is another incident.
        let mut other = notice(NoticeKind::Failover);
        other.pair = "train-8".into();
        let o2 = parse(render(Format::Pagerduty, &other, &o, "R0UT1NG"));
        assert_ne!(o2["dedup_key"], t["dedup_key"]);
    }

    #[test]
    fn pagerduty_severities_and_summary_limit() {
        let sev = |k| {
            parse(render(Format::Pagerduty, &notice(k), &origin(), "k"))["payload"]["severity"]
                .clone()
        };
        assert_eq!(sev(NoticeKind::Degraded), "error");
        assert_eq!(sev(NoticeKind::ProvisioningFailed), "warning");
        assert_eq!(sev(NoticeKind::Hibernated), "info");
        let mut long = notice(NoticeKind::Failover);
        long.text = "é".repeat(2000);
        let v = parse(render(Format::Pagerduty, &long, &origin(), "k"));
        assert!(v["payload"]["summary"].as_str().unwrap().len() <= 1024);
    }
}
