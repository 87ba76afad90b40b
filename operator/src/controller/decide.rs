//! What to do about the difference between the desired groups and the
//! observed ones. Pure: the reconcile carries the actions out.
//!
//! - A missing group is created; a group at or above `replicas` is removed.
//! - A group whose rank failed is restarted whole (its pods deleted; the
//!   StatefulSet recreates them). A rank failed when a pod failed, a rank
//!   container restarted or exited, or a pod the group formed with is gone or was
//!   replaced ([`GroupObserved::lost_member`]: the StatefulSet controller may
//!   recreate a failed pod before the operator sees it fail). Repeated restarts
//!   back off, 10 s doubling to 5 min; the count resets once the group has served
//!   for 10 min.
//! - A changed spec rolls groups: one that serves is rolled only when every
//!   other group serves, one at a time; one that does not serve anyway is
//!   rolled at once (waiting for it would deadlock a broken deployment).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::check::Topology;
use super::desired::Desired;
use super::labels::GroupId;
use super::observe::{GroupObserved, Observed, Restarts};

/// The wait between a group's first restart and its second; it doubles with each
/// restart that follows, up to [`RESTART_BACKOFF_MAX`]. The first is at once.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(10);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A group that has served this long has its restart count reset.
pub const RESTART_RESET_AFTER: Duration = Duration::from_secs(600);

/// The least time between a group's restart `count + 1` and `count + 2`.
pub fn restart_backoff(count: u32) -> Duration {
    RESTART_BACKOFF
        .saturating_mul(1u32 << count.min(16))
        .min(RESTART_BACKOFF_MAX)
}

/// How long after a group is marked draining the routers' count of its requests is
/// trusted: by then every router has seen the mark (they watch the status) and
/// sends it nothing new, so no request can start on it after a count of zero.
pub const DRAIN_SETTLE: Duration = Duration::from_secs(10);
/// How often a draining group is looked at.
pub const DRAIN_RECHECK: Duration = Duration::from_secs(2);

/// What a group's StatefulSet records about it (annotations written with it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupRecord {
    /// The uids of the pods it formed with, by index.
    pub formed_with: Option<Vec<String>>,
    pub restarts: Restarts,
}

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
    /// The deployment's `replicas` groups ([`super::members`]).
    pub members: Vec<GroupId>,
    /// Groups that are not members any more, drained: StatefulSet and Service deleted.
    pub removed: Vec<GroupId>,
    /// Groups leaving (scale-down, or a roll of one that serves) that finish their
    /// streams first: shown `Draining`, so the routers send them nothing new.
    pub draining: Vec<GroupId>,
    /// Of those, the ones that begin now: their StatefulSet gets
    /// [`super::labels::DRAINING_SINCE_ANNOTATION`].
    pub drain: Vec<GroupId>,
    /// Groups that stay (scaled back up, or rolled) whose draining mark is cleared.
    pub undrain: Vec<GroupId>,
    /// Come back this soon (a restart held back by its backoff).
    pub requeue_after: Option<Duration>,
    /// What each applied group's StatefulSet records.
    pub records: std::collections::BTreeMap<GroupId, GroupRecord>,
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
            && self.draining.is_empty()
            && self.undrain.is_empty()
            && self.requeue_after.is_none()
    }

    /// Come back within `after` at the latest.
    fn requeue_within(&mut self, after: Duration) {
        self.requeue_after = Some(self.requeue_after.map_or(after, |a| a.min(after)));
    }

    /// Whether group `id` is being restarted or rolled now.
    pub fn restarting(&self, id: GroupId) -> bool {
        self.rolled
            .iter()
            .chain(&self.restarted)
            .any(|r| r.id == id)
    }
}

