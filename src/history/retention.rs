//! Which snapshots to keep: restic's `forget` policies by time, then a disk budget. Pure: the
//! snapshots' times and the clock come in, decisions go out (ARCHITECTURE.md, "History").
//!
//! By time, a snapshot is kept when it is the newest of all, or younger than `keep_all_for`,
//! or the newest of its UTC hour and younger than `hourly_for`, or the newest of its UTC day and
//! younger than `daily_for` (a zero duration turns a rule off). Then, with a budget, the oldest
//! kept snapshots are dropped, never the newest, until the packs they need fit.

use std::time::Duration;

use serde::{Deserialize, Serialize};

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The retention policy, as the agent's TOML spells it:
/// `keep_all_for = "1h"`, `hourly_for = "2days"`, `daily_for = "14days"`, `budget_bytes = 0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    #[serde(with = "human")]
    pub keep_all_for: Duration,
    #[serde(with = "human")]
    pub hourly_for: Duration,
    #[serde(with = "human")]
    pub daily_for: Duration,
    /// Bytes of packs the store may use; 0: no budget. Counted as the stored bytes of the
    /// chunks the kept snapshots need: pack headers and footers, and the dead part of packs
    /// under half dead (not repacked), come on top.
    pub budget_bytes: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            keep_all_for: Duration::from_secs(3600),
            hourly_for: Duration::from_secs(48 * 3600),
            daily_for: Duration::from_secs(14 * 24 * 3600),
            budget_bytes: 0,
        }
    }
}

mod human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::cli::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Which snapshots the time rules keep. `times_ms` are the snapshots' times, oldest first (as
/// `Store::list` gives them); the answer has one flag per snapshot.
pub fn by_time(times_ms: &[u64], now_ms: u64, r: &Retention) -> Vec<bool> {
    let n = times_ms.len();
    let mut keep = vec![false; n];
    if let Some(last) = keep.last_mut() {
        *last = true;
    }
    let age = |t: u64| now_ms.saturating_sub(t);
    let within = |t: u64, d: Duration| !d.is_zero() && u128::from(age(t)) <= d.as_millis();
    for (i, &t) in times_ms.iter().enumerate() {
        // The next snapshot (newer) falls in another bucket: this one is its bucket's newest.
        let newest_of = |bucket: u64| {
            times_ms
                .get(i + 1)
                .is_none_or(|&next| next / bucket != t / bucket)
        };
        keep[i] |= within(t, r.keep_all_for)
            || (within(t, r.hourly_for) && newest_of(HOUR_MS))
            || (within(t, r.daily_for) && newest_of(DAY_MS));
    }
    keep
}

/// The pack bytes a set of kept snapshots needs, as they are dropped one by one.
pub trait Footprint {
    /// Bytes needed by the snapshots still kept.
    fn bytes(&self) -> u64;
    /// Stops counting the snapshot at `index` (into the list given to [`by_budget`]).
    fn drop_snapshot(&mut self, index: usize);
}

