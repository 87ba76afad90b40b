//! What exists for a `ModelDeployment`, group by group: its StatefulSets,
//! headless Services and pods, reduced to what the decisions need (which
//! spec a group runs, whether it serves, whether a rank failed). Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use super::labels::{
    DRAINING_SINCE_ANNOTATION, GROUP_LABEL, GroupId, MANAGED_BY, MANAGED_BY_LABEL, POD_INDEX_LABEL,
    POD_UIDS_ANNOTATION, RESTARTS_ANNOTATION, SPEC_HASH_ANNOTATION,
};
use super::progress::PodLoad;

/// The groups that exist, by index.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub groups: BTreeMap<GroupId, GroupObserved>,
}

/// One group as it exists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupObserved {
    /// Whether its StatefulSet exists, and the spec hash it carries.
    pub statefulset: Option<Option<String>>,
    /// Whether its headless Service exists.
    pub service: bool,
    pub pods: Vec<PodObserved>,
    /// The uids of the pods it formed with ([`POD_UIDS_ANNOTATION`]).
    pub formed_with: Option<Vec<String>>,
    /// Its restarts so far ([`RESTARTS_ANNOTATION`]).
    pub restarts: Restarts,
    /// When it began to drain ([`DRAINING_SINCE_ANNOTATION`]).
    pub draining_since: Option<Timestamp>,
    /// Requests the routers have outstanding on its leader, and when they were
    /// counted; filled in by the reconcile from the routers' load, `None` when
    /// unknown.
    pub outstanding: Option<(Timestamp, u64)>,
    /// The LoRA adapters its leader serves, once the reconcile has brought them to
    /// the spec's list ([`super::adapters::sync_groups`]); `None` when not asked.
    pub adapters: Option<Vec<String>>,
}

/// A group's restarts since it last served for a while.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Restarts {
    pub count: u32,
    pub last: Option<Timestamp>,
    pub reason: Option<String>,
}

impl Restarts {
    /// `N;time;reason`, as [`RESTARTS_ANNOTATION`] holds it.
    pub fn parse(text: &str) -> Self {
        let mut parts = text.splitn(3, ';');
        Self {
            count: parts.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            last: parts.next().and_then(|t| t.parse().ok()),
            reason: parts.next().map(str::to_string).filter(|r| !r.is_empty()),
        }
    }

    pub fn annotation(&self) -> Option<String> {
        (self.count > 0 || self.last.is_some()).then(|| {
            format!(
                "{};{};{}",
                self.count,
                self.last.map(|t| t.to_string()).unwrap_or_default(),
                self.reason.as_deref().unwrap_or_default()
            )
        })
    }
}

/// One rank pod as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodObserved {
    pub name: String,
    pub uid: Option<String>,
    /// Its index in the group's StatefulSet.
    pub index: Option<u32>,
    /// The spec hash it was created with.
    pub spec_hash: Option<String>,
    pub created: Option<Timestamp>,
    pub running: bool,
    pub ready: bool,
    pub terminating: bool,
    /// How a rank of it failed, when one did.
    pub failure: Option<String>,
    /// Its init container (the model fetch) has not finished yet and runs.
    pub downloading: bool,
    /// Why the scheduler has not placed it, when it has not.
    pub unschedulable: Option<String>,
    /// Its IP, once it has one.
    pub ip: Option<String>,
    /// How far it is in fetching or loading, when it was asked and answered
    /// ([`super::progress::ask_pods`]).
    pub load: Option<PodLoad>,
}

/// Sorts the objects of one `ModelDeployment` (listed by its label) into
/// groups. Objects the operator did not make (no `managed-by` label) and
/// objects without a group label (the `<md>` Service) are left out.
pub fn observe(statefulsets: &[StatefulSet], services: &[Service], pods: &[Pod]) -> Observed {
    let mut observed = Observed::default();
    for sts in statefulsets {
        if let Some(id) = managed_group(&sts.metadata) {
            let group = observed.groups.entry(id).or_default();
            group.statefulset = Some(annotation(&sts.metadata, SPEC_HASH_ANNOTATION));
            group.formed_with = annotation(&sts.metadata, POD_UIDS_ANNOTATION)
                .filter(|uids| !uids.is_empty())
                .map(|uids| uids.split(',').map(str::to_string).collect());
            group.restarts = annotation(&sts.metadata, RESTARTS_ANNOTATION)
                .map(|r| Restarts::parse(&r))
                .unwrap_or_default();
            group.draining_since =
                annotation(&sts.metadata, DRAINING_SINCE_ANNOTATION).and_then(|t| t.parse().ok());
        }
    }
    for svc in services {
        if let Some(id) = managed_group(&svc.metadata) {
            observed.groups.entry(id).or_default().service = true;
        }
    }
    for pod in pods {
        if let Some(id) = group_of(&pod.metadata) {
            observed
                .groups
                .entry(id)
                .or_default()
                .pods
                .push(pod_observed(pod));
        }
    }
    observed
}

