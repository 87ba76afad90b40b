//! The builtin autoscaler's decision: how many groups a model should run for the load
//! the routers see. One pure function, for the operator and `shardserve up` alike; the
//! caller keeps its [`Memory`] between calls (the operator on the ModelDeployment, since
//! it keeps no state of its own; `up` in memory).
//!
//! Wanted groups = ceil(in-flight requests / target), within the bounds, at least one
//! while requests wait. More groups are added once the load has asked for more for
//! `scaleUpDelay` (at once by default), as many as it asked for at its lowest over that
//! time, so a burst shorter than the delay adds nothing; from zero, at once, since
//! requests are held until a group serves. Groups are removed once the load has asked
//! for fewer for `scaleDownDelay` without a break, down to the most it asked for over
//! that time, so a load that flaps around a boundary keeps its groups.
//!
//! [`Autoscaler`] runs the decision in the operator; [`Record`] is what it keeps on
//! each ModelDeployment.

mod record;
mod scaler;

use std::time::Duration;

pub use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::{AutoscalingMode, AutoscalingSpec};

pub use record::{AUTOSCALER_ANNOTATION, Change, Record};
pub use scaler::{AUTOSCALED, Autoscaler, FIELD_MANAGER, INTERVAL};

/// The builtin autoscaler's settings, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// In-flight requests per group aimed for.
    pub target: u32,
    pub up_delay: Duration,
    pub down_delay: Duration,
}

impl Policy {
    /// The policy of `spec` in builtin mode; `None` in external mode (replicas are
    /// someone else's).
    pub fn of(spec: &AutoscalingSpec) -> Option<Self> {
        (spec.mode() == AutoscalingMode::Builtin).then(|| Self {
            min: spec.min_replicas,
            max: spec.max_replicas.max(spec.min_replicas),
            target: spec.target_in_flight_requests(),
            up_delay: spec.scale_up_delay(),
            down_delay: spec.scale_down_delay(),
        })
    }

    /// Groups for `load` alone, within the bounds.
    pub fn wanted(&self, load: Load) -> u32 {
        let groups = load.in_flight.div_ceil(u64::from(self.target));
        let floor = match load.waiting > 0 {
            true => self.min.max(1),
            false => self.min,
        };
        (groups.min(u64::from(u32::MAX)) as u32).clamp(floor, self.max.max(floor))
    }
}

/// One model's requests, summed over every router.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests waiting (queued, or held while no group serves) or running.
    pub in_flight: u64,
    /// Of those, the ones waiting for a group.
    pub waiting: u64,
}

/// What the autoscaler remembers between decisions: since when the load has asked
/// for more (or fewer) groups than run, and how many at least (at most) meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more_since: Option<Timestamp>,
    /// The fewest groups asked for since `more_since`.
    #[serde(default)]
    pub more_at_least: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fewer_since: Option<Timestamp>,
    /// The most groups asked for since `fewer_since`.
    #[serde(default)]
    pub fewer_at_most: u32,
}

/// What to run now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub replicas: u32,
    /// To keep for the next decision.
    pub memory: Memory,
    /// Why `replicas` changed, when it did.
    pub why: Option<String>,
}

