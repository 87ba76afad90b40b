//! The reconcile: the thin edge that reads what exists, lets the pure
//! functions decide, and carries it out against the API server.
//!
//! check → desired objects → list what exists → decide → server-side apply,
//! deletes → events → status. A spec that cannot run writes `Degraded` and
//! touches nothing else; a deployment being deleted is left to the garbage
//! collector (every object has the deployment as its controller owner).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::crd::{API_VERSION, GroupPhase, KIND, ModelDeployment, ModelDeploymentStatus};
use crate::load::LoadBoard;

use super::adapters::sync_groups;
use super::check::{Topology, check};
use super::decide::{Actions, GroupRestart, decide};
use super::desired::{BuildError, Desired, WorkerSettings, desired_members};
use super::labels::{
    DRAINING_SINCE_ANNOTATION, FIELD_MANAGER, GRPC_PORT, GroupId, group_name, model_selector,
    service_name,
};
use super::members::members;
use super::metrics::{Metrics, ReconcileResult};
use super::observe::{Observed, observe};
use super::progress::ask_pods;
use super::status::{already_degraded, refused_status, running_status};

/// How often a settled deployment is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a deployment with groups on their way is looked at again (pod
/// changes trigger reconciles anyway; this is the safety net).
const PROGRESS_RECHECK: Duration = Duration::from_secs(30);
/// How soon a deployment with a group downloading or loading is looked at again,
/// to update its progress.
const LOAD_RECHECK: Duration = Duration::from_secs(10);
/// First and longest wait after a failed reconcile.
const BACKOFF_MIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: WorkerSettings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The time (fixed in tests).
    pub clock: fn() -> Timestamp,
    /// The routers' latest load (the autoscaler keeps it): when a draining group
    /// has finished its streams.
    pub load: Arc<LoadBoard>,
    /// Consecutive failures per deployment, for [`error_policy`]'s backoff.
    failures: Mutex<HashMap<ObjectRef<ModelDeployment>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: WorkerSettings,
        reporter: Reporter,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            clock: Timestamp::now,
            load: Arc::default(),
            failures: Mutex::default(),
        }
    }

    /// Counts a failure of `md`'s reconcile; returns how many in a row.
    fn failed(&self, md: &ModelDeployment) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(ObjectRef::from(md)).or_default();
        *n = n.saturating_add(1);
        *n
    }

    fn succeeded(&self, md: &ModelDeployment) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&ObjectRef::from(md));
    }
}

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{verb} {what}: {source}")]
    Api {
        verb: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// The `error` label of the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Build(_) => "build",
            Self::Api { verb, .. } => verb,
        }
    }
}

fn api_error(verb: &'static str, what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { verb, what, source }
}

/// Brings one `ModelDeployment`'s objects to what its spec says.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_once(&md, &ctx).await;
    let outcome = match &result {
        Ok((outcome, _)) => {
            ctx.succeeded(&md);
            *outcome
        }
        Err(e) => {
            ctx.metrics
                .errors
                .with_label_values(&[e.metric_label()])
                .inc();
            ReconcileResult::Error
        }
    };
    ctx.metrics
        .reconciled(outcome, started.elapsed().as_secs_f64());
    result.map(|(_, action)| action)
}

/// After a failed reconcile: try again after 5 s, doubling up to 5 min
/// while it keeps failing.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failed(&md);
    let delay = backoff(failures);
    tracing::warn!(
        model_deployment = %md.name_any(),
        namespace = md.namespace().unwrap_or_default(),
        failures,
        retry_in = ?delay,
        "reconcile failed: {error}"
    );
    Action::requeue(delay)
}

/// The wait after `failures` failed reconciles in a row.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (BACKOFF_MIN * 2u32.pow(doublings)).min(BACKOFF_MAX)
}

