//! `coordinator drill P`: a deliberate failover of a live pair, measured phase by phase from the
//! coordinator's own transition events, against targets; printed as a table and as JSON.
//! The pair must be `Syncing`; the drill ends when it is `Syncing` again on a new GPU (or when
//! the time limit passes, which fails the drill).

use std::time::Duration;

use crate::cli::Exit;
use crate::proto::admin_client::AdminClient;
use crate::proto::{
    EventKind, EventsRequest, ListPairsRequest, PairRequest, PairState, PairView, Role,
};
use anyhow::bail;
use tonic::transport::Channel;

use super::Remote;

#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    pub pair: String,
    #[command(flatten)]
    pub remote: Remote,
    /// Print only JSON.
    #[arg(long)]
    pub json: bool,
    /// Target from the request to the CPU being the primary.
    #[arg(long, default_value = "5s")]
    pub target_failover: String,
    /// Target for renting a new GPU machine until its agent joins.
    #[arg(long, default_value = "10m")]
    pub target_provisioning: String,
    /// Target for restoring the workspace onto it.
    #[arg(long, default_value = "10m")]
    pub target_restore: String,
    /// Target for the freeze, final catch-up and hand-back.
    #[arg(long, default_value = "60s")]
    pub target_cutover: String,
    /// Target from the request to the pair protected again with the GPU primary.
    #[arg(long, default_value = "20m")]
    pub target_total: String,
    /// Give up (and fail) after this long.
    #[arg(long, default_value = "60m")]
    pub limit: String,
}

/// One measured phase.
#[derive(Debug, serde::Serialize)]
pub struct Phase {
    pub phase: &'static str,
    pub start_ms: u64,
    pub duration_ms: u64,
    pub target_ms: u64,
    pub met: bool,
    pub what: String,
}

/// Phases from transition times (ms since the request): (name, entered-at state (none: the
/// request itself), left-at state).
const PHASES: [(&str, Option<PairState>, PairState); 4] = [
    ("failover", None, PairState::FailedOver),
    (
        "provisioning",
        Some(PairState::Provisioning),
        PairState::Restoring,
    ),
    (
        "restore",
        Some(PairState::Restoring),
        PairState::CuttingOver,
    ),
    ("cutover", Some(PairState::CuttingOver), PairState::Syncing),
];

/// Measures the phases from `(state entered, ms since the request, message)` transitions.
pub fn phases(steps: &[Transition], targets: &[Duration; 5]) -> Vec<Phase> {
    let at = |s: PairState| steps.iter().find(|x| x.0 == s);
    let mut out = Vec::new();
    for (i, (name, from, to)) in PHASES.iter().enumerate() {
        let start = match from {
            None => Some(0),
            Some(from) => at(*from).map(|x| x.1),
        };
        let (Some(start), Some(end)) = (start, at(*to)) else {
            continue;
        };
        let d = end.1.saturating_sub(start);
        out.push(Phase {
            phase: name,
            start_ms: start,
            duration_ms: d,
            target_ms: targets[i].as_millis() as u64,
            met: d <= targets[i].as_millis() as u64,
            what: end.2.clone(),
        });
    }
    if let Some(end) = at(PairState::Syncing) {
        out.push(Phase {
            phase: "total",
            start_ms: 0,
            duration_ms: end.1,
            target_ms: targets[4].as_millis() as u64,
            met: end.1 <= targets[4].as_millis() as u64,
            what: "protected again, the GPU primary".into(),
        });
    }
    out
}

fn dur(s: &str, what: &str) -> anyhow::Result<Duration> {
    crate::cli::parse_duration(s).map_err(|e| anyhow::anyhow!("--{what}: {e}"))
}

/// A transition as the drill saw it: (state entered, ms since the request, message).
type Transition = (PairState, u64, String);