impl GroupObserved {
    /// Whether the group serves: all its pods are up, running and ready. Rank 0
    /// (pod 0) is ready once every rank has joined; the first rank of every other
    /// pod answers that pod's probe, ready once its group has met and until it
    /// breaks.
    pub fn is_ready(&self, pods_per_group: u32) -> bool {
        let live: Vec<&PodObserved> = self.pods.iter().filter(|p| !p.terminating).collect();
        live.len() == pods_per_group as usize
            && live.iter().all(|p| p.running && p.ready)
            && live.iter().any(|p| p.index == Some(0))
    }

    /// Whether the StatefulSet and every pod that stays run the spec of
    /// `hash`.
    pub fn runs(&self, hash: &str) -> bool {
        self.statefulset.as_ref().and_then(Option::as_deref) == Some(hash)
            && self.stale_pods(hash).next().is_none()
    }

    /// Pods that stay but run another spec than `hash`.
    pub fn stale_pods<'a>(&'a self, hash: &'a str) -> impl Iterator<Item = &'a PodObserved> {
        self.live_pods()
            .filter(move |p| p.spec_hash.as_deref() != Some(hash))
    }

    /// Whether pods are going away (a restart or roll under way).
    pub fn terminating(&self) -> bool {
        self.pods.iter().any(|p| p.terminating)
    }

    /// The first failure among its live pods.
    pub fn failure(&self) -> Option<&str> {
        self.pods
            .iter()
            .filter(|p| !p.terminating)
            .find_map(|p| p.failure.as_deref())
    }

    /// How the group lost a rank it formed with: a pod it formed with is going or
    /// gone, or a pod is not one it formed with (recreated before anyone saw it
    /// fail). `None` without a record.
    pub fn lost_member(&self) -> Option<String> {
        let formed = self.formed_with.as_ref()?;
        if let Some(p) = self
            .live_pods()
            .find(|p| p.uid.as_ref().is_none_or(|u| !formed.contains(u)))
        {
            return Some(format!(
                "pod {} is not the one the group formed with (it was recreated)",
                p.name
            ));
        }
        let live: Vec<&str> = self.live_pods().filter_map(|p| p.uid.as_deref()).collect();
        let index = formed
            .iter()
            .position(|uid| !live.contains(&uid.as_str()))?;
        // Named as its StatefulSet names it, `<group>-<index>`, when a pod shows the prefix.
        let group = self.pods.iter().find_map(|p| {
            let suffix = format!("-{}", p.index?);
            p.name.strip_suffix(&suffix).map(str::to_string)
        });
        Some(match group {
            Some(group) => format!("pod {group}-{index} of the group was deleted"),
            None => format!("pod {index} of the group was deleted"),
        })
    }

    /// The uids of its pods by index, when exactly `pods_per_group` live pods, one
    /// per index, all running, make it whole: what it forms with.
    pub fn formation(&self, pods_per_group: u32) -> Option<Vec<String>> {
        let mut live: Vec<&PodObserved> = self.live_pods().collect();
        live.sort_by_key(|p| p.index);
        let whole = live.len() == pods_per_group as usize
            && live
                .iter()
                .enumerate()
                .all(|(i, p)| p.index == Some(i as u32) && p.running && p.uid.is_some());
        whole.then(|| live.iter().filter_map(|p| p.uid.clone()).collect())
    }

    /// When its youngest pod was created.
    pub fn youngest_pod(&self) -> Option<Timestamp> {
        self.pods.iter().filter_map(|p| p.created).max()
    }

    /// Pods to delete to restart the group (those not already going).
    pub fn live_pods(&self) -> impl Iterator<Item = &PodObserved> {
        self.pods.iter().filter(|p| !p.terminating)
    }
}

fn managed_group(meta: &ObjectMeta) -> Option<GroupId> {
    let managed = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY);
    managed.then(|| group_of(meta)).flatten()
}

fn group_of(meta: &ObjectMeta) -> Option<GroupId> {
    GroupId::parse(meta.labels.as_ref()?.get(GROUP_LABEL)?)
}

fn annotation(meta: &ObjectMeta, key: &str) -> Option<String> {
    meta.annotations.as_ref()?.get(key).cloned()
}

fn pod_observed(pod: &Pod) -> PodObserved {
    let meta = &pod.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let index = pod_index(meta, &name);
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    PodObserved {
        failure: pod_failure(pod, &name),
        name,
        uid: meta.uid.clone(),
        index,
        spec_hash: annotation(meta, SPEC_HASH_ANNOTATION),
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        running: phase == Some("Running"),
        ready,
        ip: status
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
        load: None,
        terminating: meta.deletion_timestamp.is_some(),
        downloading: status
            .and_then(|s| s.init_container_statuses.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            }),
        unschedulable: status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            })
            .map(|c| {
                c.message
                    .clone()
                    .or_else(|| c.reason.clone())
                    .unwrap_or_else(|| "not scheduled".into())
            }),
    }
}

