//! Kubernetes discovery: two watchers (ModelDeployments, and the
//! EndpointSlices of their rank-0 Services) feed reflector stores; after
//! every change the stores' contents go through the pure [`translate`] and
//! the result is published on a watch channel that the router follows.
//! Watch errors (RBAC, a missing CRD, an API server restart) are logged and
//! retried with kube's default backoff, so discovery never ends on its own.

mod translate;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ResourceExt};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::translate::{SERVICE_NAME_LABEL, translate};
use crate::config::RouterError;
use crate::discovery::{Deployment, Discovery};

/// The ModelDeployment resource, known by name only: the router reads
/// `metadata.name` and `spec.servedModelName` and does not depend on the
/// operator's types.
fn model_deployment_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("shardserve.io", "v1alpha1", "ModelDeployment"),
        "modeldeployments",
    )
}

/// Follows ModelDeployments and their rank-0 Services' EndpointSlices in one
/// namespace or all of them. Dropping it stops the watchers.
pub struct KubernetesDiscovery {
    rx: watch::Receiver<Vec<Deployment>>,
    synced: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl KubernetesDiscovery {
    /// Connects with the pod's service account (or `KUBECONFIG` outside a
    /// cluster) and starts watching. Call it within a Tokio runtime.
    pub async fn connect(namespace: Option<&str>) -> Result<Self, RouterError> {
        let client = kube::Client::try_default()
            .await
            .map_err(RouterError::Kubernetes)?;
        Ok(Self::start(client, namespace))
    }

    /// Starts watching through `client`: `namespace` only, or every
    /// namespace. Call it within a Tokio runtime.
    pub fn start(client: kube::Client, namespace: Option<&str>) -> Self {
        let resource = model_deployment_resource();
        let (model_deployments, slices) = match namespace {
            Some(ns) => (
                Api::namespaced_with(client.clone(), ns, &resource),
                Api::namespaced(client, ns),
            ),
            None => (Api::all_with(client.clone(), &resource), Api::all(client)),
        };
        tracing::info!(
            namespace = namespace.unwrap_or("(all)"),
            "watching ModelDeployments and EndpointSlices"
        );
        let (tx, rx) = watch::channel(Vec::new());
        let synced = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(
            model_deployments,
            resource,
            slices,
            tx,
            Arc::clone(&synced),
        ));
        Self { rx, synced, task }
    }
}

impl Drop for KubernetesDiscovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discovery for KubernetesDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<Deployment>> {
        self.rx.clone()
    }

    fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

/// Which watcher an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    ModelDeployments,
    EndpointSlices,
}

impl Source {
    fn resource(self) -> &'static str {
        match self {
            Source::ModelDeployments => "modeldeployments.shardserve.io",
            Source::EndpointSlices => "endpointslices.discovery.k8s.io",
        }
    }
}

/// A watcher event, as far as the loop cares (the store has the objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Part of a (re)list, which the store applies all at once at its end.
    Listing,
    /// A (re)list is complete.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
}

impl Step {
    fn of<K>(event: watcher::Event<K>) -> Self {
        match event {
            watcher::Event::Init | watcher::Event::InitApply(_) => Step::Listing,
            watcher::Event::InitDone => Step::Listed,
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => Step::Changed,
        }
    }
}

/// What a user can do about a failed watch, when the status says.
fn hint(error: &watcher::Error) -> &'static str {
    let code = match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        },
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => None,
    };
    match code {
        Some(401 | 403) => {
            "the router's ServiceAccount needs get, list and watch on it (the chart's router RBAC)"
        }
        Some(404) => "the API server does not serve it: is the ModelDeployment CRD installed?",
        _ => "retrying",
    }
}

async fn run(
    model_deployments: Api<DynamicObject>,
    resource: ApiResource,
    slices: Api<EndpointSlice>,
    tx: watch::Sender<Vec<Deployment>>,
    synced: Arc<AtomicBool>,
) {
    let md_writer = Writer::new(resource);
    let md_store = md_writer.as_reader();
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    // Managed fields are the bulk of an object and never read here.
    let md_events = watcher(model_deployments, watcher::Config::default())
        .modify(|o| o.managed_fields_mut().clear())
        .default_backoff()
        .reflect(md_writer)
        .map(|e| (Source::ModelDeployments, e.map(Step::of)));
    let slice_events = watcher(
        slices,
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .modify(|o| o.managed_fields_mut().clear())
    .default_backoff()
    .reflect(slice_writer)
    .map(|e| (Source::EndpointSlices, e.map(Step::of)));
    let mut events = std::pin::pin!(futures::stream::select(md_events, slice_events));

    let mut listed = BTreeSet::new();
    let mut warned: Vec<String> = Vec::new();
    while let Some((source, event)) = events.next().await {
        match event {
            Ok(Step::Listed) => {
                tracing::debug!(resource = source.resource(), "listed");
                listed.insert(source.resource());
            }
            Ok(Step::Listing) => continue,
            Ok(Step::Changed) => {}
            Err(error) => {
                tracing::warn!(
                    resource = source.resource(),
                    %error,
                    "Kubernetes discovery: watch failed; {}",
                    hint(&error)
                );
                continue;
            }
        }
        // Half a picture (ModelDeployments without their slices) would
        // publish every model without backends.
        if listed.len() < 2 {
            continue;
        }
        let (mds, slices) = (md_store.state(), slice_store.state());
        let translation = translate(
            mds.iter().map(|m| m.as_ref()),
            slices.iter().map(|s| s.as_ref()),
        );
        for warning in &translation.warnings {
            if !warned.contains(warning) {
                tracing::warn!("Kubernetes discovery: {warning}");
            }
        }
        warned = translation.warnings;
        publish(&tx, translation.deployments);
        if !synced.swap(true, Ordering::AcqRel) {
            tracing::info!(
                models = tx.borrow().len(),
                "Kubernetes discovery: listed every ModelDeployment and EndpointSlice"
            );
        }
    }
}

/// Sends `next` when it differs from what receivers have, logging models
/// that appear and disappear (the pool logs backends).
fn publish(tx: &watch::Sender<Vec<Deployment>>, next: Vec<Deployment>) {
    tx.send_if_modified(|current| {
        if *current == next {
            return false;
        }
        let names = |list: &[Deployment]| -> BTreeSet<String> {
            list.iter().map(|d| d.model.clone()).collect()
        };
        let (before, after) = (names(current), names(&next));
        for model in after.difference(&before) {
            tracing::info!(model, "Kubernetes discovery: model found");
        }
        for model in before.difference(&after) {
            tracing::info!(model, "Kubernetes discovery: model gone");
        }
        *current = next;
        true
    });
}
