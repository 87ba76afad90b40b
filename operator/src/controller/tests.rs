//! The reconcile against a scripted API server ([`mock_api`]): each test lists
//! the requests it expects, in order, with what the API server answers, and
//! checks what the reconcile sent. Events are checked by reason at the end.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use serde::Serialize;
use serde_json::{Value, json};

use super::check::check;
use super::desired::{WorkerSettings, desired};
use super::fixtures::{
    NAMESPACE, UID, ago, demo, demo_tp3, desired_of, existing, loading, now, pod, restarted,
    settings,
};
use super::{Context, Error, Metrics, error_policy, reconcile};
use crate::crd::{GroupPhase, ModelDeployment, ModelDeploymentStatus};
use crate::load::RouterLoad;
use crate::mock_api::{self, ApiServer};

const STATEFULSETS: &str = "/apis/apps/v1/namespaces/models/statefulsets";
const SERVICES: &str = "/api/v1/namespaces/models/services";
const PODS: &str = "/api/v1/namespaces/models/pods";
const DEPLOYMENTS: &str = "/apis/shardserve.io/v1alpha1/namespaces/models/modeldeployments";
const SELECTOR: &str = "labelSelector=shardserve.io%2Fmodel-deployment%3Dsmollm2";
const APPLY: [&str; 2] = ["fieldManager=shardserve-operator", "force=true"];

impl ApiServer {
    /// A list of `what` by the deployment's label, answered with `items`.
    async fn list<T: Serialize>(&mut self, what: &str, items: &[T]) {
        let call = self.expect(Method::GET, what).await;
        assert!(call.query.contains(SELECTOR), "{}", call.query);
        call.reply(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "7"}, "items": items}),
        );
    }

    async fn observe(&mut self, statefulsets: &[StatefulSet], services: &[Service], pods: &[Pod]) {
        self.list(STATEFULSETS, statefulsets).await;
        self.list(SERVICES, services).await;
        self.list(PODS, pods).await;
    }

    /// A server-side apply of `path`; returns the object sent.
    async fn apply(&mut self, path: &str) -> Value {
        let call = self.expect(Method::PATCH, path).await;
        for part in APPLY {
            assert!(call.query.contains(part), "{path}: {}", call.query);
        }
        call.echo()
    }

    /// A delete of `path`, answered with `status`; returns the options sent.
    async fn delete(&mut self, path: &str, status: StatusCode) -> Value {
        let call = self.expect(Method::DELETE, path).await;
        let options = call.body.clone();
        if status.is_success() {
            call.reply(
                status,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            );
        } else {
            call.reply(
                status,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status.as_u16(), "reason": "NotFound", "message": "gone"}),
            );
        }
        options
    }

    /// The status patch; returns the status written.
    async fn status(&mut self, md: &ModelDeployment) -> ModelDeploymentStatus {
        let path = format!(
            "{DEPLOYMENTS}/{}/status",
            md.metadata.name.as_deref().unwrap()
        );
        let call = self.expect(Method::PATCH, &path).await;
        for part in APPLY {
            assert!(call.query.contains(part), "{}", call.query);
        }
        assert_eq!(call.body["apiVersion"], "shardserve.io/v1alpha1");
        assert_eq!(call.body["kind"], "ModelDeployment");
        let status: ModelDeploymentStatus =
            serde_json::from_value(call.body["status"].clone()).unwrap();
        let mut answer = md.clone();
        answer.status = Some(status.clone());
        call.reply(StatusCode::OK, &answer);
        status
    }
}

fn context() -> (Arc<Context>, ApiServer) {
    context_with(settings())
}

fn context_with(settings: WorkerSettings) -> (Arc<Context>, ApiServer) {
    let (client, server) = mock_api::pair();
    let reporter = Reporter {
        controller: "shardserve-operator".into(),
        instance: Some("test".into()),
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let mut ctx = Context::new(client, settings, reporter, metrics);
    ctx.clock = now;
    (Arc::new(ctx), server)
}

/// Runs one reconcile of `md` while `script` plays the API server;
/// returns the reconcile's result and what the script returned.
async fn scripted<T, Fut>(
    md: &ModelDeployment,
    script: impl FnOnce(ApiServer) -> Fut,
) -> (Result<Action, Error>, T, Arc<Context>)
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    scripted_with(md, None, script).await
}

