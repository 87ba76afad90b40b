//! The status the operator writes: groups that exist and serve, the pod
//! selector for the `scale` subresource, and the `Ready`, `Progressing` and
//! `Degraded` conditions with a reason and a message. Pure; the time is
//! passed in, and a condition keeps its `lastTransitionTime` while its
//! status stays the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::autoscale::{Policy, Record};
use crate::crd::{ConditionType, GroupPhase, GroupStatus, ModelDeployment, ModelDeploymentStatus};

use super::check::{Refusal, Topology};
use super::decide::Actions;
use super::labels::{GroupId, group_name, model_selector};
use super::observe::{GroupObserved, Observed};
use super::progress::LoadStage;

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
    let groups = actions.members.iter().copied();
    let not_ready: Vec<GroupId> = groups.clone().filter(|id| !serves(id)).collect();
    let ready = groups
        .filter(|id| serves(id) && !actions.restarting(*id))
        .count() as u32;
    let count = Count {
        ready,
        replicas: topology.groups,
    };
    let mut conditions = vec![
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
    if let Some(verdict) = autoscaling_verdict(md) {
        conditions.push(condition(md, ConditionType::Autoscaling, verdict, now));
    }
    let groups = group_statuses(md, topology, observed, actions);
    let progress = groups
        .iter()
        .filter(|g| g.phase != GroupPhase::Draining)
        .min_by_key(|g| (g.phase, percent(g)))
        .map(|g| match percent(g) {
            Some(percent) => format!("{} {percent}%", g.phase.as_str()),
            None => g.phase.as_str().to_string(),
        });
    ModelDeploymentStatus {
        observed_generation: md.metadata.generation,
        replicas: count.replicas,
        ready_replicas: count.ready,
        selector: Some(model_selector(md.name())),
        conditions,
        groups,
        progress,
        lora_adapters: md
            .spec
            .lora_adapters
            .iter()
            .map(|a| a.name.clone())
            .collect(),
    }
}

/// Every group that should exist (the members) or still does, in order.
fn group_statuses(
    md: &ModelDeployment,
    topology: &Topology,
    observed: &Observed,
    actions: &Actions,
) -> Vec<GroupStatus> {
    let missing = GroupObserved::default();
    let ids: std::collections::BTreeSet<GroupId> = actions
        .members
        .iter()
        .chain(observed.groups.keys())
        .copied()
        .collect();
    ids.into_iter()
        .map(|id| {
            let obs = observed.groups.get(&id).unwrap_or(&missing);
            let record = actions.records.get(&id);
            let restarts = record.map_or(&obs.restarts, |r| &r.restarts);
            let (phase, message) = group_phase(id, obs, topology, actions);
            let ranks_per_pod = topology.ranks_per_pod.max(1);
            let (bytes_done, bytes_total) = match bytes(obs, phase) {
                Some((done, total)) => (Some(done), Some(total)),
                None => (None, None),
            };
            GroupStatus {
                name: group_name(md.name(), id),
                phase,
                ranks_ready: obs.live_pods().filter(|p| p.ready).count() as u32 * ranks_per_pod,
                ranks: topology.pods_per_group * ranks_per_pod,
                restarts: restarts.count,
                last_restart_reason: restarts.reason.clone(),
                bytes_done,
                bytes_total,
                message,
                // Not asked this time (not serving): what it last reported.
                adapters: obs
                    .adapters
                    .clone()
                    .unwrap_or_else(|| previous_adapters(md, &group_name(md.name(), id))),
            }
        })
        .collect()
}

/// A downloading or loading group's bytes done and to do, summed over the pods
/// that answered at that stage (a pod loading counts as done downloading).
fn bytes(obs: &GroupObserved, phase: GroupPhase) -> Option<(u64, u64)> {
    let counts = |stage: &LoadStage| match phase {
        GroupPhase::Downloading => *stage == LoadStage::Downloading,
        GroupPhase::Loading => *stage >= LoadStage::Loading,
        _ => false,
    };
    obs.live_pods()
        .filter_map(|p| p.load)
        .filter(|load| counts(&load.stage) && load.total > 0)
        .map(|load| (load.done, load.total))
        .reduce(|(d1, t1), (d2, t2)| (d1 + d2, t1 + t2))
}

