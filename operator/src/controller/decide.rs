//! What to do about the difference between the desired groups and the
//! observed ones. Pure: the reconcile carries the actions out.
//!
//! - A missing group is created; a group at or above `replicas` is removed.
//! - A group whose rank failed is restarted whole (its pods deleted; the
//!   StatefulSet recreates them), at most once per [`RESTART_INTERVAL`].
//! - A changed spec rolls groups: one that serves is rolled only when every
//!   other group serves, one at a time; one that does not serve anyway is
//!   rolled at once (waiting for it would deadlock a broken deployment).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::check::Topology;
use super::desired::Desired;
use super::labels::GroupId;
use super::observe::{GroupObserved, Observed};

/// The least time between two restarts of the same group: a rank that
/// fails at once would otherwise make the group restart in a tight loop.
pub const RESTART_INTERVAL: Duration = Duration::from_secs(30);

/// What one reconcile does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Actions {
    /// Groups whose StatefulSet is applied (new, current, or rolled).
    pub apply: Vec<GroupId>,
    /// Groups that did not exist.
    pub created: Vec<GroupId>,
    /// Groups restarted onto a new spec.
    pub rolled: Vec<GroupRestart>,
    /// Groups restarted because a rank failed.
    pub restarted: Vec<GroupRestart>,
    /// Stale groups left as they are until the others serve.
    pub waiting: Vec<GroupId>,
    /// Groups at or above `replicas`: StatefulSet and Service deleted.
    pub removed: Vec<GroupId>,
    /// Come back this soon (a restart held back by [`RESTART_INTERVAL`]).
    pub requeue_after: Option<Duration>,
}

/// A group whose pods are deleted so that it restarts together.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRestart {
    pub id: GroupId,
    /// The failure (for a restart) or the new spec hash (for a roll).
    pub why: String,
    /// `(name, uid)` of the pods to delete.
    pub pods: Vec<(String, Option<String>)>,
}

impl Actions {
    /// Whether this reconcile changes nothing but re-applies what exists.
    pub fn settled(&self) -> bool {
        self.created.is_empty()
            && self.rolled.is_empty()
            && self.restarted.is_empty()
            && self.waiting.is_empty()
            && self.removed.is_empty()
            && self.requeue_after.is_none()
    }

    /// Whether group `id` is being restarted or rolled now.
    pub fn restarting(&self, id: GroupId) -> bool {
        self.rolled
            .iter()
            .chain(&self.restarted)
            .any(|r| r.id == id)
    }
}

/// The actions that bring `observed` to `desired`, at time `now`.
pub fn decide(
    desired: &Desired,
    observed: &Observed,
    topology: &Topology,
    now: Timestamp,
) -> Actions {
    let mut actions = Actions::default();
    let ready = |id: GroupId| {
        observed
            .groups
            .get(&id)
            .is_some_and(|g| g.is_ready(topology.pods_per_group))
    };
    let mut stale = Vec::new();
    for group in &desired.groups {
        let id = group.id;
        let Some(obs) = observed.groups.get(&id).filter(|g| g.statefulset.is_some()) else {
            actions.apply.push(id);
            actions.created.push(id);
            continue;
        };
        if !obs.runs(&group.spec_hash) {
            stale.push((id, obs, group.spec_hash.as_str()));
            continue;
        }
        actions.apply.push(id);
        // One rank alone is a whole group: the kubelet's restart suffices.
        if topology.tensor > 1
            && !obs.terminating()
            && let Some(failure) = obs.failure()
        {
            let since = obs
                .youngest_pod()
                .map_or(RESTART_INTERVAL, |t| elapsed(t, now));
            if since >= RESTART_INTERVAL {
                actions
                    .restarted
                    .push(restart(id, obs, failure.to_string()));
            } else {
                let wait = RESTART_INTERVAL - since;
                actions.requeue_after = Some(actions.requeue_after.map_or(wait, |w| w.min(wait)));
            }
        }
    }
    for &(id, obs, hash) in &stale {
        if !ready(id) {
            actions.apply.push(id);
            actions.rolled.push(roll(id, obs, hash));
        }
    }
    let mut ready_stale = stale.iter().filter(|(id, ..)| ready(*id));
    if let Some(&(id, obs, hash)) = ready_stale.next() {
        let others_serve = desired
            .groups
            .iter()
            .filter(|g| g.id != id)
            .all(|g| ready(g.id) && !actions.restarting(g.id));
        if others_serve {
            actions.apply.push(id);
            actions.rolled.push(roll(id, obs, hash));
        } else {
            actions.waiting.push(id);
        }
    }
    actions.waiting.extend(ready_stale.map(|(id, ..)| *id));
    actions.apply.sort();
    actions.removed = observed
        .groups
        .iter()
        .filter(|(id, g)| id.0 >= topology.groups && (g.statefulset.is_some() || g.service))
        .map(|(id, _)| *id)
        .collect();
    actions
}

/// Deletes the pods that run an old spec (a roll interrupted halfway
/// leaves some already new).
fn roll(id: GroupId, obs: &GroupObserved, hash: &str) -> GroupRestart {
    GroupRestart {
        id,
        why: hash.to_string(),
        pods: obs
            .stale_pods(hash)
            .map(|p| (p.name.clone(), p.uid.clone()))
            .collect(),
    }
}

/// Deletes every pod of the group: its ranks restart together.
fn restart(id: GroupId, obs: &GroupObserved, why: String) -> GroupRestart {
    GroupRestart {
        id,
        why,
        pods: obs
            .live_pods()
            .map(|p| (p.name.clone(), p.uid.clone()))
            .collect(),
    }
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests;