/// [`scripted`], the routers having counted `load` (at its time) before.
async fn scripted_with<T, Fut>(
    md: &ModelDeployment,
    load: Option<(k8s_openapi::jiff::Timestamp, RouterLoad)>,
    script: impl FnOnce(ApiServer) -> Fut,
) -> (Result<Action, Error>, T, Arc<Context>)
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let (ctx, server) = context();
    if let Some((at, load)) = load {
        ctx.load.set(at, load);
    }
    let task = tokio::spawn(script(server));
    let result = reconcile(Arc::new(md.clone()), ctx.clone()).await;
    let out = match task.await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    (result, out, ctx)
}

fn condition<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn reasons(events: &[(String, String)]) -> Vec<&str> {
    events.iter().map(|(r, _)| r.as_str()).collect()
}

fn sts(name: &str) -> String {
    format!("{STATEFULSETS}/{name}")
}

fn svc(name: &str) -> String {
    format!("{SERVICES}/{name}")
}

fn pdb(name: &str) -> String {
    format!("/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets/{name}")
}

fn pod_path(name: &str) -> String {
    format!("{PODS}/{name}")
}

#[tokio::test]
async fn with_network_policies_the_deployment_gets_its_policy_beside_its_budget() {
    let md = demo(1);
    let settings = WorkerSettings {
        network: Some(crate::controller::desired::NetworkPeers {
            router: "shardserve:app.kubernetes.io/component=router"
                .parse()
                .unwrap(),
            operator: "shardserve:app.kubernetes.io/component=operator"
                .parse()
                .unwrap(),
            scrapers: vec![],
        }),
        ..settings()
    };
    let expected = desired(&md, &check(&md).unwrap(), &settings).unwrap();
    let (ctx, server) = context_with(settings);
    let script_md = md.clone();
    let task = tokio::spawn(async move {
        let mut api = server;
        api.observe(&[], &[], &[]).await;
        api.apply(&svc("smollm2")).await;
        api.apply(&pdb("smollm2")).await;
        let policy = api
            .apply(&format!(
                "/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies/smollm2"
            ))
            .await;
        assert_eq!(
            policy,
            serde_json::to_value(expected.network_policy.as_ref().unwrap()).unwrap()
        );
        assert_eq!(policy["metadata"]["ownerReferences"][0]["name"], "smollm2");
        api.apply(&svc("smollm2-g0")).await;
        api.apply(&sts("smollm2-g0")).await;
        api.status(&script_md).await;
        api.done().await
    });
    let result = reconcile(Arc::new(md), ctx).await;
    task.await.unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn creating_applies_services_and_statefulsets_owned_by_the_deployment() {
    let md = demo(2);
    let desired = desired_of(&md);
    let expected = desired.clone();
    let script_md = md.clone();
    let (result, (status, events), _) = scripted(&md, move |mut api| async move {
        api.observe(&[], &[], &[]).await;
        let service = api.apply(&svc("smollm2")).await;
        assert_eq!(service, serde_json::to_value(&expected.service).unwrap());
        let budget = api.apply(&pdb("smollm2")).await;
        assert_eq!(
            budget,
            serde_json::to_value(&expected.disruption_budget).unwrap()
        );
        for group in &expected.groups {
            let name = format!("smollm2-g{}", group.id);
            let headless = api.apply(&svc(&name)).await;
            assert_eq!(headless, serde_json::to_value(&group.service).unwrap());
            let statefulset = api.apply(&sts(&name)).await;
            assert_eq!(
                statefulset,
                serde_json::to_value(&group.statefulset).unwrap()
            );
        }
        let status = api.status(&script_md).await;
        (status, api.done().await)
    })
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));

    // Deleting the deployment deletes everything: each object names it as
    // its controller.
    let owner = json!([{
        "apiVersion": "shardserve.io/v1alpha1", "kind": "ModelDeployment", "name": "smollm2",
        "uid": UID, "controller": true, "blockOwnerDeletion": true
    }]);
    let objects = [
        serde_json::to_value(&desired.service).unwrap(),
        serde_json::to_value(&desired.disruption_budget).unwrap(),
        serde_json::to_value(&desired.groups[0].service).unwrap(),
        serde_json::to_value(&desired.groups[1].statefulset).unwrap(),
    ];
    for object in objects {
        assert_eq!(object["metadata"]["ownerReferences"], owner);
    }

    assert_eq!((status.replicas, status.ready_replicas), (2, 0));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status.selector.as_deref(),
        Some("shardserve.io/model-deployment=smollm2")
    );
    assert_eq!(
        condition(&status, "Ready"),
        ("False", "GroupsNotReady", "0 of 2 group(s) serve")
    );
    assert_eq!(
        condition(&status, "Progressing"),
        ("True", "Scaling", "creating group(s) 0, 1")
    );
    assert_eq!(condition(&status, "Degraded").0, "False");
    assert_eq!(reasons(&events), ["Created"]);
    assert_eq!(
        events[0].1,
        "created Service smollm2 and StatefulSet(s) smollm2-g0, smollm2-g1 (1 pod(s) of 1 rank(s) each, tensor 1)"
    );
}