/// Which of the kept snapshots (flags from [`by_time`], oldest first) to drop for the budget:
/// the oldest first, never the newest kept, until the footprint fits. 0: no budget.
pub fn by_budget(keep: &[bool], budget: u64, footprint: &mut impl Footprint) -> Vec<usize> {
    let mut dropped = Vec::new();
    if budget == 0 {
        return dropped;
    }
    let kept: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
    for &i in kept.iter().take(kept.len().saturating_sub(1)) {
        if footprint.bytes() <= budget {
            break;
        }
        footprint.drop_snapshot(i);
        dropped.push(i);
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    const MIN_MS: u64 = 60_000;
    const NOW: u64 = 1000 * DAY_MS + 10 * HOUR_MS + 30 * MIN_MS;

    fn ago(ms: u64) -> u64 {
        NOW - ms
    }

    fn kept(times: &[u64], r: &Retention) -> Vec<u64> {
        let keep = by_time(times, NOW, r);
        times
            .iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(t, _)| NOW - t)
            .collect()
    }

    #[test]
    fn nothing_and_one_snapshot() {
        assert!(by_time(&[], NOW, &Retention::default()).is_empty());
        let none = Retention {
            keep_all_for: Duration::ZERO,
            hourly_for: Duration::ZERO,
            daily_for: Duration::ZERO,
            budget_bytes: 0,
        };
        // The newest is kept even when every rule is off and it is ancient.
        assert_eq!(by_time(&[ago(400 * DAY_MS)], NOW, &none), [true]);
        assert_eq!(
            by_time(&[ago(400 * DAY_MS), ago(300 * DAY_MS)], NOW, &none),
            [false, true]
        );
    }

    #[test]
    fn last_hour_keeps_everything() {
        let times: Vec<u64> = (0..60).rev().map(|m| ago(m * MIN_MS)).collect();
        let r = Retention::default();
        assert_eq!(kept(&times, &r).len(), 60);
        // Just over the hour: only the newest of its (clock) hour survives.
        let older = [ago(61 * MIN_MS), ago(62 * MIN_MS)];
        assert_eq!(kept(&[older[1], older[0], ago(0)], &r), [61 * MIN_MS, 0]);
    }

    #[test]
    fn hourly_keeps_the_newest_of_each_clock_hour_for_48_hours() {
        // Every 20 minutes for 3 days, oldest first.
        let times: Vec<u64> = (0..(3 * 24 * 3))
            .rev()
            .map(|k| ago(k * 20 * MIN_MS))
            .collect();
        let r = Retention {
            daily_for: Duration::ZERO,
            ..Retention::default()
        };
        let keep = kept(&times, &r);
        // Within the hour: 0, 20, 40 minutes ago. Then one per clock hour back to 48 h.
        assert_eq!(&keep[keep.len() - 3..], [40 * MIN_MS, 20 * MIN_MS, 0]);
        let hourly: HashSet<u64> = keep
            .iter()
            .filter(|a| **a > HOUR_MS)
            .map(|a| (NOW - a) / HOUR_MS)
            .collect();
        assert_eq!(
            hourly.len(),
            keep.iter().filter(|a| **a > HOUR_MS).count(),
            "one per hour"
        );
        assert!(keep.iter().all(|a| *a <= 48 * HOUR_MS));
        assert!(keep.len() >= 48, "{}", keep.len());
        // The one kept in each hour is its newest: NOW is at :30, so hour buckets end at :00.
        for a in keep.iter().filter(|a| **a > HOUR_MS) {
            let t = NOW - a;
            assert!(
                t % HOUR_MS >= 40 * MIN_MS,
                "{} min past the hour",
                (t % HOUR_MS) / MIN_MS
            );
        }
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_for_14_days() {
        // Every 6 hours for 20 days.
        let times: Vec<u64> = (0..80).rev().map(|k| ago(k * 6 * HOUR_MS)).collect();
        let r = Retention {
            keep_all_for: Duration::ZERO,
            hourly_for: Duration::ZERO,
            ..Retention::default()
        };
        let keep = kept(&times, &r);
        let days: Vec<u64> = keep.iter().map(|a| (NOW - a) / DAY_MS).collect();
        let distinct: HashSet<u64> = days.iter().copied().collect();
        assert_eq!(distinct.len(), days.len(), "one per day");
        assert!(keep.iter().all(|a| *a <= 14 * DAY_MS));
        assert_eq!(keep.len(), 15, "today and 14 days back: {keep:?}");
    }

    #[test]
    fn a_snapshot_from_the_future_is_kept() {
        let r = Retention::default();
        assert_eq!(
            by_time(&[NOW + HOUR_MS, NOW + 2 * HOUR_MS], NOW, &r),
            [true, true]
        );
    }

    /// Snapshots made of chunks with sizes; bytes = all chunks any kept snapshot uses.
    struct Fake {
        snaps: Vec<Vec<(u32, u64)>>,
        dropped: HashSet<usize>,
    }

    impl Footprint for Fake {
        fn bytes(&self) -> u64 {
            let mut live = HashMap::new();
            for (i, s) in self.snaps.iter().enumerate() {
                if !self.dropped.contains(&i) {
                    live.extend(s.iter().copied());
                }
            }
            live.values().sum()
        }

        fn drop_snapshot(&mut self, index: usize) {
            self.dropped.insert(index);
        }
    }

    #[test]
    fn budget_drops_oldest_kept_first_never_the_newest() {
        let snaps = vec![
            vec![(1, 100), (2, 100)],
            vec![(2, 100), (3, 100)],
            vec![(3, 100), (4, 100)],
            vec![(4, 100), (5, 100)],
        ];
        let fake = |s: &Vec<Vec<(u32, u64)>>| Fake {
            snaps: s.clone(),
            dropped: HashSet::new(),
        };
        let all = [true; 4];
        assert!(
            by_budget(&all, 0, &mut fake(&snaps)).is_empty(),
            "0: no budget"
        );
        assert!(by_budget(&all, 500, &mut fake(&snaps)).is_empty(), "fits");
        assert_eq!(by_budget(&all, 400, &mut fake(&snaps)), [0]);
        assert_eq!(by_budget(&all, 300, &mut fake(&snaps)), [0, 1]);
        assert_eq!(by_budget(&all, 250, &mut fake(&snaps)), [0, 1, 2]);
        // Even a budget nothing fits in keeps the newest.
        assert_eq!(by_budget(&all, 1, &mut fake(&snaps)), [0, 1, 2]);
        // Snapshots the time rules dropped are not counted again.
        assert_eq!(
            by_budget(&[false, true, false, true], 1, &mut fake(&snaps)),
            [1]
        );
    }

    #[test]
    fn toml_round_trip_with_human_durations() {
        let r: Retention = toml::from_str("keep_all_for = \"30m\"\nbudget_bytes = 1000").unwrap();
        assert_eq!(r.keep_all_for, Duration::from_secs(1800));
        assert_eq!(r.hourly_for, Retention::default().hourly_for);
        assert_eq!(r.budget_bytes, 1000);
        let back: Retention = toml::from_str(&toml::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(
            toml::from_str::<Retention>("hourly = \"1h\"").is_err(),
            "unknown keys are refused"
        );
        assert!(toml::from_str::<Retention>("daily_for = \"soon\"").is_err());
    }
}
