//! Decisions on observed groups: creation, scaling, restarts and rolls.

use super::*;
use crate::controller::check::check;
use crate::controller::fixtures::{
    ago, demo, demo_tp3, desired_of, existing, loading, marked_draining, now, pod, restarted,
};
use crate::controller::labels::{POD_UIDS_ANNOTATION, RESTARTS_ANNOTATION};
use crate::controller::observe::{Restarts, observe};
use crate::crd::ModelDeployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Decides for `md` with its groups `groups` existing (at their desired
/// spec unless `stale`) and `pods`.
fn decide_for(md: &ModelDeployment, groups: &[u32], stale: bool, pods: &[Pod]) -> Actions {
    let (statefulsets, services) = existing(md, groups, stale.then_some("old"));
    let observed = observe(&statefulsets, &services, pods);
    decide(&desired_of(md), &observed, &check(md).unwrap(), now())
}

fn hash(md: &ModelDeployment, group: u32) -> String {
    desired_of(md).groups[group as usize].spec_hash.clone()
}

fn ids(ids: &[u32]) -> Vec<GroupId> {
    ids.iter().copied().map(GroupId).collect()
}

/// Scale 2 → 1 with both groups serving: group 1 drained since `since` (if
/// marked), the routers counting `outstanding` on it at `counted`.
fn scale_down(since: Option<Timestamp>, outstanding: Option<(Timestamp, u64)>) -> Actions {
    let md = demo(1);
    let pods: Vec<Pod> = (0..2)
        .map(|g| pod("smollm2", g, 0, &hash(&demo(2), g)))
        .collect();
    let (mut statefulsets, services) = existing(&md, &[0, 1], None);
    if let Some(since) = since {
        statefulsets[1] = marked_draining(statefulsets[1].clone(), since);
    }
    let mut observed = observe(&statefulsets, &services, &pods);
    observed.groups.get_mut(&GroupId(1)).unwrap().outstanding = outstanding;
    decide(&desired_of(&md), &observed, &check(&md).unwrap(), now())
}

#[test]
fn a_serving_group_scaled_away_drains_before_it_is_deleted() {
    // Not marked yet: marked now, kept, looked at again soon.
    let start = scale_down(None, Some((now(), 0)));
    assert_eq!(
        (start.drain.clone(), start.draining.clone()),
        (ids(&[1]), ids(&[1]))
    );
    assert!(start.removed.is_empty());
    assert_eq!(start.requeue_after, Some(DRAIN_RECHECK));
    // Streams still run on it: kept.
    let busy = scale_down(Some(ago(60)), Some((ago(1), 3)));
    assert!(busy.removed.is_empty() && busy.drain.is_empty());
    assert_eq!(busy.draining, ids(&[1]));
    // A count of zero from before the routers saw the mark proves nothing.
    let early = scale_down(Some(ago(60)), Some((ago(55), 0)));
    assert!(early.removed.is_empty());
    // No count at all (no routers to ask): kept until the timeout.
    assert!(scale_down(Some(ago(60)), None).removed.is_empty());
    // Idle since the routers saw the mark: deleted.
    let idle = scale_down(Some(ago(60)), Some((ago(1), 0)));
    assert_eq!(idle.removed, ids(&[1]));
    assert!(idle.draining.is_empty());
    // Busy, but the drain timeout (300 s) has passed: deleted.
    let late = scale_down(Some(ago(301)), Some((ago(1), 3)));
    assert_eq!(late.removed, ids(&[1]));
}

#[test]
fn a_group_scaled_back_up_while_draining_serves_again() {
    let md = demo(2);
    let pods: Vec<Pod> = (0..2)
        .map(|g| pod("smollm2", g, 0, &hash(&md, g)))
        .collect();
    let (mut statefulsets, services) = existing(&md, &[0, 1], None);
    statefulsets[1] = marked_draining(statefulsets[1].clone(), ago(30));
    let observed = observe(&statefulsets, &services, &pods);
    let actions = decide(&desired_of(&md), &observed, &check(&md).unwrap(), now());
    assert_eq!(actions.undrain, ids(&[1]));
    assert!(actions.draining.is_empty() && actions.removed.is_empty());
}

#[test]
fn a_new_deployment_creates_every_group() {
    let actions = decide_for(&demo(2), &[], false, &[]);
    assert_eq!(actions.created, ids(&[0, 1]));
    assert_eq!(actions.apply, ids(&[0, 1]));
    assert!(actions.removed.is_empty() && actions.rolled.is_empty());
}

#[test]
fn scaling_adds_and_removes_whole_groups() {
    let md = demo(3);
    let pods = [pod("smollm2", 0, 0, &hash(&md, 0))];
    let up = decide_for(&md, &[0], false, &pods);
    assert_eq!(up.created, ids(&[1, 2]));
    assert_eq!(up.apply, ids(&[0, 1, 2]));

    // Groups that serve nothing have nothing to drain.
    let md = demo(1);
    let down = decide_for(&md, &[0, 1, 2], false, &[]);
    assert_eq!(down.removed, ids(&[1, 2]));
    assert_eq!(down.apply, ids(&[0]));
    assert!(down.created.is_empty());

    let zero = decide_for(&demo(0), &[0], false, &[]);
    assert_eq!(zero.removed, ids(&[0]));
    assert!(zero.apply.is_empty());
}

#[test]
fn a_failed_rank_restarts_its_whole_group() {
    let md = demo_tp3(2);
    let (h0, h1) = (hash(&md, 0), hash(&md, 1));
    let pods = [
        pod("smollm2", 0, 0, &h0),
        pod("smollm2", 0, 1, &h0),
        pod("smollm2", 0, 2, &h0),
        loading(pod("smollm2", 1, 0, &h1)),
        restarted(pod("smollm2", 1, 1, &h1)),
        pod("smollm2", 1, 2, &h1),
    ];
    let actions = decide_for(&md, &[0, 1], false, &pods);
    assert_eq!(actions.restarted.len(), 1);
    let restart = &actions.restarted[0];
    assert_eq!(restart.id, GroupId(1));
    assert_eq!(
        restart.why,
        "container rank-0 of pod smollm2-g1-1 restarted 1 time(s)"
    );
    let names: Vec<&str> = restart.pods.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["smollm2-g1-0", "smollm2-g1-1", "smollm2-g1-2"]);
    assert_eq!(restart.pods[0].1.as_deref(), Some("uid-smollm2-g1-0"));
    assert_eq!(actions.apply, ids(&[0, 1]));
}