#[tokio::test]
async fn scaling_up_creates_the_new_groups() {
    let md = demo(3);
    let hash = desired_of(&md).groups[0].spec_hash.clone();
    let (statefulsets, services) = existing(&md, &[0], None);
    let pods = vec![pod("smollm2", 0, 0, &hash)];
    let script_md = md.clone();
    let (result, (status, events), _) = scripted(&md, move |mut api| async move {
        api.observe(&statefulsets, &services, &pods).await;
        api.apply(&svc("smollm2")).await;
        api.apply(&pdb("smollm2")).await;
        for g in 0..3 {
            api.apply(&svc(&format!("smollm2-g{g}"))).await;
            api.apply(&sts(&format!("smollm2-g{g}"))).await;
        }
        let status = api.status(&script_md).await;
        (status, api.done().await)
    })
    .await;
    result.unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (3, 1));
    assert_eq!(
        condition(&status, "Progressing"),
        ("True", "Scaling", "creating group(s) 1, 2")
    );
    assert_eq!(reasons(&events), ["ScaledUp"]);
}

#[tokio::test]
async fn scaling_down_without_a_drain_deletes_the_extra_groups() {
    let mut md = demo(1);
    md.spec.drain_timeout_seconds = Some(0);
    let mut big = demo(3);
    big.spec.drain_timeout_seconds = Some(0);
    let (statefulsets, services) = existing(&big, &[0, 1, 2], None);
    let desired = desired_of(&big);
    let pods: Vec<Pod> = (0..3)
        .map(|g| pod("smollm2", g, 0, &desired.groups[g as usize].spec_hash))
        .collect();
    let script_md = md.clone();
    let (result, (status, options, events), _) = scripted(&md, move |mut api| async move {
        api.observe(&statefulsets, &services, &pods).await;
        api.apply(&svc("smollm2")).await;
        api.apply(&pdb("smollm2")).await;
        api.apply(&svc("smollm2-g0")).await;
        api.apply(&sts("smollm2-g0")).await;
        let options = api.delete(&sts("smollm2-g1"), StatusCode::OK).await;
        api.delete(&svc("smollm2-g1"), StatusCode::OK).await;
        // Already gone (deleted by hand): fine.
        api.delete(&sts("smollm2-g2"), StatusCode::NOT_FOUND).await;
        api.delete(&svc("smollm2-g2"), StatusCode::OK).await;
        let status = api.status(&script_md).await;
        (status, options, api.done().await)
    })
    .await;
    result.unwrap();
    // The StatefulSet's pods are deleted by the garbage collector.
    assert_eq!(options["propagationPolicy"], "Background");
    assert_eq!((status.replicas, status.ready_replicas), (1, 1));
    assert_eq!(
        condition(&status, "Ready"),
        ("True", "AllGroupsReady", "1 of 1 group(s) serve")
    );
    assert_eq!(
        condition(&status, "Progressing"),
        ("True", "Scaling", "removing group(s) 1, 2")
    );
    assert_eq!(reasons(&events), ["ScaledDown"]);
}