pub async fn run(a: DrillArgs) -> anyhow::Result<()> {
    let targets = targets(&a)?;
    let limit = dur(&a.limit, "limit")?;
    let mut c = super::admin::connect(&a.remote).await?;
    let p = find_pair(&c, &a.pair).await?;
    if p.state() != PairState::Syncing || p.primary() != Role::Gpu {
        bail!(
            "drill refused: {} is {} with the {} primary; a drill starts from a healthy pair (Syncing, GPU primary)",
            a.pair,
            p.state(),
            p.primary()
        );
    }
    let epoch = p.epoch;
    let events = c
        .clone()
        .events(EventsRequest {
            follow: true,
            heartbeats: false,
        })
        .await
        .map_err(status)?
        .into_inner();
    let requested_ms = crate::host::unix_ms_now();
    c.failover(PairRequest {
        pair: a.pair.clone(),
    })
    .await
    .map_err(status)?;
    if !a.json {
        println!(
            "drill: {} failed over on purpose at epoch {epoch}; following it back",
            a.pair
        );
    }
    let steps = follow(events, &a, epoch, requested_ms, limit).await?;
    let ph = phases(&steps, &targets);
    let passed = ph.iter().all(|p| p.met);
    let report = serde_json::json!({
        "pair": a.pair,
        "epoch_before": epoch,
        "epoch_after": find_pair(&c, &a.pair).await?.epoch,
        "passed": passed,
        "phases": ph,
    });
    if !a.json {
        print_table(&ph);
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !passed {
        let missed = crate::cli::Exiting::new(Exit::TargetMissed, "the drill missed a target");
        return Err(missed.into());
    }
    Ok(())
}

fn status(s: tonic::Status) -> anyhow::Error {
    crate::cli::Exiting::from(s).into()
}

/// The five targets, in the order of [`PHASES`] and then the total.
fn targets(a: &DrillArgs) -> anyhow::Result<[Duration; 5]> {
    Ok([
        dur(&a.target_failover, "target-failover")?,
        dur(&a.target_provisioning, "target-provisioning")?,
        dur(&a.target_restore, "target-restore")?,
        dur(&a.target_cutover, "target-cutover")?,
        dur(&a.target_total, "target-total")?,
    ])
}

async fn find_pair(c: &AdminClient<Channel>, pair: &str) -> anyhow::Result<PairView> {
    let ps = c
        .clone()
        .list_pairs(ListPairsRequest {})
        .await
        .map_err(status)?
        .into_inner();
    ps.pairs
        .into_iter()
        .find(|p| p.pair == pair)
        .ok_or_else(|| anyhow::anyhow!("no pair {pair}"))
}

/// Collects the pair's transitions from the request on (printing them unless --json) until it
/// is `Syncing` two epochs later, or fails when `limit` passes first.
async fn follow(
    mut events: tonic::Streaming<crate::proto::Event>,
    a: &DrillArgs,
    epoch: u64,
    requested_ms: u64,
    limit: Duration,
) -> anyhow::Result<Vec<Transition>> {
    let mut steps: Vec<Transition> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let so_far = || steps.iter().map(|s| s.0.to_string()).collect::<Vec<_>>();
        let e = tokio::select! {
            e = events.message() => e.map_err(status)?,
            _ = tokio::time::sleep_until(deadline) => {
                let why = format!(
                    "the drill did not finish within {} s (transitions so far: {:?})",
                    limit.as_secs(),
                    so_far()
                );
                return Err(crate::cli::Exiting::new(Exit::Timeout, why).into());
            }
        };
        let Some(e) = e else {
            let why = format!(
                "the coordinator ended the event stream (transitions so far: {:?})",
                so_far()
            );
            return Err(crate::cli::Exiting::new(Exit::Unreachable, why).into());
        };
        if e.pair != a.pair || e.kind() != EventKind::Transition || e.unix_ms < requested_ms {
            continue;
        }
        let t = e.unix_ms.saturating_sub(requested_ms);
        if !a.json {
            println!(
                "[{:>7.2}s] {} -> {}: {}",
                t as f64 / 1000.0,
                e.from_state(),
                e.to_state(),
                e.message
            );
        }
        steps.push((e.to_state(), t, e.message.clone()));
        if e.to_state() == PairState::Syncing && e.epoch >= epoch + 2 {
            return Ok(steps);
        }
    }
}

fn print_table(ph: &[Phase]) {
    println!();
    println!(
        "{:<13} {:>9} {:>10} {:>10}  result",
        "phase", "start", "duration", "target"
    );
    for p in ph {
        println!(
            "{:<13} {:>8.2}s {:>9.2}s {:>9.0}s  {}",
            p.phase,
            p.start_ms as f64 / 1000.0,
            p.duration_ms as f64 / 1000.0,
            p.target_ms as f64 / 1000.0,
            if p.met { "met" } else { "MISSED" }
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_measured_between_transitions_and_checked_against_targets() {
        let s = |st: PairState, t: u64| (st, t, format!("-> {st}"));
        let steps = vec![
            s(PairState::FailedOver, 120),
            s(PairState::Provisioning, 300),
            s(PairState::Restoring, 2_300),
            s(PairState::CuttingOver, 9_300),
            s(PairState::Syncing, 9_800),
        ];
        let secs = Duration::from_secs;
        let ph = phases(&steps, &[secs(1), secs(60), secs(5), secs(1), secs(60)]);
        let got: Vec<(&str, u64, bool)> =
            ph.iter().map(|p| (p.phase, p.duration_ms, p.met)).collect();
        assert_eq!(
            got,
            vec![
                ("failover", 120, true),
                ("provisioning", 2_000, true),
                ("restore", 7_000, false),
                ("cutover", 500, true),
                ("total", 9_800, true),
            ]
        );
        // An unfinished drill has no total.
        assert!(
            phases(&steps[..2], &[secs(1); 5])
                .iter()
                .all(|p| p.phase != "total")
        );
    }
}