#[test]
fn a_group_restarted_moments_ago_is_not_restarted_again_yet() {
    let md = demo_tp3(1);
    let h = hash(&md, 0);
    let mut young = restarted(pod("smollm2", 0, 1, &h));
    young.metadata.creation_timestamp = Some(Time(ago(4)));
    let pods = [pod("smollm2", 0, 0, &h), young, pod("smollm2", 0, 2, &h)];
    let last = (RESTARTS_ANNOTATION, format!("1;{};rank died", ago(4)));
    let actions = decide_recorded(&[last], &pods);
    assert!(actions.restarted.is_empty());
    assert_eq!(actions.requeue_after, Some(Duration::from_secs(6)));
}

/// Decides for the tensor-3 demo's group 0 (three one-rank pods) whose StatefulSet
/// carries `annotations`.
fn decide_recorded(annotations: &[(&str, String)], pods: &[Pod]) -> Actions {
    let md = demo_tp3(1);
    let (mut statefulsets, services) = existing(&md, &[0], None);
    let meta = statefulsets[0].metadata.annotations.get_or_insert_default();
    for (key, value) in annotations {
        meta.insert(key.to_string(), value.clone());
    }
    let observed = observe(&statefulsets, &services, pods);
    decide(&desired_of(&md), &observed, &check(&md).unwrap(), now())
}

fn formed(uids: &[&str]) -> (&'static str, String) {
    (POD_UIDS_ANNOTATION, uids.join(","))
}

const UIDS: [&str; 3] = ["uid-smollm2-g0-0", "uid-smollm2-g0-1", "uid-smollm2-g0-2"];

fn group_pods(md: &ModelDeployment) -> Vec<Pod> {
    (0..3).map(|i| pod("smollm2", 0, i, &hash(md, 0))).collect()
}

#[test]
fn a_whole_running_group_records_the_pods_it_formed_with() {
    let md = demo_tp3(1);
    let actions = decide_recorded(&[], &group_pods(&md));
    assert_eq!(
        actions.records[&GroupId(0)].formed_with,
        Some(UIDS.map(String::from).to_vec())
    );
    // Not while a pod is missing or not running.
    let mut pods = group_pods(&md);
    pods.pop();
    assert_eq!(
        decide_recorded(&[], &pods).records[&GroupId(0)].formed_with,
        None
    );
    // A record stays as it is.
    let actions = decide_recorded(&[formed(&UIDS)], &group_pods(&md));
    assert!(actions.restarted.is_empty());
    assert_eq!(
        actions.records[&GroupId(0)].formed_with.as_deref(),
        Some(&UIDS.map(String::from)[..])
    );
}