#[tokio::test]
async fn a_failed_rank_restarts_its_whole_group() {
    let md = demo_tp3(2);
    let desired = desired_of(&md);
    let (h0, h1) = (
        desired.groups[0].spec_hash.clone(),
        desired.groups[1].spec_hash.clone(),
    );
    let (statefulsets, services) = existing(&md, &[0, 1], None);
    let pods = vec![
        pod("smollm2", 0, 0, &h0),
        pod("smollm2", 0, 1, &h0),
        pod("smollm2", 0, 2, &h0),
        loading(pod("smollm2", 1, 0, &h1)),
        restarted(pod("smollm2", 1, 1, &h1)),
        pod("smollm2", 1, 2, &h1),
    ];
    let script_md = md.clone();
    let (result, (status, preconditions, events), ctx) = scripted(&md, move |mut api| async move {
        api.observe(&statefulsets, &services, &pods).await;
        api.apply(&svc("smollm2")).await;
        api.apply(&pdb("smollm2")).await;
        for g in 0..2 {
            api.apply(&svc(&format!("smollm2-g{g}"))).await;
            api.apply(&sts(&format!("smollm2-g{g}"))).await;
        }
        // Group 1's pods, all of them; group 0 keeps serving.
        let mut preconditions = Vec::new();
        for i in 0..3 {
            let options = api
                .delete(&pod_path(&format!("smollm2-g1-{i}")), StatusCode::OK)
                .await;
            preconditions.push(options["preconditions"]["uid"].clone());
        }
        let status = api.status(&script_md).await;
        (status, preconditions, api.done().await)
    })
    .await;
    result.unwrap();
    // Only the pods that were seen: a replacement of the same name is spared.
    assert_eq!(
        preconditions,
        [
            json!("uid-smollm2-g1-0"),
            json!("uid-smollm2-g1-1"),
            json!("uid-smollm2-g1-2")
        ]
    );
    assert_eq!((status.replicas, status.ready_replicas), (2, 1));
    assert_eq!(
        condition(&status, "Degraded"),
        (
            "True",
            "RankFailed",
            "group 1: container rank-0 of pod smollm2-g1-1 restarted 1 time(s); the group restarts"
        )
    );
    assert_eq!(condition(&status, "Progressing").1, "Restarting");
    assert_eq!(reasons(&events), ["GroupRestarted"]);
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("shardserve_operator_group_restarts_total{reason=\"rank_failed\"} 1"),
        "{metrics}"
    );
}