/// The pod's index label; clusters before 1.28 have none, but the name
/// ends in the index.
fn pod_index(meta: &ObjectMeta, name: &str) -> Option<u32> {
    let label = meta.labels.as_ref().and_then(|l| l.get(POD_INDEX_LABEL));
    match label {
        Some(index) => index.parse().ok(),
        None => name.rsplit_once('-')?.1.parse().ok(),
    }
}

/// How a rank of `pod` failed: the pod failed, or a rank container
/// restarted or exited with an error. Init containers (the model fetch)
/// are not ranks: their retries are the kubelet's business.
fn pod_failure(pod: &Pod, name: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        let why = [status.reason.as_deref(), status.message.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        return Some(if why.is_empty() {
            format!("pod {name} failed")
        } else {
            format!("pod {name} failed ({why})")
        });
    }
    status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| container_failure(c, name))
}

fn container_failure(c: &ContainerStatus, pod: &str) -> Option<String> {
    let exit = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| {
        let reason = t.reason.as_deref().unwrap_or("Error");
        format!("exit code {}, {reason}", t.exit_code)
    };
    if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref())
        && t.exit_code != 0
    {
        return Some(format!(
            "container {} of pod {pod} exited ({})",
            c.name,
            exit(t)
        ));
    }
    if c.restart_count > 0 {
        let last = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| format!(", last: {}", exit(t)))
            .unwrap_or_default();
        return Some(format!(
            "container {} of pod {pod} restarted {} time(s){last}",
            c.name, c.restart_count
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, PodCondition, PodStatus,
    };

    fn pod(name: &str, group: &str, index: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.labels = Some(super::super::labels::labels([
            (GROUP_LABEL, group),
            (POD_INDEX_LABEL, index),
        ]));
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        pod
    }

    fn with_container(mut pod: Pod, restarts: i32, exit: Option<i32>) -> Pod {
        let status = pod.status.get_or_insert_with(Default::default);
        status.container_statuses = Some(vec![ContainerStatus {
            name: "rank-0".into(),
            restart_count: restarts,
            state: exit.map(|code| ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some("Error".into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        pod
    }

    #[test]
    fn a_group_is_ready_when_all_its_pods_run_and_are_ready() {
        let observed = observe(
            &[],
            &[],
            &[pod("m-g0-0", "0", "0"), pod("m-g0-1", "0", "1")],
        );
        let group = &observed.groups[&GroupId(0)];
        assert!(group.is_ready(2));
        assert!(!group.is_ready(3), "a missing pod");
        assert_eq!(group.pods[1].index, Some(1));
        // A follower pod not ready (its shard loading, or its group broken).
        let mut follower = pod("m-g0-1", "0", "1");
        follower.status.as_mut().unwrap().conditions = None;
        let observed = observe(&[], &[], &[pod("m-g0-0", "0", "0"), follower]);
        assert!(!observed.groups[&GroupId(0)].is_ready(2));
    }

    #[test]
    fn rank_failures_name_the_pod_and_container() {
        let restarted = with_container(pod("m-g1-1", "1", "1"), 2, None);
        let exited = with_container(pod("m-g1-0", "1", "0"), 0, Some(137));
        let fine = with_container(pod("m-g0-0", "0", "0"), 0, None);
        let observed = observe(&[], &[], &[restarted, exited, fine]);
        let g1 = &observed.groups[&GroupId(1)];
        assert_eq!(
            g1.pods[0].failure.as_deref(),
            Some("container rank-0 of pod m-g1-1 restarted 2 time(s)")
        );
        assert_eq!(
            g1.failure(),
            Some("container rank-0 of pod m-g1-1 restarted 2 time(s)")
        );
        assert_eq!(
            g1.pods[1].failure.as_deref(),
            Some("container rank-0 of pod m-g1-0 exited (exit code 137, Error)")
        );
        assert_eq!(observed.groups[&GroupId(0)].failure(), None);
    }

    #[test]
    fn a_failed_pod_is_a_failure() {
        let mut p = pod("m-g0-0", "0", "0");
        let status = p.status.as_mut().unwrap();
        status.phase = Some("Failed".into());
        status.reason = Some("Evicted".into());
        assert_eq!(
            pod_failure(&p, "m-g0-0").as_deref(),
            Some("pod m-g0-0 failed (Evicted)")
        );
    }

    #[test]
    fn objects_without_the_operators_label_are_not_groups() {
        let mut sts = StatefulSet::default();
        sts.metadata.labels = Some(super::super::labels::labels([(GROUP_LABEL, "3")]));
        assert!(observe(&[sts], &[], &[]).groups.is_empty());
    }
}
