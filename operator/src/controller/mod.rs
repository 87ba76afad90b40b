//! The ModelDeployment controller: per deployment `<md>` and replica group
//! `g`, a StatefulSet `<md>-g<g>` whose pods are the ranks of one
//! tensor-parallel group, a headless Service `<md>-g<g>` (the ranks' DNS
//! names), and one Service `<md>` selecting the rank-0 pods of every group
//! (what the router finds).
//!
//! The pipeline is pure up to the last step: [`check`] (validation and
//! planning) → [`observe`] (what exists) → [`members`] (which groups make up
//! `replicas`) → [`desired`] (the objects) → [`decide`] (create, drain, remove,
//! restart, roll) → [`status`]; [`reconcile`]
//! carries the result out against the API server. [`labels`] holds the
//! names the router relies on.

pub mod adapters;
pub mod check;
pub mod decide;
pub mod desired;
pub mod labels;
pub mod members;
mod metrics;
pub mod observe;
pub mod progress;
mod reconcile;
pub mod status;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_damaged;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::runtime::{Controller, controller};
use kube::{Api, Client, ResourceExt};

use crate::crd::ModelDeployment;

pub use metrics::{Metrics, ReconcileResult};
pub use reconcile::{Context, Error, backoff, error_policy, reconcile};

/// Runs the controller until a shutdown signal (SIGTERM, Ctrl-C), watching
/// ModelDeployments, the StatefulSets and Services they own, and their pods,
/// in `namespace` or in every namespace.
pub async fn run_controller(client: Client, namespace: Option<&str>, ctx: Arc<Context>) {
    let ours = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY_LABEL,
        labels::MANAGED_BY
    ));
    let ranks = watcher::Config::default().labels(labels::MODEL_DEPLOYMENT_LABEL);
    let deployments: Api<ModelDeployment> = scoped(&client, namespace);
    let statefulsets: Api<StatefulSet> = scoped(&client, namespace);
    let services: Api<Service> = scoped(&client, namespace);
    let pods: Api<Pod> = scoped(&client, namespace);
    Controller::new(deployments, watcher::Config::default())
        .owns(statefulsets, ours.clone())
        .owns(services, ours)
        .watches(pods, ranks, |pod| {
            let md = pod.labels().get(labels::MODEL_DEPLOYMENT_LABEL).cloned();
            let namespace = pod.namespace();
            md.map(|name| ObjectRef::new(&name).within(namespace.as_deref().unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                // error_policy has logged it; a vanished object needs nothing.
                Err(
                    e @ (controller::Error::ReconcilerFailed(..)
                    | controller::Error::ObjectNotFound(_)),
                ) => tracing::debug!("{e}"),
                // Watches failing (RBAC, the API server): kube retries them.
                Err(e) => tracing::warn!("{e}"),
            }
        })
        .await;
}

/// The API of `K` in `namespace`, or in every namespace.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}