/// The StatefulSet controller recreated a failed pod of group 0 before the operator
/// saw it fail: the new pod is not among those the group formed with (its
/// StatefulSet's record), so the whole group restarts, the record is dropped and the
/// restart counted on the StatefulSet.
#[tokio::test]
async fn a_pod_recreated_before_the_operator_looked_restarts_its_group() {
    let md = demo_tp3(1);
    let h = desired_of(&md).groups[0].spec_hash.clone();
    let (mut statefulsets, services) = existing(&md, &[0], None);
    statefulsets[0]
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(
            crate::controller::labels::POD_UIDS_ANNOTATION.into(),
            "uid-smollm2-g0-0,uid-smollm2-g0-1,uid-smollm2-g0-2".into(),
        );
    let mut recreated = loading(pod("smollm2", 0, 1, &h));
    recreated.metadata.uid = Some("uid-new".into());
    let pods = vec![
        pod("smollm2", 0, 0, &h),
        recreated,
        pod("smollm2", 0, 2, &h),
    ];
    let script_md = md.clone();
    let (result, (applied, preconditions, status, events), _) =
        scripted(&md, move |mut api| async move {
            api.observe(&statefulsets, &services, &pods).await;
            api.apply(&svc("smollm2")).await;
            api.apply(&pdb("smollm2")).await;
            api.apply(&svc("smollm2-g0")).await;
            let applied = api.apply(&sts("smollm2-g0")).await;
            let mut preconditions = Vec::new();
            for i in 0..3 {
                let options = api
                    .delete(&pod_path(&format!("smollm2-g0-{i}")), StatusCode::OK)
                    .await;
                preconditions.push(options["preconditions"]["uid"].clone());
            }
            let status = api.status(&script_md).await;
            (applied, preconditions, status, api.done().await)
        })
        .await;
    result.unwrap();
    assert_eq!(
        preconditions,
        [
            json!("uid-smollm2-g0-0"),
            json!("uid-new"),
            json!("uid-smollm2-g0-2")
        ]
    );
    let annotations = &applied["metadata"]["annotations"];
    assert!(
        annotations["shardserve.io/pod-uids"].is_null(),
        "{annotations}"
    );
    let restarts = annotations["shardserve.io/restarts"].as_str().unwrap();
    assert!(
        restarts.starts_with("1;")
            && restarts.ends_with(
                ";pod smollm2-g0-1 is not the one the group formed with (it was recreated)"
            ),
        "{restarts}"
    );
    assert_eq!(condition(&status, "Degraded").1, "RankFailed");
    assert_eq!(reasons(&events), ["GroupRestarted"]);
}