/// The race the StatefulSet controller wins: pod 1 failed and was recreated (a new
/// uid, loading, no failure of its own) before the operator looked.
#[test]
fn a_pod_recreated_before_the_operator_saw_it_fail_restarts_its_group() {
    let md = demo_tp3(1);
    let mut pods = group_pods(&md);
    pods[1] = loading(pod("smollm2", 0, 1, &hash(&md, 0)));
    pods[1].metadata.uid = Some("uid-new".into());
    pods[1].metadata.creation_timestamp = Some(Time(ago(1)));
    let actions = decide_recorded(&[formed(&UIDS)], &pods);
    assert_eq!(actions.restarted.len(), 1, "{actions:?}");
    let restart = &actions.restarted[0];
    assert!(
        restart
            .why
            .contains("pod smollm2-g0-1 is not the one the group formed with")
    );
    let deleted: Vec<(&str, &str)> = restart
        .pods
        .iter()
        .map(|(n, u)| (n.as_str(), u.as_deref().unwrap()))
        .collect();
    assert_eq!(
        deleted,
        [
            ("smollm2-g0-0", "uid-smollm2-g0-0"),
            ("smollm2-g0-1", "uid-new"),
            ("smollm2-g0-2", "uid-smollm2-g0-2")
        ]
    );
    let record = &actions.records[&GroupId(0)];
    assert_eq!(record.formed_with, None, "the group forms anew");
    assert_eq!(record.restarts.count, 1);
    assert_eq!(record.restarts.last, Some(now()));
    assert_eq!(
        record.restarts.reason.as_deref(),
        Some(restart.why.as_str())
    );
}

#[test]
fn a_member_deleted_by_someone_else_restarts_its_group_while_it_terminates() {
    let md = demo_tp3(1);
    let mut pods = group_pods(&md);
    pods[2].metadata.deletion_timestamp = Some(Time(now()));
    let actions = decide_recorded(&[formed(&UIDS)], &pods);
    assert_eq!(actions.restarted.len(), 1);
    assert_eq!(
        actions.restarted[0].why,
        "pod smollm2-g0-2 of the group was deleted"
    );
    assert_eq!(actions.restarted[0].pods.len(), 2, "the two that stay");
    // And once it is gone altogether.
    pods.pop();
    let actions = decide_recorded(&[formed(&UIDS)], &pods);
    assert_eq!(
        actions.restarted[0].why,
        "pod smollm2-g0-2 of the group was deleted"
    );
}

#[test]
fn repeated_restarts_back_off_from_10_s_doubling_to_5_min() {
    assert_eq!(restart_backoff(0), Duration::from_secs(10));
    assert_eq!(restart_backoff(1), Duration::from_secs(20));
    assert_eq!(restart_backoff(3), Duration::from_secs(80));
    assert_eq!(restart_backoff(5), Duration::from_secs(300));
    assert_eq!(restart_backoff(40), Duration::from_secs(300));

    let md = demo_tp3(1);
    let mut pods = group_pods(&md);
    pods[1] = restarted(pods[1].clone());
    let restarts = |count: u32, seconds_ago: i64| {
        (
            RESTARTS_ANNOTATION,
            format!("{count};{};rank died", ago(seconds_ago)),
        )
    };
    // The first restart is at once.
    assert_eq!(decide_recorded(&[], &pods).restarted.len(), 1);
    // The third was 30 s ago: the fourth waits for 40 s.
    let held = decide_recorded(&[restarts(3, 30)], &pods);
    assert!(held.restarted.is_empty());
    assert_eq!(held.requeue_after, Some(Duration::from_secs(10)));
    assert_eq!(held.records[&GroupId(0)].restarts.count, 3);
    let due = decide_recorded(&[restarts(3, 45)], &pods);
    assert_eq!(due.restarted.len(), 1);
    assert_eq!(due.records[&GroupId(0)].restarts.count, 4);
    // Five minutes at most.
    let capped = decide_recorded(&[restarts(12, 299)], &pods);
    assert_eq!(capped.requeue_after, Some(Duration::from_secs(1)));
}

#[test]
fn a_group_that_served_for_10_minutes_starts_its_backoff_over() {
    let md = demo_tp3(1);
    // Every pod 600 s old, ready: it has served long enough.
    let record = (RESTARTS_ANNOTATION, format!("5;{};rank died", ago(700)));
    let actions = decide_recorded(&[record.clone(), formed(&UIDS)], &group_pods(&md));
    let restarts = &actions.records[&GroupId(0)].restarts;
    assert_eq!(restarts.count, 0);
    assert_eq!(
        restarts.reason.as_deref(),
        Some("rank died"),
        "the last reason stays"
    );
    // Younger pods: not yet.
    let mut pods = group_pods(&md);
    pods[0].metadata.creation_timestamp = Some(Time(ago(120)));
    let actions = decide_recorded(&[record], &pods);
    assert_eq!(actions.records[&GroupId(0)].restarts.count, 5);
}