/// A group's bytes done, in whole percent (rounded down: 100 only when done).
fn percent(group: &GroupStatus) -> Option<u64> {
    let (done, total) = (group.bytes_done?, group.bytes_total?);
    (total > 0).then(|| (done.min(total) as u128 * 100 / total as u128) as u64)
}

/// A group's phase, and what there is to say about it.
fn group_phase(
    id: GroupId,
    obs: &GroupObserved,
    topology: &Topology,
    actions: &Actions,
) -> (GroupPhase, Option<String>) {
    if !actions.members.contains(&id) || actions.draining.contains(&id) {
        return (GroupPhase::Draining, None);
    }
    if let Some(restart) = actions.restarted.iter().find(|r| r.id == id) {
        return (GroupPhase::Restarting, Some(restart.why.clone()));
    }
    if actions.rolled.iter().any(|r| r.id == id) || obs.terminating() {
        return (GroupPhase::Restarting, None);
    }
    if topology.tensor > 1
        && let Some(failure) = obs.lost_member().or(obs.failure().map(str::to_string))
    {
        return (GroupPhase::Failed, Some(failure));
    }
    if obs.is_ready(topology.pods_per_group) {
        return (GroupPhase::Serving, None);
    }
    let live: Vec<_> = obs.live_pods().collect();
    if let Some(why) = live.iter().find_map(|p| p.unschedulable.as_deref()) {
        return (GroupPhase::Pending, Some(why.to_string()));
    }
    if live.iter().any(|p| p.downloading) {
        return (GroupPhase::Downloading, None);
    }
    if live.len() < topology.pods_per_group as usize || !live.iter().all(|p| p.running) {
        return (GroupPhase::Pending, None);
    }
    (GroupPhase::Loading, None)
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
/// In builtin mode: the autoscaler's last change, from its record.
fn autoscaling_verdict(md: &ModelDeployment) -> Option<Verdict> {
    let policy = md.spec.autoscaling.as_ref().and_then(Policy::of)?;
    let aim = format!(
        "aiming for {} in-flight request(s) per group, {} to {} group(s)",
        policy.target, policy.min, policy.max
    );
    Some(match Record::of(md).last_change {
        Some(change) => verdict(
            true,
            if change.to > change.from {
                "ScaledUp"
            } else {
                "ScaledDown"
            },
            format!("{}; {aim}", change.describe()),
        ),
        None => verdict(true, "FollowingLoad", format!("no change yet; {aim}")),
    })
}

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
        // Nothing is changed: what the groups were stays.
        groups: previous.groups.clone(),
        progress: previous.progress.clone(),
        lora_adapters: previous.lora_adapters.clone(),
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

/// The adapters a group's status listed before this reconcile.
fn previous_adapters(md: &ModelDeployment, group: &str) -> Vec<String> {
    md.status
        .as_ref()
        .and_then(|s| s.groups.iter().find(|g| g.name == group))
        .map(|g| g.adapters.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStatus, PodCondition,
    };
    use kube::CustomResourceExt;
    use serde_json::Value;

    use super::*;
    use crate::controller::check::check;
    use crate::controller::decide::decide;
    use crate::controller::fixtures::{demo_tp3, desired_of, existing, loading, now, pod};
    use crate::controller::observe::observe;
    use crate::controller::progress::PodLoad;

    /// The status of the tensor-3 demo (one group of three one-rank pods) with
    /// `pods`, as the operator writes it.
    fn status_with(pods: &[k8s_openapi::api::core::v1::Pod]) -> ModelDeploymentStatus {
        status_answering(pods, &[])
    }

    /// [`status_with`], pod `i` having answered `loads[i]` when asked for its progress.
    fn status_answering(
        pods: &[k8s_openapi::api::core::v1::Pod],
        loads: &[Option<PodLoad>],
    ) -> ModelDeploymentStatus {
        let md = demo_tp3(1);
        let (statefulsets, services) = existing(&md, &[0], None);
        let mut observed = observe(&statefulsets, &services, pods);
        for group in observed.groups.values_mut() {
            for pod in &mut group.pods {
                let index = pod.index.unwrap_or(u32::MAX) as usize;
                pod.load = loads.get(index).copied().flatten();
            }
        }
        let topology = check(&md).unwrap();
        let actions = decide(&desired_of(&md), &observed, &topology, now());
        running_status(&md, &topology, &observed, &actions, now())
    }

    fn hash() -> String {
        desired_of(&demo_tp3(1)).groups[0].spec_hash.clone()
    }

    /// A printer column's JSONPath (`.a.b`, what this CRD uses) on `object`.
    fn column(object: &Value, path: &str) -> Value {
        path.trim_start_matches('.')
            .split('.')
            .fold(object.clone(), |v, key| v[key].clone())
    }

    #[test]
    fn the_progress_column_shows_the_least_advanced_group() {
        let h = hash();
        let pods: Vec<_> = (0..3).map(|i| loading(pod("smollm2", 0, i, &h))).collect();
        let status = status_with(&pods);
        assert_eq!(status.groups.len(), 1);
        let group = &status.groups[0];
        assert_eq!(group.name, "smollm2-g0");
        assert_eq!(group.phase, GroupPhase::Loading);
        assert_eq!((group.ranks_ready, group.ranks), (0, 3));

        let mut md = demo_tp3(1);
        md.status = Some(status);
        let object = serde_json::to_value(&md).unwrap();
        let crd = crate::crd::ModelDeployment::crd();
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap();
        let progress = columns.iter().find(|c| c.name == "Progress").unwrap();
        assert_eq!(column(&object, &progress.json_path), "Loading");
        let ready = columns.iter().find(|c| c.name == "Ready").unwrap();
        assert_eq!(column(&object, &ready.json_path), 0);

        // Two of its pods told how far they are: their bytes, 430 of 1000.
        let load = |stage, done| {
            Some(PodLoad {
                stage,
                done,
                total: 500,
            })
        };
        let loads = [
            load(LoadStage::Loading, 180),
            None,
            load(LoadStage::Loaded, 250),
        ];
        let status = status_answering(&pods, &loads);
        let group = &status.groups[0];
        assert_eq!(
            (group.bytes_done, group.bytes_total),
            (Some(430), Some(1000))
        );
        md.status = Some(status);
        let object = serde_json::to_value(&md).unwrap();
        assert_eq!(column(&object, &progress.json_path), "Loading 43%");

        // Every pod ready: the group serves.
        let pods: Vec<_> = (0..3).map(|i| pod("smollm2", 0, i, &h)).collect();
        let status = status_with(&pods);
        assert_eq!(status.groups[0].phase, GroupPhase::Serving);
        assert_eq!(status.groups[0].ranks_ready, 3);
        assert_eq!(status.progress.as_deref(), Some("Serving"));
    }

    #[test]
    fn groups_report_pending_with_the_schedulers_reason_and_downloading() {
        let h = hash();
        let mut unscheduled = loading(pod("smollm2", 0, 2, &h));
        let status = unscheduled.status.as_mut().unwrap();
        status.phase = Some("Pending".into());
        status.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/4 nodes are available: 4 Insufficient nvidia.com/gpu.".into()),
            ..PodCondition::default()
        }]);
        let pods = [
            loading(pod("smollm2", 0, 0, &h)),
            loading(pod("smollm2", 0, 1, &h)),
            unscheduled,
        ];
        let group = &status_with(&pods).groups[0];
        assert_eq!(group.phase, GroupPhase::Pending);
        assert_eq!(
            group.message.as_deref(),
            Some("0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")
        );

        let mut fetching = loading(pod("smollm2", 0, 0, &h));
        let status = fetching.status.as_mut().unwrap();
        status.phase = Some("Pending".into());
        status.init_container_statuses = Some(vec![ContainerStatus {
            name: "fetch-model".into(),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        let pods = [
            fetching,
            loading(pod("smollm2", 0, 1, &h)),
            loading(pod("smollm2", 0, 2, &h)),
        ];
        let status = status_with(&pods);
        assert_eq!(status.groups[0].phase, GroupPhase::Downloading);
        assert_eq!(status.progress.as_deref(), Some("Downloading"));

        // The fetching pod told its bytes; the pods already loading do not count
        // towards the download.
        let loads = [
            Some(PodLoad {
                stage: LoadStage::Downloading,
                done: 1 << 30,
                total: 4 << 30,
            }),
            Some(PodLoad {
                stage: LoadStage::Loading,
                done: 10,
                total: 10,
            }),
        ];
        let status = status_answering(&pods, &loads);
        let group = &status.groups[0];
        assert_eq!(
            (group.bytes_done, group.bytes_total),
            (Some(1 << 30), Some(4 << 30))
        );
        assert_eq!(status.progress.as_deref(), Some("Downloading 25%"));
    }

    #[test]
    fn a_failed_rank_shows_in_its_group_with_the_restart_count() {
        let h = hash();
        let mut pods: Vec<_> = (0..3).map(|i| pod("smollm2", 0, i, &h)).collect();
        pods[1] = crate::controller::fixtures::restarted(pods[1].clone());
        let group = &status_with(&pods).groups[0];
        assert_eq!(group.phase, GroupPhase::Restarting);
        assert_eq!(group.restarts, 1);
        assert_eq!(
            group.last_restart_reason.as_deref(),
            Some("container rank-0 of pod smollm2-g0-1 restarted 1 time(s)")
        );
    }

    #[test]
    fn the_autoscaling_condition_tells_the_last_change_in_builtin_mode_only() {
        use crate::autoscale::{AUTOSCALER_ANNOTATION, Change};
        use crate::crd::AutoscalingSpec;

        let mut md = crate::controller::fixtures::demo(2);
        let status_of = |md: &ModelDeployment| {
            let topology = check(md).unwrap();
            let observed = observe(&[], &[], &[]);
            let actions = decide(&desired_of(md), &observed, &topology, now());
            running_status(md, &topology, &observed, &actions, now())
        };
        let autoscaling = |status: &ModelDeploymentStatus| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == "Autoscaling")
                .map(|c| (c.reason.clone(), c.message.clone()))
        };
        // Bounds for an HPA: no condition.
        let mut scaling = AutoscalingSpec {
            mode: None,
            min_replicas: 0,
            max_replicas: 4,
            target_in_flight_requests: None,
            scale_up_delay_seconds: None,
            scale_down_delay_seconds: None,
        };
        md.spec.autoscaling = Some(scaling.clone());
        assert_eq!(autoscaling(&status_of(&md)), None);

        scaling.target_in_flight_requests = Some(6);
        md.spec.autoscaling = Some(scaling);
        assert_eq!(
            autoscaling(&status_of(&md)),
            Some((
                "FollowingLoad".into(),
                "no change yet; aiming for 6 in-flight request(s) per group, 0 to 4 group(s)"
                    .into()
            ))
        );
        let record = Record {
            last_change: Some(Change {
                at: now(),
                from: 0,
                to: 2,
                why: "9 request(s) in flight, 6 per group aimed for".into(),
            }),
            ..Record::default()
        };
        md.metadata.annotations =
            Some([(AUTOSCALER_ANNOTATION.to_string(), record.to_json())].into());
        let (reason, message) = autoscaling(&status_of(&md)).unwrap();
        assert_eq!(reason, "ScaledUp");
        assert!(
            message.starts_with("scaled up from 0 to 2 group(s) at ")
                && message
                    .contains(": 9 request(s) in flight, 6 per group aimed for; aiming for 6"),
            "{message}"
        );
    }
}
