//! LoRA adapters as the router sees them: learned from each backend's
//! ModelInfo (refreshed by every health check and after each load or unload),
//! asked for by their own name (vLLM's convention) or beside the model (TGI's
//! `adapter_id`, gRPC's `adapter`).

use std::collections::BTreeMap;

use shardserve_proto::v1::LoraAdapter;

use super::{BackendState, DeploymentState, State};

/// What a request runs on: a served model, and the adapter it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The deployment's served model name (the adapter's base).
    pub model: String,
    pub adapter: Option<String>,
}

impl Target {
    /// The name the client asked for: the adapter's when there is one.
    pub(crate) fn name(&self) -> &str {
        self.adapter.as_deref().unwrap_or(&self.model)
    }
}

/// One adapter of a model, for `/v1/models` and `/api/tags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdapterSummary {
    pub name: String,
    /// Where it was loaded from, as given.
    pub source: String,
}

/// The backend's entry for `adapter`, when it serves it.
pub(super) fn serves<'a>(b: &'a BackendState, adapter: &str) -> Option<&'a LoraAdapter> {
    b.info.as_ref()?.adapters.iter().find(|a| a.name == adapter)
}

/// The model one of whose backends serves `adapter`, or whose manifest declares
/// it (the first by name, should two models have adapters of one name).
pub(super) fn model_serving(state: &State, adapter: &str) -> Option<String> {
    state
        .deployments
        .iter()
        .find(|(_, d)| has(d, adapter))
        .map(|(model, _)| model.clone())
}

/// Whether a backend of `d` serves `adapter`, or its manifest declares it while
/// no backend has said what it serves (scaled to zero, starting). Once one has,
/// its word counts: an adapter unloaded at run time is unknown again.
pub(super) fn has(d: &DeploymentState, adapter: &str) -> bool {
    d.backends.iter().any(|b| serves(b, adapter).is_some())
        || (awaited(d) && d.declared.iter().any(|n| n == adapter))
}

/// No backend of `d` has reported its adapters yet: the declared ones are awaited.
pub(super) fn awaited(d: &DeploymentState) -> bool {
    d.backends.iter().all(|b| b.info.is_none())
}

/// The adapters the backends report, by name, or the manifest's while none has
/// reported.
pub(super) fn summary(d: &DeploymentState) -> Vec<AdapterSummary> {
    if awaited(d) {
        return d
            .declared
            .iter()
            .map(|name| AdapterSummary {
                name: name.clone(),
                source: String::new(),
            })
            .collect();
    }
    let mut by_name: BTreeMap<&str, AdapterSummary> = BTreeMap::new();
    let reported = d.backends.iter().filter_map(|b| b.info.as_ref());
    for a in reported.flat_map(|info| &info.adapters) {
        by_name.entry(&a.name).or_insert_with(|| AdapterSummary {
            name: a.name.clone(),
            source: if a.source.is_empty() {
                a.path.clone()
            } else {
                a.source.clone()
            },
        });
    }
    by_name.into_values().collect()
}
