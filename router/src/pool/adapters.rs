//! LoRA adapters as the router sees them: learned from each backend's
//! ModelInfo (refreshed by every health check and after each load or unload),
//! asked for by their own name (vLLM's convention) or beside the model (TGI's
//! `adapter_id`, gRPC's `adapter`).

use std::collections::BTreeMap;

use shardserve_proto::v1::{LoraAdapter, ModelInfoResponse};

use super::{BackendState, State};

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
    /// Backends that serve it.
    pub backends: usize,
}

/// The backend's entry for `adapter`, when it serves it.
pub(super) fn serves<'a>(b: &'a BackendState, adapter: &str) -> Option<&'a LoraAdapter> {
    b.info.as_ref()?.adapters.iter().find(|a| a.name == adapter)
}

/// The model one of whose backends serves `adapter` (the first by name, should
/// two models have adapters of one name).
pub(super) fn model_serving(state: &State, adapter: &str) -> Option<String> {
    state
        .deployments
        .iter()
        .find(|(_, d)| d.backends.iter().any(|b| serves(b, adapter).is_some()))
        .map(|(model, _)| model.clone())
}

/// The adapters the backends report, by name.
pub(super) fn summary<'a>(
    infos: impl Iterator<Item = &'a ModelInfoResponse>,
) -> Vec<AdapterSummary> {
    let mut by_name: BTreeMap<&str, AdapterSummary> = BTreeMap::new();
    for info in infos {
        for a in &info.adapters {
            by_name
                .entry(a.name.as_str())
                .or_insert_with(|| AdapterSummary {
                    name: a.name.clone(),
                    source: if a.source.is_empty() {
                        a.path.clone()
                    } else {
                        a.source.clone()
                    },
                    backends: 0,
                })
                .backends += 1;
        }
    }
    by_name.into_values().collect()
}