impl GroupRecord {
    /// `statefulset` with this record in its annotations (server-side apply drops
    /// those left out, so a record is written whole every time).
    pub fn written_on(
        &self,
        statefulset: &k8s_openapi::api::apps::v1::StatefulSet,
    ) -> k8s_openapi::api::apps::v1::StatefulSet {
        use super::labels::{POD_UIDS_ANNOTATION, RESTARTS_ANNOTATION};
        let mut statefulset = statefulset.clone();
        let annotations = statefulset
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        if let Some(uids) = &self.formed_with {
            annotations.insert(POD_UIDS_ANNOTATION.into(), uids.join(","));
        }
        if let Some(restarts) = self.restarts.annotation() {
            annotations.insert(RESTARTS_ANNOTATION.into(), restarts);
        }
        statefulset
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
        if obs.draining_since.is_some() {
            actions.undrain.push(id);
        }
        let mut record = GroupRecord {
            formed_with: obs.formed_with.clone(),
            restarts: obs.restarts.clone(),
        };
        // One rank alone is a whole group: the kubelet's restart suffices. A member
        // lost counts even while pods terminate (someone else deleted them); the
        // other failures wait for a restart under way to finish.
        let failure = match topology.tensor > 1 {
            true => obs.lost_member().or_else(|| {
                (!obs.terminating())
                    .then(|| obs.failure().map(str::to_string))
                    .flatten()
            }),
            false => None,
        };
        if let Some(failure) = failure {
            // The first restart is at once; each after it waits for its backoff.
            let since = record
                .restarts
                .last
                .map_or(Duration::MAX, |t| elapsed(t, now));
            let backoff = restart_backoff(record.restarts.count.saturating_sub(1));
            if since >= backoff {
                record.formed_with = None;
                record.restarts = Restarts {
                    count: record.restarts.count + 1,
                    last: Some(now),
                    reason: Some(failure.clone()),
                };
                actions.restarted.push(restart(id, obs, failure));
            } else {
                actions.requeue_within(backoff - since);
            }
        } else {
            if record.formed_with.is_none() && !obs.terminating() {
                record.formed_with = obs.formation(topology.pods_per_group);
            }
            let served_long = obs.is_ready(topology.pods_per_group)
                && obs
                    .youngest_pod()
                    .is_some_and(|t| elapsed(t, now) >= RESTART_RESET_AFTER);
            if served_long {
                record.restarts.count = 0;
            }
        }
        actions.records.insert(id, record);
    }
    // A rolled group forms anew; its restart count stays.
    let rolled_record = |obs: &GroupObserved| GroupRecord {
        formed_with: None,
        restarts: obs.restarts.clone(),
    };
    let rolls = |actions: &mut Actions, id: GroupId, obs: &GroupObserved, hash: &str| {
        actions.apply.push(id);
        actions.rolled.push(roll(id, obs, hash));
        actions.records.insert(id, rolled_record(obs));
        // Its new pods serve again once ready.
        if obs.draining_since.is_some() {
            actions.undrain.push(id);
        }
    };
    for &(id, obs, hash) in &stale {
        if !ready(id) {
            rolls(&mut actions, id, obs, hash);
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
            // A group that serves finishes its streams before its pods go.
            match drain_state(obs, topology, desired.drain_timeout, now) {
                Drain::Done => rolls(&mut actions, id, obs, hash),
                drain => actions.drains(id, drain),
            }
        } else {
            actions.waiting.push(id);
        }
    }
    actions.waiting.extend(ready_stale.map(|(id, ..)| *id));
    actions.apply.sort();
    let members: Vec<GroupId> = desired.groups.iter().map(|g| g.id).collect();
    let leaving = observed
        .groups
        .iter()
        .filter(|(id, g)| !members.contains(id) && (g.statefulset.is_some() || g.service));
    for (&id, obs) in leaving {
        match drain_state(obs, topology, desired.drain_timeout, now) {
            Drain::Done => actions.removed.push(id),
            drain => actions.drains(id, drain),
        }
    }
    actions.members = members;
    actions
}

/// Where a leaving group's drain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    /// It serves and is not marked yet.
    Start,
    /// Its streams may still run: look again within this.
    Wait(Duration),
    /// Nothing runs on it any more (the routers counted none once they had seen the
    /// mark), it serves nothing, or the drain timeout has passed.
    Done,
}

fn drain_state(
    obs: &GroupObserved,
    topology: &Topology,
    timeout: Duration,
    now: Timestamp,
) -> Drain {
    // A group that does not serve has no streams to finish.
    if !obs.is_ready(topology.pods_per_group) {
        return Drain::Done;
    }
    let Some(since) = obs.draining_since else {
        return match timeout.is_zero() {
            true => Drain::Done,
            false => Drain::Start,
        };
    };
    let waited = elapsed(since, now);
    if waited >= timeout {
        return Drain::Done;
    }
    let idle = obs
        .outstanding
        .is_some_and(|(at, n)| n == 0 && elapsed(since, at) >= DRAIN_SETTLE);
    match idle {
        true => Drain::Done,
        false => Drain::Wait(DRAIN_RECHECK.min(timeout - waited)),
    }
}

impl Actions {
    fn drains(&mut self, id: GroupId, drain: Drain) {
        self.draining.push(id);
        match drain {
            Drain::Start => {
                self.drain.push(id);
                self.requeue_within(DRAIN_RECHECK);
            }
            Drain::Wait(after) => self.requeue_within(after),
            Drain::Done => {}
        }
    }
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
