//! The builtin autoscaler at work in the operator: every [`INTERVAL`] it asks the
//! routers for their load, hands the per-backend counts to the controller (for
//! draining groups), and for each ModelDeployment in builtin mode decides its groups
//! and writes `replicas` through the scale subresource under its own field manager,
//! with an Event, keeping its [`Record`] in an annotation.
//!
//! Without a complete count (a router that does not answer) it decides nothing: half
//! the load would look like a reason to scale down.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::record::{AUTOSCALER_ANNOTATION, Change, Record};
use super::{Policy, decide};
use crate::crd::ModelDeployment;
use crate::load::{LoadBoard, RouterLoad, RouterScraper};

/// How often the routers are asked and decisions made.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// The field manager of the autoscaler's writes (`replicas` and its annotation).
pub const FIELD_MANAGER: &str = "shardserve-autoscaler";
/// The Event reason of a change of `replicas`.
pub const AUTOSCALED: &str = "Autoscaled";

/// The autoscaler of every ModelDeployment the operator watches.
pub struct Autoscaler {
    client: Client,
    /// Watch this namespace only (else every namespace).
    namespace: Option<String>,
    scraper: RouterScraper,
    board: Arc<LoadBoard>,
    recorder: Recorder,
    /// The time (fixed in tests).
    pub clock: fn() -> Timestamp,
}

impl Autoscaler {
    pub fn new(
        client: Client,
        namespace: Option<String>,
        scraper: RouterScraper,
        board: Arc<LoadBoard>,
        recorder: Recorder,
    ) -> Self {
        Self {
            client,
            namespace,
            scraper,
            board,
            recorder,
            clock: Timestamp::now,
        }
    }

    /// Where the latest complete load is kept (the controller reads it).
    pub fn board(&self) -> Arc<LoadBoard> {
        self.board.clone()
    }

    /// Asks and decides every [`INTERVAL`], forever.
    pub async fn run(&self) {
        tracing::info!(
            routers = %self.scraper.service(),
            "autoscaling on the routers' in-flight requests every {} s",
            INTERVAL.as_secs()
        );
        let mut incomplete_before = false;
        loop {
            match self.scraper.scrape().await {
                Ok(load) if load.complete() => {
                    incomplete_before = false;
                    let now = (self.clock)();
                    self.board.set(now, load.clone());
                    self.scale_all(&load, now).await;
                }
                Ok(load) => {
                    // Logged once per spell, not every 5 s.
                    if !incomplete_before {
                        tracing::warn!(
                            routers = %self.scraper.service(),
                            "{} of {} router(s) answered: no autoscaling until all do",
                            load.answered,
                            load.asked
                        );
                    }
                    incomplete_before = true;
                }
                Err(e) => tracing::warn!(
                    routers = %self.scraper.service(),
                    "cannot list the routers' endpoints: {e}"
                ),
            }
            tokio::time::sleep(INTERVAL).await;
        }
    }