async fn reconcile_once(
    md: &ModelDeployment,
    ctx: &Context,
) -> Result<(ReconcileResult, Action), Error> {
    if md.metadata.deletion_timestamp.is_some() {
        // The garbage collector deletes what it owns.
        return Ok((ReconcileResult::Skipped, Action::await_change()));
    }
    let name = md.name_any();
    let Some(namespace) = md.namespace() else {
        return Err(BuildError::Incomplete {
            name,
            field: "metadata.namespace",
        }
        .into());
    };
    let now = (ctx.clock)();
    let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let topology = match check(md) {
        Ok(topology) => topology,
        Err(refusal) => {
            let reason = refusal.reason.as_str();
            let message = refusal.to_string();
            if !already_degraded(md, reason, &message) {
                tracing::warn!(model_deployment = %name, %namespace, "{reason}: {message}");
                let event = event(EventType::Warning, reason, "Validate", message);
                publish(ctx, md, event).await;
            }
            write_status(&mds, &name, &refused_status(md, &refusal, now)).await?;
            return Ok((ReconcileResult::Refused, Action::requeue(RESYNC)));
        }
    };
    let objects = Objects::new(&ctx.client, &namespace);
    let mut observed = objects.observe(&name).await?;
    for (id, group) in &mut observed.groups {
        let leader = format!("{namespace}/{}-0", group_name(&name, *id));
        group.outstanding = ctx.load.outstanding(&leader);
    }
    let members = members(topology.groups, &observed, topology.pods_per_group);
    let desired = desired_members(md, &topology, &ctx.settings, &members)?;
    let actions = decide(&desired, &observed, &topology, now);

    objects.apply(&desired, &actions).await?;
    for id in &actions.drain {
        objects.mark_draining(&name, *id, Some(now)).await?;
    }
    for id in &actions.undrain {
        objects.mark_draining(&name, *id, None).await?;
    }
    for id in &actions.removed {
        objects.remove_group(&name, *id).await?;
    }
    for roll in &actions.rolled {
        objects.delete_pods(roll).await?;
        ctx.metrics.restarts.with_label_values(&["roll"]).inc();
    }
    for restart in &actions.restarted {
        objects.delete_pods(restart).await?;
        ctx.metrics
            .restarts
            .with_label_values(&["rank_failed"])
            .inc();
    }
    announce(ctx, md, &topology, &observed, &actions).await;

    ask_pods(&mut observed, GRPC_PORT as u16).await;
    let failed = sync_groups(
        md,
        &mut observed,
        topology.pods_per_group,
        GRPC_PORT as u16,
        |id| group_name(&name, id),
    )
    .await;
    for f in failed {
        let subject = match (f.group.is_empty(), f.adapter.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!("adapter {}: ", f.adapter),
            (false, true) => format!("group {}: ", f.group),
            (false, false) => format!("group {}, adapter {}: ", f.group, f.adapter),
        };
        tracing::warn!(model_deployment = %name, %namespace, "{subject}{}", f.message);
        let message = format!("{subject}{}", f.message);
        publish(
            ctx,
            md,
            event(EventType::Warning, "AdapterFailed", "LoadAdapter", message),
        )
        .await;
    }
    let status = running_status(md, &topology, &observed, &actions, now);
    let settled = status.ready_replicas == topology.groups && actions.settled();
    write_status(&mds, &name, &status).await?;
    // Bytes move without any object changing: look again soon to show them.
    let on_its_way = status
        .groups
        .iter()
        .any(|g| matches!(g.phase, GroupPhase::Downloading | GroupPhase::Loading));
    let idle = match (settled, on_its_way) {
        (true, _) => RESYNC,
        (false, true) => LOAD_RECHECK,
        (false, false) => PROGRESS_RECHECK,
    };
    let requeue = actions.requeue_after.map_or(idle, |after| after.min(idle));
    Ok((ReconcileResult::Applied, Action::requeue(requeue)))
}

/// The APIs of the objects of one namespace.
struct Objects {
    statefulsets: Api<StatefulSet>,
    services: Api<Service>,
    pods: Api<Pod>,
    budgets: Api<PodDisruptionBudget>,
    policies: Api<NetworkPolicy>,
}

impl Objects {
    fn new(client: &Client, namespace: &str) -> Self {
        Self {
            statefulsets: Api::namespaced(client.clone(), namespace),
            services: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client.clone(), namespace),
            budgets: Api::namespaced(client.clone(), namespace),
            policies: Api::namespaced(client.clone(), namespace),
        }
    }

    /// Everything labelled with `md`'s name.
    async fn observe(&self, md: &str) -> Result<Observed, Error> {
        let params = ListParams::default().labels(&model_selector(md));
        let statefulsets = self
            .statefulsets
            .list(&params)
            .await
            .map_err(api_error("list", "StatefulSets"))?;
        let services = self
            .services
            .list(&params)
            .await
            .map_err(api_error("list", "Services"))?;
        let pods = self
            .pods
            .list(&params)
            .await
            .map_err(api_error("list", "Pods"))?;
        Ok(observe(&statefulsets.items, &services.items, &pods.items))
    }

    /// The `<md>` Service, disruption budget and NetworkPolicy, every group's headless Service, and the
    /// StatefulSets of the groups `actions` names (stale groups waiting to
    /// roll keep theirs).
    async fn apply(&self, desired: &Desired, actions: &Actions) -> Result<(), Error> {
        apply(&self.services, &desired.service).await?;
        apply(&self.budgets, &desired.disruption_budget).await?;
        if let Some(policy) = &desired.network_policy {
            apply(&self.policies, policy).await?;
        }
        for group in &desired.groups {
            apply(&self.services, &group.service).await?;
            if actions.apply.contains(&group.id) {
                let record = actions.records.get(&group.id).cloned().unwrap_or_default();
                let statefulset = record.written_on(&group.statefulset);
                apply(&self.statefulsets, &statefulset).await?;
            }
        }
        Ok(())
    }

    /// Marks a group's StatefulSet as draining since `since`, or clears the mark.
    /// A merge patch, not part of the applied object: the apply of the groups that
    /// stay leaves it alone.
    async fn mark_draining(
        &self,
        md: &str,
        id: GroupId,
        since: Option<Timestamp>,
    ) -> Result<(), Error> {
        let name = group_name(md, id);
        let patch = json!({"metadata": {"annotations": {
            DRAINING_SINCE_ANNOTATION: since.map(|t| t.to_string()),
        }}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        gone_is_fine(
            self.statefulsets
                .patch(&name, &params, &Patch::Merge(&patch))
                .await,
        )
        .map_err(api_error("patch", format!("StatefulSet {name}")))
    }

    /// Deletes a group's StatefulSet (its pods follow) and Service.
    async fn remove_group(&self, md: &str, id: GroupId) -> Result<(), Error> {
        let name = group_name(md, id);
        let params = DeleteParams::background();
        gone_is_fine(self.statefulsets.delete(&name, &params).await)
            .map_err(api_error("delete", format!("StatefulSet {name}")))?;
        gone_is_fine(self.services.delete(&name, &params).await)
            .map_err(api_error("delete", format!("Service {name}")))?;
        Ok(())
    }

    /// Deletes the pods of a restart; a pod already gone, or replaced by a
    /// new one of the same name (another uid), is left alone.
    async fn delete_pods(&self, restart: &GroupRestart) -> Result<(), Error> {
        for (name, uid) in &restart.pods {
            let params = DeleteParams {
                preconditions: uid.clone().map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            gone_is_fine(self.pods.delete(name, &params).await)
                .map_err(api_error("delete", format!("Pod {name}")))?;
        }
        Ok(())
    }
}

/// Server-side apply as the operator's field manager, taking over fields
/// another manager changed (the operator owns these objects).
async fn apply<K>(api: &Api<K>, object: &K) -> Result<(), Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map_err(api_error(
            "apply",
            format!("{} {name}", K::kind(&K::DynamicType::default())),
        ))?;
    Ok(())
}

async fn write_status(
    api: &Api<ModelDeployment>,
    name: &str,
    status: &ModelDeploymentStatus,
) -> Result<(), Error> {
    let patch = json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&patch))
        .await
        .map_err(api_error("status", format!("ModelDeployment {name}")))?;
    Ok(())
}