#[tokio::test]
async fn a_spec_change_rolls_one_group_per_reconcile_while_the_others_serve() {
    let mut md = demo(3);
    // No drain here (see the drain tests).
    md.spec.drain_timeout_seconds = Some(0);
    md.spec.engine.max_seq_len = Some(4096);
    md.metadata.generation = Some(2);
    let desired = desired_of(&md);
    let (statefulsets, services) = existing(&md, &[0, 1, 2], Some("old"));
    let old: Vec<Pod> = (0..3).map(|g| pod("smollm2", g, 0, "old")).collect();

    // First reconcile: group 0 gets the new StatefulSet and its pod is
    // deleted; groups 1 and 2 are not touched.
    let (sts1, svcs1, pods1) = (statefulsets.clone(), services.clone(), old.clone());
    let script_md = md.clone();
    let (result, (status, applied, events), _) = scripted(&md, move |mut api| async move {
        api.observe(&sts1, &svcs1, &pods1).await;
        api.apply(&svc("smollm2")).await;
        api.apply(&pdb("smollm2")).await;
        api.apply(&svc("smollm2-g0")).await;
        let applied = api.apply(&sts("smollm2-g0")).await;
        api.apply(&svc("smollm2-g1")).await;
        api.apply(&svc("smollm2-g2")).await;
        api.delete(&pod_path("smollm2-g0-0"), StatusCode::OK).await;
        let status = api.status(&script_md).await;
        (status, applied, api.done().await)
    })
    .await;
    result.unwrap();
    assert_eq!(
        applied["metadata"]["annotations"]["shardserve.io/spec-hash"],
        desired.groups[0].spec_hash.as_str()
    );
    assert_eq!((status.replicas, status.ready_replicas), (3, 2));
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(
        condition(&status, "Progressing"),
        (
            "True",
            "Rolling",
            "rolling out a changed spec, one serving group at a time; restarting group(s) 0; group(s) 1, 2 wait for the others to serve"
        )
    );
    assert_eq!(reasons(&events), ["RollingGroup"]);

    // Second reconcile: group 0 runs the new spec but still loads, so
    // nothing else rolls.
    let mut statefulsets2 = statefulsets.clone();
    statefulsets2[0] = desired.groups[0].statefulset.clone();
    let mut pods2 = old.clone();
    pods2[0] = loading(pod("smollm2", 0, 0, &desired.groups[0].spec_hash));
    let script_md = md.clone();
    let (result, (status, events), _) = scripted(&md, move |mut api| async move {
        api.observe(&statefulsets2, &services, &pods2).await;
        api.apply(&svc("smollm2")).await;
        api.apply(&pdb("smollm2")).await;
        api.apply(&svc("smollm2-g0")).await;
        api.apply(&sts("smollm2-g0")).await;
        api.apply(&svc("smollm2-g1")).await;
        api.apply(&svc("smollm2-g2")).await;
        let status = api.status(&script_md).await;
        (status, api.done().await)
    })
    .await;
    result.unwrap();
    assert_eq!(status.ready_replicas, 2);
    assert_eq!(
        condition(&status, "Progressing").2,
        "rolling out a changed spec, one serving group at a time; group(s) 1, 2 wait for the others to serve"
    );
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn an_invalid_spec_is_degraded_and_creates_nothing() {
    let mut md = demo(2);
    md.spec.tensor = 2;
    md.spec.model.shape = Some(crate::controller::fixtures::demo_shape());
    let script_md = md.clone();
    let (result, (status, events), _) = scripted(&md, move |mut api| async move {
        let status = api.status(&script_md).await;
        (status, api.done().await)
    })
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let message = "spec.tensor: 2 does not divide the 9 attention heads; \
                   spec.tensor: 2 neither divides nor is a multiple of the 3 KV heads";
    assert_eq!(
        condition(&status, "Degraded"),
        ("True", "DoesNotFit", message)
    );
    assert_eq!(condition(&status, "Ready").0, "False");
    assert_eq!(condition(&status, "Progressing").0, "False");
    assert_eq!((status.replicas, status.ready_replicas), (0, 0));
    assert_eq!(reasons(&events), ["DoesNotFit"]);
    assert_eq!(events[0].1, message);

    // Reconciled again with the same problem: the status is written, the
    // event not repeated, and the transition time kept.
    let mut again = md.clone();
    let mut earlier = status.clone();
    for c in &mut earlier.conditions {
        c.last_transition_time = Time(super::fixtures::ago(3600));
    }
    again.status = Some(earlier);
    let script_md = again.clone();
    let (result, (status, events), _) = scripted(&again, move |mut api| async move {
        let status = api.status(&script_md).await;
        (status, api.done().await)
    })
    .await;
    result.unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(
        status.conditions[2].last_transition_time,
        Time(super::fixtures::ago(3600))
    );
}

#[tokio::test]
async fn a_spec_refused_by_validation_names_every_field() {
    let mut md = demo(1);
    md.spec.served_model_name = Some("two words".into());
    md.spec.model.source = "file://relative/model.gguf".into();
    let script_md = md.clone();
    let (result, (status, events), _) = scripted(&md, move |mut api| async move {
        let status = api.status(&script_md).await;
        (status, api.done().await)
    })
    .await;
    result.unwrap();
    let (state, reason, message) = condition(&status, "Degraded");
    assert_eq!((state, reason), ("True", "InvalidSpec"));
    assert!(
        message.starts_with("spec.servedModelName: \"two words\""),
        "{message}"
    );
    assert!(message.contains("only for local runs"), "{message}");
    assert_eq!(reasons(&events), ["InvalidSpec"]);
}

#[tokio::test]
async fn a_deployment_being_deleted_is_left_to_the_garbage_collector() {
    let mut md = demo(2);
    md.metadata.deletion_timestamp = Some(Time(now()));
    let (result, events, _) = scripted(&md, |api| api.done()).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(events.is_empty());
}

#[tokio::test]
async fn a_failing_api_server_is_retried_with_growing_backoff() {
    let md = demo(1);
    let (result, events, ctx) = scripted(&md, |mut api| async move {
        let call = api.expect(Method::GET, STATEFULSETS).await;
        call.reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "reason": "InternalError", "message": "etcd is down"}),
        );
        api.done().await
    })
    .await;
    assert!(events.is_empty());
    let error = result.unwrap_err();
    assert_eq!(error.metric_label(), "list");
    assert!(
        error.to_string().starts_with("list StatefulSets: "),
        "{error}"
    );
    let md = Arc::new(md);
    assert_eq!(
        error_policy(md.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(md.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("shardserve_operator_reconciles_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shardserve_operator_reconcile_errors_total{error=\"list\"} 1"),
        "{metrics}"
    );
    assert_eq!(super::backoff(20), Duration::from_secs(300));
}

/// The controller as `shardserve operator` runs it: its watches start with
/// the right label selectors, and a deployment it lists is reconciled.
#[tokio::test]
async fn the_controller_watches_its_objects_and_reconciles_what_it_lists() {
    let (ctx, mut server) = context();
    let client = ctx.client.clone();
    let controller = tokio::spawn(super::run_controller(client, None, ctx));
    let mut listed = Vec::new();
    let mut watches = Vec::new();
    let mut applied = Vec::new();
    let status = loop {
        let call = server.next().await;
        let (method, path, query) = (call.method.clone(), call.path.clone(), call.query.clone());
        if method == Method::GET && query.contains("watch=true") {
            watches.push(call.respond); // held open: no changes
            continue;
        }
        if method == Method::GET {
            listed.push(format!("{path}?{query}"));
            let items = if path == "/apis/shardserve.io/v1alpha1/modeldeployments" {
                vec![serde_json::to_value(demo(1)).unwrap()]
            } else {
                Vec::new()
            };
            call.reply(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "7"}, "items": items}),
            );
            continue;
        }
        assert_eq!(method, Method::PATCH, "{path}");
        if path.ends_with("/status") {
            let status = call.body["status"].clone();
            call.reply(StatusCode::OK, &json!(demo(1)));
            break status;
        }
        applied.push(path);
        call.echo();
    };
    controller.abort();
    drop(watches);
    let managed = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dshardserve-operator";
    let watched = |prefix: &str, selector: &str| {
        listed
            .iter()
            .any(|l| l.starts_with(&format!("{prefix}?")) && l.contains(selector))
    };
    assert!(
        watched("/apis/shardserve.io/v1alpha1/modeldeployments", ""),
        "{listed:#?}"
    );
    assert!(
        watched("/apis/apps/v1/statefulsets", managed),
        "{listed:#?}"
    );
    assert!(watched("/api/v1/services", managed), "{listed:#?}");
    assert!(
        watched(
            "/api/v1/pods",
            "labelSelector=shardserve.io%2Fmodel-deployment"
        ),
        "{listed:#?}"
    );
    assert_eq!(
        applied,
        [
            svc("smollm2"),
            pdb("smollm2"),
            svc("smollm2-g0"),
            sts("smollm2-g0")
        ]
    );
    assert_eq!(status["replicas"], 1);
}

