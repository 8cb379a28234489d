use super::model::{RECENT, last_failover};
use super::*;
use crate::proto::{Event, EventKind, MachineView, PairState, PairView, Role};

fn moved(pair: &str, ms: u64, from: PairState, to: PairState) -> Event {
    Event {
        unix_ms: ms,
        pair: pair.into(),
        kind: EventKind::Transition.into(),
        from_state: from.into(),
        to_state: to.into(),
        epoch: 2,
        message: format!("{from:?} -> {to:?}"),
    }
}

fn view(name: &str, state: PairState, reason: &str) -> PairView {
    PairView {
        pair: name.into(),
        state: state.into(),
        epoch: 7,
        primary: Role::Gpu.into(),
        sync_lag_ms: 1_500,
        reason: reason.into(),
        gpu: Some(MachineView {
            machine: "gpu-<b>1</b>".into(),
            address: "10.0.0.5:7702".into(),
            connected: true,
            last_heartbeat_ms: 300,
            epoch: 7,
            ..Default::default()
        }),
        cpu: Some(MachineView {
            machine: "cpu-1".into(),
            last_heartbeat_ms: u64::MAX,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A whole failover of `p` starting at `t0`: Suspect, FailedOver, Provisioning, Restoring,
/// CuttingOver, Syncing.
fn a_failover(p: &str, t0: u64) -> Vec<Event> {
    use PairState::*;
    vec![
        moved(p, t0, Syncing, Suspect),
        moved(p, t0 + 4_000, Suspect, FailedOver),
        moved(p, t0 + 4_100, FailedOver, Provisioning),
        moved(p, t0 + 64_100, Provisioning, Restoring),
        moved(p, t0 + 94_100, Restoring, CuttingOver),
        moved(p, t0 + 96_100, CuttingOver, Syncing),
    ]
}

#[test]
fn the_last_failover_has_every_phase_with_its_duration() {
    let mut events = a_failover("p", 1_000);
    events.extend(a_failover("p", 500_000));
    // Another pair's failover in between changes nothing for `p`.
    events.insert(
        3,
        moved("q", 2_000, PairState::Syncing, PairState::FailedOver),
    );
    let f = last_failover("p", &events).unwrap();
    let names: Vec<&str> = f.phases.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "failure",
            "failover",
            "provisioning",
            "restore",
            "cutover",
            "synced"
        ]
    );
    assert_eq!(f.phases[0].unix_ms, 500_000, "the later failover");
    let lasted: Vec<Option<u64>> = f.phases.iter().map(|p| p.lasted_ms).collect();
    assert_eq!(
        lasted,
        [
            Some(4_000),
            Some(100),
            Some(60_000),
            Some(30_000),
            Some(2_000),
            None
        ]
    );
    assert_eq!(f.total_ms, Some(96_100));
}

#[test]
fn a_failover_under_way_has_no_total_and_a_pair_without_one_has_none() {
    let events: Vec<Event> = a_failover("p", 0).into_iter().take(3).collect();
    let f = last_failover("p", &events).unwrap();
    assert_eq!(f.phases.len(), 3);
    assert_eq!(f.total_ms, None);
    assert_eq!(f.phases[2].lasted_ms, None);
    assert!(last_failover("other", &events).is_none());
    // A manual failover (no Suspect before it) starts at FailedOver.
    let manual = vec![moved("m", 5, PairState::Syncing, PairState::FailedOver)];
    let f = last_failover("m", &manual).unwrap();
    assert_eq!(f.phases[0].name, "failover");
}

#[test]
fn text_from_agents_is_escaped_never_markup() {
    let reason = "<script>alert('x')</script> & \"quoted\"";
    let mut events = a_failover("p", 0);
    events.push(Event {
        unix_ms: 99_999_999,
        pair: "p".into(),
        kind: EventKind::Fenced.into(),
        message: "<img src=x onerror=alert(1)>".into(),
        ..Default::default()
    });
    let s = Status::build(vec![view("p", PairState::Degraded, reason)], &events, 1);
    let html = page(&s);
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<b>1"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;quoted&quot;"),
        "{html}"
    );
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{html}"
    );
    assert!(html.contains("<meta http-equiv=\"refresh\""), "{html}");
}

#[test]
fn the_page_and_the_json_show_state_epoch_protection_and_machines() {
    let s = Status::build(
        vec![
            view("alpha", PairState::Syncing, ""),
            view("beta", PairState::FailedOver, "gpu lost"),
        ],
        &a_failover("beta", 10),
        1,
    );
    assert!(s.pairs[0].protected && !s.pairs[1].protected);
    assert!(s.pairs[0].last_failover.is_none());
    assert_eq!(
        s.pairs[1].last_failover.as_ref().unwrap().total_ms,
        Some(96_100)
    );
    assert_eq!(s.pairs[0].machines[1].last_heartbeat_ms, None, "never seen");
    let html = page(&s);
    for want in [
        "<td class=\"pair\">alpha</td><td class=\"state\">Syncing</td><td class=\"epoch\">7</td>",
        "<td class=\"state\">FailedOver</td>",
        "1.5 s",
        "10.0.0.5:7702",
        "never",
        "96.1 s",
    ] {
        assert!(html.contains(want), "{want} not in {html}");
    }
    let json: serde_json::Value = serde_json::to_value(&s).unwrap();
    assert_eq!(json["pairs"][1]["state"], "FailedOver");
    assert_eq!(json["pairs"][1]["epoch"], 7);
    assert_eq!(json["pairs"][0]["protected"], true);
    assert_eq!(
        json["pairs"][1]["last_failover"]["phases"][2]["name"],
        "provisioning"
    );
}

#[test]
fn recent_events_are_newest_first_bounded_and_without_heartbeats() {
    let mut events: Vec<Event> = (0..RECENT as u64 + 20)
        .map(|i| Event {
            unix_ms: i,
            pair: "p".into(),
            kind: EventKind::Joined.into(),
            ..Default::default()
        })
        .collect();
    events.push(Event {
        unix_ms: 10_000,
        kind: EventKind::Heartbeat.into(),
        ..Default::default()
    });
    let s = Status::build(Vec::new(), &events, 1);
    assert_eq!(s.events.len(), RECENT);
    assert_eq!(s.events[0].unix_ms, RECENT as u64 + 19);
    assert!(s.events.iter().all(|e| e.kind == "joined"));
}
