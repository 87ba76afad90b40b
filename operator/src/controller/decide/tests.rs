//! Decisions on observed groups: creation, scaling, restarts and rolls.

use super::*;
use crate::controller::check::check;
use crate::controller::fixtures::{
    ago, demo, demo_tp3, desired_of, existing, loading, now, pod, restarted,
};
use crate::controller::observe::observe;
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
    young.metadata.creation_timestamp = Some(Time(ago(10)));
    let pods = [pod("smollm2", 0, 0, &h), young, pod("smollm2", 0, 2, &h)];
    let actions = decide_for(&md, &[0], false, &pods);
    assert!(actions.restarted.is_empty());
    assert_eq!(actions.requeue_after, Some(Duration::from_secs(20)));
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
    let actions = decide_for(&md, &[0, 1, 2], true, &old);
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

    // Group 0 serves: group 1 is next.
    pods[0] = pod("smollm2", 0, 0, &hash(&md, 0));
    let observed = observe(&statefulsets, &services, &pods);
    let actions = decide(&desired_of(&md), &observed, &check(&md).unwrap(), now());
    assert_eq!(
        actions.rolled.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids(&[1])
    );
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