/// The routers' load with `n` requests outstanding on `backend`.
fn outstanding(backend: &str, n: u64) -> RouterLoad {
    RouterLoad::from_metrics(&format!(
        "shardserve_router_backend_outstanding_requests{{backend=\"{backend}\",model=\"smollm2\"}} {n}\n"
    ))
}

#[tokio::test]
async fn scaling_down_drains_the_least_loaded_group_whatever_its_number() {
    let md = demo(1);
    let two = desired_of(&demo(2));
    let (statefulsets, services) = existing(&demo(2), &[0, 1], None);
    let pods: Vec<Pod> = (0..2)
        .map(|g| pod("smollm2", g, 0, &two.groups[g as usize].spec_hash))
        .collect();
    // The routers count 3 requests on group 1, none on group 0: group 0 goes.
    let mut load = outstanding("models/smollm2-g1-0", 3);
    load.add(outstanding("models/smollm2-g0-0", 0));
    let script_md = md.clone();
    let (result, (mark, status), _) =
        scripted_with(&md, Some((ago(1), load)), move |mut api| async move {
            api.observe(&statefulsets, &services, &pods).await;
            api.apply(&svc("smollm2")).await;
            api.apply(&pdb("smollm2")).await;
            api.apply(&svc("smollm2-g1")).await;
            api.apply(&sts("smollm2-g1")).await;
            let mark = api.expect(Method::PATCH, &sts("smollm2-g0")).await.echo();
            let status = api.status(&script_md).await;
            api.done().await;
            (mark, status)
        })
        .await;
    result.unwrap();
    assert_eq!(
        mark,
        json!({"metadata": {"annotations": {"shardserve.io/draining-since": now().to_string()}}})
    );
    let phases: Vec<(&str, GroupPhase)> = status
        .groups
        .iter()
        .map(|g| (g.name.as_str(), g.phase))
        .collect();
    assert_eq!(
        phases,
        [
            ("smollm2-g0", GroupPhase::Draining),
            ("smollm2-g1", GroupPhase::Serving)
        ]
    );
    assert_eq!((status.replicas, status.ready_replicas), (1, 1));
}