    /// One decision for every deployment in builtin mode, on `load`.
    pub async fn scale_all(&self, load: &RouterLoad, now: Timestamp) {
        let deployments: Api<ModelDeployment> = match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let list = match deployments.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("cannot list ModelDeployments to autoscale: {e}");
                return;
            }
        };
        for md in &list.items {
            if let Err(e) = self.scale(md, load, now).await {
                tracing::warn!(
                    model_deployment = %md.name_any(),
                    namespace = %md.namespace().unwrap_or_default(),
                    "cannot autoscale: {e}"
                );
            }
        }
    }

    /// Decides `md`'s groups and writes what changed.
    async fn scale(
        &self,
        md: &ModelDeployment,
        load: &RouterLoad,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let Some(policy) = md.spec.autoscaling.as_ref().and_then(Policy::of) else {
            return Ok(());
        };
        // A spec the operator refuses runs nothing; one being deleted is leaving.
        if !crate::validate(md).is_empty() || md.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let (Some(namespace), name) = (md.namespace(), md.name_any()) else {
            return Ok(());
        };
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let record = Record::of(md);
        let current = md.spec.replicas;
        let model_load = load.model(md.served_model_name());
        let decision = decide(&policy, current, model_load, record.memory, now);
        let mut next = Record {
            memory: decision.memory,
            last_change: record.last_change.clone(),
        };
        if let (true, Some(why)) = (decision.replicas != current, decision.why) {
            let patch = json!({"spec": {"replicas": decision.replicas}});
            api.patch_scale(&name, &params, &Patch::Merge(&patch))
                .await?;
            let change = Change {
                at: now,
                from: current,
                to: decision.replicas,
                why,
            };
            tracing::info!(model_deployment = %name, %namespace, "{}", change.describe());
            // The recorder folds events of one reason and action into a series that
            // keeps its first note: ups and downs are told apart at least (the
            // condition always tells the last change).
            let action = match change.to > change.from {
                true => "ScaleUp",
                false => "ScaleDown",
            };
            let event = Event {
                type_: EventType::Normal,
                reason: AUTOSCALED.into(),
                note: Some(change.describe()),
                action: action.into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &md.object_ref(&())).await {
                tracing::warn!(model_deployment = %name, "could not publish an event: {e}");
            }
            next.last_change = Some(change);
        }
        if next != record {
            let patch =
                json!({"metadata": {"annotations": {AUTOSCALER_ANNOTATION: next.to_json()}}});
            api.patch(&name, &params, &Patch::Merge(&patch)).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use kube::runtime::events::Reporter;
    use serde_json::Value;

    use super::*;
    use crate::autoscale::{Load, Memory};
    use crate::controller::fixtures::{ago, demo, now};
    use crate::crd::{AutoscalingMode, AutoscalingSpec};
    use crate::mock_api::{self, ApiServer};

    const DEPLOYMENTS: &str = "/apis/shardserve.io/v1alpha1/namespaces/models/modeldeployments";

    /// What the scale subresource answers (its content does not matter here).
    static SCALE: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
               "metadata": {"name": "smollm2", "namespace": "models"}, "spec": {"replicas": 1}})
    });

    fn autoscaled(replicas: u32, min: u32, max: u32, target: Option<u32>) -> ModelDeployment {
        let mut md = demo(replicas);
        md.spec.autoscaling = Some(AutoscalingSpec {
            mode: None,
            min_replicas: min,
            max_replicas: max,
            target_in_flight_requests: target,
            scale_up_delay_seconds: None,
            scale_down_delay_seconds: None,
        });
        md
    }

    fn load(in_flight: u64, waiting: u64) -> RouterLoad {
        RouterLoad {
            asked: 2,
            answered: 2,
            models: [("smollm2".to_string(), Load { in_flight, waiting })].into(),
            backends: Default::default(),
        }
    }

    /// Runs one round over `deployments` on `load` while `script` plays the API
    /// server (after the list, which it answers).
    async fn round<T, Fut>(
        deployments: Vec<ModelDeployment>,
        load: RouterLoad,
        script: impl FnOnce(ApiServer) -> Fut + Send + 'static,
    ) -> T
    where
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (client, server) = mock_api::pair();
        let scraper = RouterScraper::new(client.clone(), "shardserve", "shardserve-router");
        let reporter = Reporter {
            controller: "shardserve-operator".into(),
            instance: Some("test".into()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        let board = Arc::new(LoadBoard::default());
        let autoscaler = Autoscaler::new(client, Some("models".into()), scraper, board, recorder);
        let task = tokio::spawn(async move {
            let mut api = server;
            let call = api.expect(Method::GET, DEPLOYMENTS).await;
            call.reply(
                StatusCode::OK,
                &json!({"apiVersion": "shardserve.io/v1alpha1", "kind": "ModelDeploymentList",
                        "metadata": {"resourceVersion": "7"}, "items": deployments}),
            );
            script(api).await
        });
        autoscaler.scale_all(&load, now()).await;
        match task.await {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// A merge patch by the autoscaler's field manager at `path`; returns its body.
    async fn patched(api: &mut ApiServer, path: &str, answer: &impl serde::Serialize) -> Value {
        let call = api.expect(Method::PATCH, path).await;
        assert!(
            call.query.contains("fieldManager=shardserve-autoscaler"),
            "{}",
            call.query
        );
        let body = call.body.clone();
        call.reply(StatusCode::OK, answer);
        body
    }

    /// One round over `md` alone that must change its replicas (and its record):
    /// the replicas written.
    async fn rescaled(md: ModelDeployment, load: RouterLoad) -> u64 {
        let answer = md.clone();
        let scale = round(vec![md], load, move |mut api| async move {
            let scale = patched(&mut api, &format!("{DEPLOYMENTS}/smollm2/scale"), &*SCALE).await;
            patched(&mut api, &format!("{DEPLOYMENTS}/smollm2"), &answer).await;
            api.done().await;
            scale
        })
        .await;
        scale["spec"]["replicas"]
            .as_u64()
            .expect("replicas in the scale patch")
    }

    fn record_in(patch: &Value) -> Record {
        serde_json::from_str(
            patch["metadata"]["annotations"][AUTOSCALER_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn load_above_the_target_scales_up_through_the_scale_subresource_with_an_event() {
        let md = autoscaled(1, 1, 4, Some(4));
        let answer = md.clone();
        let (scale, annotation, events) = round(vec![md], load(13, 0), move |mut api| async move {
            let scale = patched(&mut api, &format!("{DEPLOYMENTS}/smollm2/scale"), &*SCALE).await;
            let annotation = patched(&mut api, &format!("{DEPLOYMENTS}/smollm2"), &answer).await;
            (scale, annotation, api.done().await)
        })
        .await;
        assert_eq!(scale, json!({"spec": {"replicas": 4}}));
        let change = record_in(&annotation).last_change.unwrap();
        assert_eq!((change.from, change.to), (1, 4));
        assert_eq!(change.why, "13 request(s) in flight, 4 per group aimed for");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, AUTOSCALED);
        assert!(
            events[0].1.starts_with("scaled up from 1 to 4 group(s)"),
            "{}",
            events[0].1
        );
    }

    #[tokio::test]
    async fn a_request_held_for_a_model_scaled_to_zero_starts_a_group_at_once() {
        let mut md = autoscaled(0, 0, 3, Some(8));
        md.spec.autoscaling.as_mut().unwrap().scale_up_delay_seconds = Some(120);
        assert_eq!(rescaled(md, load(1, 1)).await, 1);
    }

    #[tokio::test]
    async fn lower_load_is_remembered_on_the_deployment_before_any_group_goes() {
        let md = autoscaled(3, 0, 3, Some(4));
        let answer = md.clone();
        let annotation = round(vec![md.clone()], load(2, 0), move |mut api| async move {
            let annotation = patched(&mut api, &format!("{DEPLOYMENTS}/smollm2"), &answer).await;
            api.done().await;
            annotation
        })
        .await;
        let record = record_in(&annotation);
        assert_eq!(
            record.memory,
            Memory {
                fewer_since: Some(now()),
                fewer_at_most: 1,
                ..Memory::default()
            }
        );
        assert_eq!(record.last_change, None);

        // 300 s later (the default delay), still low: one group stays.
        let mut md = md;
        let earlier = Record {
            memory: Memory {
                fewer_since: Some(ago(300)),
                fewer_at_most: 1,
                ..Memory::default()
            },
            last_change: None,
        };
        md.metadata.annotations =
            Some([(AUTOSCALER_ANNOTATION.to_string(), earlier.to_json())].into());
        assert_eq!(rescaled(md, load(2, 0)).await, 1);
    }

    #[tokio::test]
    async fn external_mode_and_steady_load_write_nothing() {
        // Bounds for an HPA (no target): replicas are someone else's.
        let external = autoscaled(2, 1, 4, None);
        let mut explicit = autoscaled(2, 1, 4, Some(4));
        explicit.metadata.name = Some("explicit".into());
        explicit.spec.served_model_name = Some("smollm2".into());
        explicit.spec.autoscaling.as_mut().unwrap().mode = Some(AutoscalingMode::External);
        // Builtin with the load it runs for: nothing to remember either.
        let mut steady = autoscaled(2, 1, 4, Some(4));
        steady.metadata.name = Some("steady".into());
        steady.spec.served_model_name = Some("smollm2".into());
        let events = round(
            vec![external, explicit, steady],
            load(7, 0),
            |api| async move { api.done().await },
        )
        .await;
        assert!(events.is_empty());
    }
}
