//! The status the operator writes: groups that exist and serve, the pod
//! selector for the `scale` subresource, and the `Ready`, `Progressing` and
//! `Degraded` conditions with a reason and a message. Pure; the time is
//! passed in, and a condition keeps its `lastTransitionTime` while its
//! status stays the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{ConditionType, ModelDeployment, ModelDeploymentStatus};

use super::check::{Refusal, Topology};
use super::decide::Actions;
use super::labels::{GroupId, model_selector};
use super::observe::Observed;

/// The reason of `Degraded` after a rank failed; kept until every group
/// serves again.
const RANK_FAILED: &str = "RankFailed";

/// The status of a deployment that runs, after `actions`.
pub fn running_status(
    md: &ModelDeployment,
    topology: &Topology,
    observed: &Observed,
    actions: &Actions,
    now: Timestamp,
) -> ModelDeploymentStatus {
    let serves = |id: &GroupId| {
        observed
            .groups
            .get(id)
            .is_some_and(|g| g.is_ready(topology.pods_per_group))
    };
    let groups = (0..topology.groups).map(GroupId);
    let not_ready: Vec<GroupId> = groups.clone().filter(|id| !serves(id)).collect();
    let ready = groups
        .filter(|id| serves(id) && !actions.restarting(*id))
        .count() as u32;
    let count = Count {
        ready,
        replicas: topology.groups,
    };
    let conditions = vec![
        condition(md, ConditionType::Ready, ready_verdict(count), now),
        condition(
            md,
            ConditionType::Progressing,
            progressing_verdict(actions, count, &not_ready),
            now,
        ),
        condition(
            md,
            ConditionType::Degraded,
            degraded_verdict(md, actions, count),
            now,
        ),
    ];
    ModelDeploymentStatus {
        observed_generation: md.metadata.generation,
        replicas: count.replicas,
        ready_replicas: count.ready,
        selector: Some(model_selector(md.name())),
        conditions,
    }
}

/// Groups that serve, of how many.
#[derive(Clone, Copy)]
struct Count {
    ready: u32,
    replicas: u32,
}

/// A condition's status, reason and message.
struct Verdict {
    status: bool,
    reason: String,
    message: String,
}

fn verdict(status: bool, reason: &str, message: impl Into<String>) -> Verdict {
    Verdict {
        status,
        reason: reason.to_string(),
        message: message.into(),
    }
}

fn ready_verdict(Count { ready, replicas }: Count) -> Verdict {
    let message = format!("{ready} of {replicas} group(s) serve");
    if replicas == 0 {
        verdict(false, "ScaledToZero", "spec.replicas is 0: no group runs")
    } else if ready == replicas {
        verdict(true, "AllGroupsReady", message)
    } else {
        verdict(false, "GroupsNotReady", message)
    }
}

/// What is under way, the most telling first.
fn progressing_verdict(actions: &Actions, count: Count, not_ready: &[GroupId]) -> Verdict {
    let rolled: Vec<GroupId> = actions.rolled.iter().map(|r| r.id).collect();
    let restarted: Vec<GroupId> = actions.restarted.iter().map(|r| r.id).collect();
    if !rolled.is_empty() || !actions.waiting.is_empty() {
        let mut message = String::from("rolling out a changed spec, one serving group at a time");
        if !rolled.is_empty() {
            message += &format!("; restarting group(s) {}", list(&rolled));
        }
        if !actions.waiting.is_empty() {
            message += &format!(
                "; group(s) {} wait for the others to serve",
                list(&actions.waiting)
            );
        }
        verdict(true, "Rolling", message)
    } else if !restarted.is_empty() {
        let message = format!(
            "restarting group(s) {} after a rank failed",
            list(&restarted)
        );
        verdict(true, "Restarting", message)
    } else if !actions.created.is_empty() || !actions.removed.is_empty() {
        let mut parts = Vec::new();
        if !actions.created.is_empty() {
            parts.push(format!("creating group(s) {}", list(&actions.created)));
        }
        if !actions.removed.is_empty() {
            parts.push(format!("removing group(s) {}", list(&actions.removed)));
        }
        verdict(true, "Scaling", parts.join("; "))
    } else if count.ready < count.replicas {
        let message = format!(
            "waiting for group(s) {} to serve (the model loads, the ranks meet)",
            list(not_ready)
        );
        verdict(true, "Starting", message)
    } else {
        verdict(false, "Complete", "every group runs the current spec")
    }
}

/// A rank failure now, or one earlier whose group does not serve yet.
fn degraded_verdict(md: &ModelDeployment, actions: &Actions, count: Count) -> Verdict {
    if !actions.restarted.is_empty() {
        let failures: Vec<String> = actions
            .restarted
            .iter()
            .map(|r| format!("group {}: {}", r.id, r.why))
            .collect();
        let message = format!("{}; the group restarts", failures.join("; "));
        return verdict(true, RANK_FAILED, message);
    }
    let earlier = previous_condition(md, ConditionType::Degraded)
        .filter(|c| c.status == "True" && c.reason == RANK_FAILED);
    match earlier {
        Some(c) if count.ready < count.replicas => verdict(true, RANK_FAILED, c.message.clone()),
        _ => verdict(false, "AsExpected", "no rank has failed"),
    }
}

/// The status of a deployment that cannot run: `Degraded` with every
/// problem; the group counts stay as they were (nothing is touched).
pub fn refused_status(
    md: &ModelDeployment,
    refusal: &Refusal,
    now: Timestamp,
) -> ModelDeploymentStatus {
    let previous = md.status.clone().unwrap_or_default();
    let reason = refusal.reason.as_str();
    let conditions = vec![
        condition(
            md,
            ConditionType::Ready,
            verdict(false, reason, format!("the spec cannot run: {refusal}")),
            now,
        ),
        condition(
            md,
            ConditionType::Progressing,
            verdict(
                false,
                reason,
                "nothing is created or changed until the spec is fixed",
            ),
            now,
        ),
        condition(
            md,
            ConditionType::Degraded,
            verdict(true, reason, refusal.to_string()),
            now,
        ),
    ];
    ModelDeploymentStatus {
        observed_generation: md.metadata.generation,
        replicas: previous.replicas,
        ready_replicas: previous.ready_replicas,
        selector: Some(model_selector(md.name())),
        conditions,
    }
}

/// Whether `md` already says `Degraded` for the same reason and message
/// (so that the event is not repeated every reconcile).
pub fn already_degraded(md: &ModelDeployment, reason: &str, message: &str) -> bool {
    previous_condition(md, ConditionType::Degraded)
        .is_some_and(|c| c.status == "True" && c.reason == reason && c.message == message)
}

fn previous_condition(md: &ModelDeployment, type_: ConditionType) -> Option<&Condition> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_.as_str())
}

fn condition(
    md: &ModelDeployment,
    type_: ConditionType,
    verdict: Verdict,
    now: Timestamp,
) -> Condition {
    let status = if verdict.status { "True" } else { "False" };
    let since = previous_condition(md, type_)
        .filter(|c| c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.as_str().to_string(),
        status: status.to_string(),
        reason: verdict.reason,
        message: verdict.message,
        observed_generation: md.metadata.generation,
        last_transition_time: since,
    }
}

fn list(ids: &[GroupId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