#[tokio::test]
async fn scaling_down_drains_a_serving_group_before_deleting_it() {
    let md = demo(1);
    let two = desired_of(&demo(2));
    let (statefulsets, services) = existing(&demo(2), &[0, 1], None);
    let pods: Vec<Pod> = (0..2)
        .map(|g| pod("smollm2", g, 0, &two.groups[g as usize].spec_hash))
        .collect();

    // 1. Group 1 serves: marked draining, shown Draining (the routers leave it),
    //    not deleted.
    let (sts1, svcs1, pods1, script_md) = (
        statefulsets.clone(),
        services.clone(),
        pods.clone(),
        md.clone(),
    );
    let (result, (mark, status, events), _) = scripted(&md, move |mut api| async move {
        api.observe(&sts1, &svcs1, &pods1).await;
        api.apply(&svc("smollm2")).await;
        api.apply(&pdb("smollm2")).await;
        api.apply(&svc("smollm2-g0")).await;
        api.apply(&sts("smollm2-g0")).await;
        let call = api.expect(Method::PATCH, &sts("smollm2-g1")).await;
        assert!(
            call.query.contains("fieldManager=shardserve-operator"),
            "{}",
            call.query
        );
        let mark = call.echo();
        let status = api.status(&script_md).await;
        (mark, status, api.done().await)
    })
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(2)));
    assert_eq!(
        mark,
        json!({"metadata": {"annotations": {"shardserve.io/draining-since": now().to_string()}}})
    );
    let g1 = &status.groups[1];
    assert_eq!(
        (g1.name.as_str(), g1.phase),
        ("smollm2-g1", GroupPhase::Draining)
    );
    assert_eq!(reasons(&events), ["DrainingGroup"]);

    // 2. Marked 30 s ago; the routers still count 2 streams on it: kept.
    let mut marked = statefulsets.clone();
    marked[1]
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("shardserve.io/draining-since".into(), ago(30).to_string());
    let busy = outstanding("models/smollm2-g1-0", 2);
    let (sts2, svcs2, pods2, script_md) =
        (marked.clone(), services.clone(), pods.clone(), md.clone());
    let (result, (status, events), _) =
        scripted_with(&md, Some((ago(1), busy)), move |mut api| async move {
            api.observe(&sts2, &svcs2, &pods2).await;
            api.apply(&svc("smollm2")).await;
            api.apply(&pdb("smollm2")).await;
            api.apply(&svc("smollm2-g0")).await;
            api.apply(&sts("smollm2-g0")).await;
            let status = api.status(&script_md).await;
            (status, api.done().await)
        })
        .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(2)));
    assert_eq!(status.groups[1].phase, GroupPhase::Draining);
    assert!(events.is_empty(), "{events:?}");

    // 3. The routers count none on it: deleted.
    let idle = outstanding("models/smollm2-g1-0", 0);
    let script_md = md.clone();
    let (result, (status, events), _) =
        scripted_with(&md, Some((ago(1), idle)), move |mut api| async move {
            api.observe(&marked, &services, &pods).await;
            api.apply(&svc("smollm2")).await;
            api.apply(&pdb("smollm2")).await;
            api.apply(&svc("smollm2-g0")).await;
            api.apply(&sts("smollm2-g0")).await;
            api.delete(&sts("smollm2-g1"), StatusCode::OK).await;
            api.delete(&svc("smollm2-g1"), StatusCode::OK).await;
            let status = api.status(&script_md).await;
            (status, api.done().await)
        })
        .await;
    result.unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (1, 1));
    assert_eq!(reasons(&events), ["ScaledDown"]);
}