#[test]
fn a_record_written_on_the_statefulset_is_read_back() {
    let md = demo_tp3(1);
    let record = GroupRecord {
        formed_with: Some(UIDS.map(String::from).to_vec()),
        restarts: Restarts {
            count: 2,
            last: Some(now()),
            reason: Some("pod 1 failed; (OOMKilled)".into()),
        },
    };
    let (statefulsets, services) = existing(&md, &[0], None);
    let written = record.written_on(&statefulsets[0]);
    let observed = observe(&[written], &services, &[]);
    let group = &observed.groups[&GroupId(0)];
    assert_eq!(group.formed_with, record.formed_with);
    assert_eq!(group.restarts, record.restarts);
    // No record: no annotations.
    let bare = GroupRecord::default().written_on(&statefulsets[0]);
    let keys: Vec<&String> = bare
        .metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .collect();
    assert!(
        !keys
            .iter()
            .any(|k| k.as_str() == POD_UIDS_ANNOTATION || k.as_str() == RESTARTS_ANNOTATION)
    );
}

#[test]
fn a_single_rank_is_left_to_the_kubelet() {
    let md = demo(1);
    let pods = [restarted(pod("smollm2", 0, 0, &hash(&md, 0)))];
    assert!(decide_for(&md, &[0], false, &pods).restarted.is_empty());
}

#[test]
fn a_changed_spec_rolls_one_serving_group_while_the_others_serve() {
    let md = demo(3);
    let old: Vec<Pod> = (0..3).map(|g| pod("smollm2", g, 0, "old")).collect();
    // Group 0 serves: it drains first.
    let actions = decide_for(&md, &[0, 1, 2], true, &old);
    assert!(actions.rolled.is_empty());
    assert_eq!(
        (actions.drain.clone(), actions.draining.clone()),
        (ids(&[0]), ids(&[0]))
    );
    assert_eq!(actions.waiting, ids(&[1, 2]));
    // Drained (the routers count nothing on it since the mark): it rolls.
    let (mut statefulsets, services) = existing(&md, &[0, 1, 2], Some("old"));
    statefulsets[0] = marked_draining(statefulsets[0].clone(), ago(15));
    let mut observed = observe(&statefulsets, &services, &old);
    observed.groups.get_mut(&GroupId(0)).unwrap().outstanding = Some((ago(1), 0));
    let actions = decide(&desired_of(&md), &observed, &check(&md).unwrap(), now());
    assert_eq!(actions.undrain, ids(&[0]), "its new pods serve once ready");
    assert_eq!(actions.rolled.len(), 1);
    assert_eq!(actions.rolled[0].id, GroupId(0));
    assert_eq!(actions.rolled[0].why, hash(&md, 0));
    assert_eq!(actions.apply, ids(&[0]), "stale groups keep their spec");
    assert_eq!(actions.waiting, ids(&[1, 2]));

    // Group 0 restarted on the new spec and is loading: the others wait.
    let mut pods = old.clone();
    pods[0] = loading(pod("smollm2", 0, 0, &hash(&md, 0)));
    let (mut statefulsets, services) = existing(&md, &[1, 2], Some("old"));
    statefulsets.insert(0, desired_of(&md).groups[0].statefulset.clone());
    let observed = observe(&statefulsets, &services, &pods);
    let actions = decide(&desired_of(&md), &observed, &check(&md).unwrap(), now());
    assert!(actions.rolled.is_empty());
    assert_eq!(actions.waiting, ids(&[1, 2]));
    assert_eq!(actions.apply, ids(&[0]));

    // Group 0 serves: group 1 is next, drained first.
    pods[0] = pod("smollm2", 0, 0, &hash(&md, 0));
    let observed = observe(&statefulsets, &services, &pods);
    let actions = decide(&desired_of(&md), &observed, &check(&md).unwrap(), now());
    assert!(actions.rolled.is_empty());
    assert_eq!(actions.drain, ids(&[1]));
    assert_eq!(actions.waiting, ids(&[2]));
}

#[test]
fn stale_groups_that_do_not_serve_roll_at_once() {
    // A broken spec fixed: no group serves, waiting would never end.
    let md = demo(2);
    let pods = [
        loading(pod("smollm2", 0, 0, "old")),
        loading(pod("smollm2", 1, 0, "old")),
    ];
    let actions = decide_for(&md, &[0, 1], true, &pods);
    assert_eq!(
        actions.rolled.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids(&[0, 1])
    );
    assert!(actions.waiting.is_empty());
}

#[test]
fn pods_on_their_way_out_are_not_deleted_again() {
    let md = demo_tp3(1);
    let h = hash(&md, 0);
    let mut going = restarted(pod("smollm2", 0, 1, &h));
    going.metadata.deletion_timestamp = Some(Time(now()));
    let pods = [loading(pod("smollm2", 0, 0, &h)), going];
    let actions = decide_for(&md, &[0], false, &pods);
    assert!(actions.restarted.is_empty());
    assert_eq!(actions.apply, ids(&[0]));
}