/// How many groups to run, with `current` running, `load` now, `memory` from the
/// last decision.
pub fn decide(
    policy: &Policy,
    current: u32,
    load: Load,
    memory: Memory,
    now: Timestamp,
) -> Decision {
    let wanted = policy.wanted(load);
    let change = |replicas: u32, why: String| Decision {
        replicas,
        memory: Memory::default(),
        why: Some(why),
    };
    if current < policy.min || current > policy.max {
        let replicas = current.clamp(policy.min, policy.max);
        return change(
            replicas,
            format!(
                "{current} group(s) lie outside autoscaling's {}..={}",
                policy.min, policy.max
            ),
        );
    }
    if wanted > current {
        if current == 0 {
            return change(
                wanted,
                format!("{} request(s) wait and no group runs", load.waiting.max(1)),
            );
        }
        let since = memory.more_since.unwrap_or(now);
        let at_least = match memory.more_since {
            Some(_) => memory.more_at_least.min(wanted),
            None => wanted,
        };
        if elapsed(since, now) >= policy.up_delay {
            return change(
                at_least,
                format!(
                    "{} request(s) in flight, {} per group aimed for",
                    load.in_flight, policy.target
                ),
            );
        }
        return Decision {
            replicas: current,
            memory: Memory {
                more_since: Some(since),
                more_at_least: at_least,
                ..Memory::default()
            },
            why: None,
        };
    }
    if wanted < current {
        let since = memory.fewer_since.unwrap_or(now);
        let at_most = match memory.fewer_since {
            Some(_) => memory.fewer_at_most.max(wanted),
            None => wanted,
        };
        if elapsed(since, now) >= policy.down_delay {
            return change(
                at_most,
                format!(
                    "the load asked for {at_most} group(s) at most over {} s ({} request(s) \
                     in flight now, {} per group aimed for)",
                    policy.down_delay.as_secs(),
                    load.in_flight,
                    policy.target
                ),
            );
        }
        return Decision {
            replicas: current,
            memory: Memory {
                fewer_since: Some(since),
                fewer_at_most: at_most,
                ..Memory::default()
            },
            why: None,
        };
    }
    Decision {
        replicas: current,
        memory: Memory::default(),
        why: None,
    }
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: u32, max: u32, up: u64, down: u64) -> Policy {
        Policy {
            min,
            max,
            target: 4,
            up_delay: Duration::from_secs(up),
            down_delay: Duration::from_secs(down),
        }
    }

    fn load(in_flight: u64, waiting: u64) -> Load {
        Load { in_flight, waiting }
    }

    /// Runs `loads` (one per second from t = 0) through the autoscaler from `start`
    /// groups; the groups after each second.
    fn run(policy: &Policy, start: u32, loads: &[Load]) -> Vec<u32> {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let mut replicas = start;
        let mut memory = Memory::default();
        loads
            .iter()
            .enumerate()
            .map(|(second, &load)| {
                let now = t0 + Duration::from_secs(second as u64);
                let decision = decide(policy, replicas, load, memory, now);
                assert_eq!(decision.why.is_some(), decision.replicas != replicas);
                replicas = decision.replicas;
                memory = decision.memory;
                replicas
            })
            .collect()
    }

    #[test]
    fn groups_follow_the_in_flight_requests_within_the_bounds() {
        let p = policy(1, 3, 0, 0);
        assert_eq!(p.wanted(load(0, 0)), 1);
        assert_eq!(p.wanted(load(4, 0)), 1);
        assert_eq!(p.wanted(load(5, 0)), 2);
        assert_eq!(p.wanted(load(12, 0)), 3);
        assert_eq!(p.wanted(load(1000, 0)), 3);
        let to_zero = policy(0, 2, 0, 0);
        assert_eq!(to_zero.wanted(load(0, 0)), 0);
        // A waiting request needs a group, however few are asked for.
        assert_eq!(to_zero.wanted(load(1, 1)), 1);
    }

    #[test]
    fn a_steady_load_settles_and_stays() {
        let p = policy(0, 4, 0, 30);
        let loads = vec![load(12, 0); 120];
        let groups = run(&p, 1, &loads);
        assert_eq!(groups[0], 3);
        assert!(groups.iter().all(|&g| g == 3), "{groups:?}");
    }

    #[test]
    fn scale_from_zero_is_at_once_even_with_an_up_delay() {
        let p = policy(0, 2, 60, 20);
        let groups = run(&p, 0, &[load(0, 0), load(1, 1), load(1, 0)]);
        assert_eq!(groups, [0, 1, 1]);
    }

    #[test]
    fn a_burst_shorter_than_the_up_delay_adds_nothing() {
        let p = policy(1, 4, 10, 300);
        let mut loads = vec![load(16, 0); 5];
        loads.extend(vec![load(2, 0); 20]);
        assert!(run(&p, 1, &loads).iter().all(|&g| g == 1));

        // Sustained, it adds as many groups as the load asked for at its lowest.
        let mut loads = vec![load(16, 0); 5];
        loads.extend(vec![load(9, 0); 10]);
        let groups = run(&p, 1, &loads);
        assert_eq!(groups[9], 1);
        assert_eq!(groups[10], 3, "{groups:?}");
    }

    #[test]
    fn groups_leave_only_after_the_down_delay_of_lower_load() {
        let p = policy(0, 2, 0, 20);
        let mut loads = vec![load(8, 0); 3];
        loads.extend(vec![load(0, 0); 25]);
        let groups = run(&p, 2, &loads);
        // t=3 is the first idle second: 20 s later, both leave at once.
        assert!(groups[..23].iter().all(|&g| g == 2), "{groups:?}");
        assert_eq!(groups[23], 0, "{groups:?}");
    }

    #[test]
    fn a_load_flapping_across_a_boundary_keeps_its_groups() {
        let p = policy(1, 4, 0, 20);
        // 8 in flight (2 groups) and 3 (1 group) alternating every 5 s for 2 min.
        let loads: Vec<Load> = (0..120)
            .map(|s| match (s / 5) % 2 {
                0 => load(8, 0),
                _ => load(3, 0),
            })
            .collect();
        let groups = run(&p, 2, &loads);
        assert!(groups.iter().all(|&g| g == 2), "{groups:?}");
    }

    #[test]
    fn a_lower_load_steps_down_to_the_most_it_asked_for_meanwhile() {
        let p = policy(1, 4, 0, 10);
        // From 4 groups: the load wants 2, then 1, for 10 s: it goes to 2.
        let mut loads = vec![load(8, 0); 5];
        loads.extend(vec![load(2, 0); 10]);
        let groups = run(&p, 4, &loads);
        assert_eq!(groups[9], 4);
        assert_eq!(groups[10], 2, "{groups:?}");
    }

    #[test]
    fn never_to_zero_while_requests_wait() {
        let p = policy(0, 2, 0, 5);
        let loads = vec![load(1, 1); 30];
        assert!(run(&p, 1, &loads).iter().all(|&g| g == 1));
    }

    #[test]
    fn replicas_outside_the_bounds_come_back_at_once() {
        let p = policy(2, 3, 300, 300);
        assert_eq!(run(&p, 0, &[load(0, 0)]), [2]);
        assert_eq!(run(&p, 7, &[load(100, 0)]), [3]);
    }

    #[test]
    fn external_mode_has_no_policy() {
        let spec: AutoscalingSpec =
            serde_json::from_value(serde_json::json!({"minReplicas": 0, "maxReplicas": 4}))
                .unwrap();
        assert_eq!(spec.mode(), AutoscalingMode::External);
        assert_eq!(Policy::of(&spec), None);
        let spec: AutoscalingSpec = serde_json::from_value(
            serde_json::json!({"maxReplicas": 4, "targetInFlightRequests": 2}),
        )
        .unwrap();
        let policy = Policy::of(&spec).unwrap();
        assert_eq!((policy.min, policy.max, policy.target), (1, 4, 2));
        assert_eq!(policy.down_delay, Duration::from_secs(300));
        assert_eq!(policy.up_delay, Duration::ZERO);
    }
}
