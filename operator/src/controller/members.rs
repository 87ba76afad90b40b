//! Which groups make up a deployment's `replicas`. Groups are numbered
//! StatefulSets, but the numbers need not be `0..replicas`: on scale-down the
//! least loaded group leaves, whatever its number. Pure; the operator keeps no
//! state, so the members are read back from what exists: every group that exists
//! and is not draining, trimmed or topped up to `replicas`.

use super::labels::GroupId;
use super::observe::Observed;

/// The `replicas` groups the deployment runs, in order. With more groups than
/// `replicas` the ones that go first are those not serving (they have no streams
/// to finish), then the fewest requests outstanding at the routers, then the
/// highest numbers; with fewer, draining groups come back first (loaded and
/// still serving), then the lowest free numbers.
pub fn members(replicas: u32, observed: &Observed, pods_per_group: u32) -> Vec<GroupId> {
    let replicas = replicas as usize;
    let mut staying: Vec<GroupId> = observed
        .groups
        .iter()
        .filter(|(_, g)| g.statefulset.is_some() && g.draining_since.is_none())
        .map(|(id, _)| *id)
        .collect();
    if staying.len() > replicas {
        // Most worth keeping first: serving, busiest, lowest number.
        staying.sort_by_key(|id| {
            let g = &observed.groups[id];
            let outstanding = g.outstanding.map_or(0, |(_, n)| n);
            (
                !g.is_ready(pods_per_group),
                std::cmp::Reverse(outstanding),
                *id,
            )
        });
        staying.truncate(replicas);
    } else if staying.len() < replicas {
        let mut draining: Vec<GroupId> = observed
            .groups
            .iter()
            .filter(|(_, g)| g.statefulset.is_some() && g.draining_since.is_some())
            .map(|(id, _)| *id)
            .collect();
        draining.sort();
        let back = draining.len().min(replicas - staying.len());
        staying.extend(draining.drain(..back));
        let mut next = 0;
        while staying.len() < replicas {
            // Free: no object of it left (a leaving group's Service may linger).
            if !observed.groups.contains_key(&GroupId(next)) {
                staying.push(GroupId(next));
            }
            next += 1;
        }
    }
    staying.sort();
    staying
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{ago, demo, desired_of, existing, marked_draining, now, pod};
    use crate::controller::observe::observe;

    fn ids(ids: &[u32]) -> Vec<GroupId> {
        ids.iter().copied().map(GroupId).collect()
    }

    /// Groups `existing` of the demo, serving, with `outstanding[i]` requests on
    /// group `existing[i]`.
    fn observed(existing_ids: &[u32], outstanding: &[u64]) -> Observed {
        let md = demo(existing_ids.len() as u32);
        let (statefulsets, services) = existing(&md, existing_ids, None);
        let desired = desired_of(&demo(8));
        let pods: Vec<_> = existing_ids
            .iter()
            .map(|&g| pod("smollm2", g, 0, &desired.groups[g as usize].spec_hash))
            .collect();
        let mut observed = observe(&statefulsets, &services, &pods);
        for (id, n) in existing_ids.iter().zip(outstanding) {
            observed.groups.get_mut(&GroupId(*id)).unwrap().outstanding = Some((now(), *n));
        }
        observed
    }

    #[test]
    fn the_least_loaded_group_leaves_whatever_its_number() {
        let obs = observed(&[0, 1, 2], &[5, 0, 3]);
        assert_eq!(members(2, &obs, 1), ids(&[0, 2]));
        assert_eq!(members(1, &obs, 1), ids(&[0]));
        // Without counts (no routers known), the highest numbers go.
        let obs = observed(&[0, 1, 2], &[]);
        assert_eq!(members(2, &obs, 1), ids(&[0, 1]));
    }

    #[test]
    fn a_group_that_does_not_serve_leaves_before_a_serving_one() {
        let mut obs = observed(&[0, 1, 2], &[0, 0, 9]);
        obs.groups.get_mut(&GroupId(0)).unwrap().pods.clear();
        assert_eq!(members(2, &obs, 1), ids(&[1, 2]));
    }

    #[test]
    fn scaling_up_brings_draining_groups_back_then_fills_the_gaps() {
        let md = demo(3);
        let (mut statefulsets, services) = existing(&md, &[0, 2, 3], None);
        statefulsets[2] = marked_draining(statefulsets[2].clone(), ago(5));
        let obs = observe(&statefulsets, &services, &[]);
        // Members now: 0 and 2; 3 drains.
        assert_eq!(members(2, &obs, 1), ids(&[0, 2]));
        assert_eq!(members(3, &obs, 1), ids(&[0, 2, 3]));
        assert_eq!(members(5, &obs, 1), ids(&[0, 1, 2, 3, 4]));
    }
}