/// A 404 (already gone) or 409 (a precondition: another object now has
/// the name) means there is nothing left to delete.
fn gone_is_fine<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Events for what this reconcile did.
async fn announce(
    ctx: &Context,
    md: &ModelDeployment,
    topology: &Topology,
    observed: &Observed,
    actions: &Actions,
) {
    let name = md.name_any();
    if !actions.created.is_empty() {
        let first = !observed.groups.values().any(|g| g.statefulset.is_some());
        let groups = list(actions.created.iter().map(|id| group_name(&name, *id)));
        let shape = format!(
            "{} pod(s) of {} rank(s) each, tensor {}",
            topology.pods_per_group, topology.ranks_per_pod, topology.tensor
        );
        let (reason, note) = if first {
            let service = service_name(&name);
            (
                "Created",
                format!("created Service {service} and StatefulSet(s) {groups} ({shape})"),
            )
        } else {
            (
                "ScaledUp",
                format!(
                    "created StatefulSet(s) {groups} ({shape}); replicas {}",
                    topology.groups
                ),
            )
        };
        publish(ctx, md, event(EventType::Normal, reason, "Create", note)).await;
    }
    for id in &actions.drain {
        let note = format!(
            "group {id}: draining (the routers send it nothing new; deleted or restarted once its streams have finished, within {} s)",
            md.spec.drain_timeout().as_secs()
        );
        let event = event(EventType::Normal, "DrainingGroup", "Drain", note);
        publish(ctx, md, about_group(event, md, *id)).await;
    }
    if !actions.removed.is_empty() {
        let groups = list(actions.removed.iter().map(|id| group_name(&name, *id)));
        let note = format!("deleted group(s) {groups}; replicas {}", topology.groups);
        publish(
            ctx,
            md,
            event(EventType::Normal, "ScaledDown", "Delete", note),
        )
        .await;
    }
    for roll in &actions.rolled {
        let note = format!(
            "group {}: restarting {} pod(s) onto spec {}",
            roll.id,
            roll.pods.len(),
            roll.why
        );
        let event = event(EventType::Normal, "RollingGroup", "Roll", note);
        publish(ctx, md, about_group(event, md, roll.id)).await;
    }
    for restart in &actions.restarted {
        let note = format!(
            "group {}: {}; deleting its {} pod(s) so that its ranks restart together",
            restart.id,
            restart.why,
            restart.pods.len()
        );
        let event = event(EventType::Warning, "GroupRestarted", "Restart", note);
        publish(ctx, md, about_group(event, md, restart.id)).await;
    }
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    }
}

/// The event names the group's StatefulSet too: events about different
/// groups are then told apart (the recorder folds repeats of one event
/// into a series, keeping the first note).
fn about_group(mut event: Event, md: &ModelDeployment, id: GroupId) -> Event {
    event.secondary = Some(ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("StatefulSet".into()),
        name: Some(group_name(&md.name_any(), id)),
        namespace: md.namespace(),
        ..ObjectReference::default()
    });
    event
}

/// Publishes an event about `md`; a failure to do so is logged, never fatal.
async fn publish(ctx: &Context, md: &ModelDeployment, event: Event) {
    if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(
            model_deployment = %md.name_any(),
            reason = %event.reason,
            "could not publish an event: {e}"
        );
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}
