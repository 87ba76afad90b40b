//! LoRA adapters of a deployment's serving groups: each reconcile brings every
//! serving group's adapters to `spec.loraAdapters` through the group's Adapters
//! API (`crate::adapters::sync`), so that changing the list never rolls a group
//! and a group that starts or restarts gets the current list. Names dropped from
//! the list since the operator last loaded it are unloaded; adapters loaded at
//! run time through the router are left alone.

use std::time::Duration;

use futures::future::join_all;
use tonic::transport::Endpoint;

use super::observe::Observed;
use crate::adapters::{Outcome, Wanted, sync};
use crate::controller::desired::model::MODEL_DIR;
use crate::crd::ModelDeployment;
use crate::crd::source::ModelSource;

/// How long one group may take to answer and load its adapters (a download from
/// the Hub included) before this reconcile moves on; the next one tries again.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// An adapter a group could not load, or could not be asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFailure {
    pub group: String,
    pub adapter: String,
    pub message: String,
}

/// The source as a rank container takes it: `pvc://` on the claim the pods mount
/// becomes a path under it; other forms pass as they are (the worker fetches
/// `hf://` and `pip://` into its cache, `file://` is in the image).
pub fn source_in_pod(md: &ModelDeployment, source: &str) -> Result<String, String> {
    let parsed = ModelSource::parse(source).map_err(|e| e.to_string())?;
    let ModelSource::Pvc { claim, path } = parsed else {
        return Ok(source.to_string());
    };
    let model_claim = match ModelSource::parse(&md.spec.model.source) {
        Ok(ModelSource::Pvc { claim, .. }) => Some(claim),
        _ => md
            .spec
            .model
            .cache
            .as_ref()
            .and_then(|c| c.claim_name.clone()),
    };
    if model_claim.as_deref() == Some(claim.as_str()) {
        Ok(format!("{MODEL_DIR}/{path}"))
    } else {
        Err(format!(
            "{source}: the rank pods mount only the model's claim ({}); put the adapter there, \
             or use an hf://, pip:// or file:// source",
            model_claim.unwrap_or_else(|| "none".into())
        ))
    }
}

/// Brings each serving group's adapters to the spec; fills in each asked
/// group's [`super::observe::GroupObserved::adapters`] and returns what failed.
pub async fn sync_groups(
    md: &ModelDeployment,
    observed: &mut Observed,
    pods_per_group: u32,
    port: u16,
    group_name: impl Fn(super::labels::GroupId) -> String,
) -> Vec<AdapterFailure> {
    let spec = &md.spec.lora_adapters;
    let applied: &[String] = md
        .status
        .as_ref()
        .map_or(&[], |s| s.lora_adapters.as_slice());
    let retired: Vec<String> = applied
        .iter()
        .filter(|name| !spec.iter().any(|a| &a.name == *name))
        .cloned()
        .collect();
    if spec.is_empty() && retired.is_empty() {
        return Vec::new();
    }
    let mut failures = Vec::new();
    let mut wanted: Vec<Wanted> = Vec::new();
    for adapter in spec {
        match source_in_pod(md, &adapter.source) {
            Ok(source) => wanted.push((adapter.name.clone(), source)),
            Err(message) => failures.push(AdapterFailure {
                group: String::new(),
                adapter: adapter.name.clone(),
                message,
            }),
        }
    }
    if md.spec.tls.is_some() {
        // Its Inference and Adapters APIs then answer only the routers' client
        // certificate, which the operator does not hold.
        failures.push(AdapterFailure {
            group: String::new(),
            adapter: String::new(),
            message: "spec.tls is set: the workers' API takes only the routers' client \
                      certificate, so the operator cannot load adapters into them yet; load \
                      them through the router's /v1/load_lora_adapter"
                .into(),
        });
        return failures;
    }
    let groups = observed
        .groups
        .iter_mut()
        .filter(|(_, g)| g.draining_since.is_none() && g.is_ready(pods_per_group));
    let calls = groups.filter_map(|(id, group)| {
        let ip = group
            .live_pods()
            .find(|p| p.index == Some(0))
            .and_then(|p| p.ip.clone())?;
        let name = group_name(*id);
        let (wanted, retired) = (&wanted, &retired);
        Some(async move {
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip
            };
            let result = tokio::time::timeout(SYNC_TIMEOUT, async {
                let channel = Endpoint::from_shared(format!("http://{host}:{port}"))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(Duration::from_secs(2))
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                sync(channel, wanted, retired)
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {SYNC_TIMEOUT:?}")));
            (group, name, result)
        })
    });
    for (group, name, result) in join_all(calls).await {
        match result {
            Ok(outcomes) => {
                let mut served = Vec::new();
                for (adapter, outcome) in outcomes {
                    match outcome {
                        Outcome::Kept | Outcome::Loaded => served.push(adapter),
                        Outcome::Unloaded => {}
                        Outcome::Failed(message) => failures.push(AdapterFailure {
                            group: name.clone(),
                            adapter,
                            message,
                        }),
                    }
                }
                group.adapters = Some(served);
            }
            Err(message) => failures.push(AdapterFailure {
                group: name,
                adapter: String::new(),
                message: format!("cannot reach its leader to load adapters: {message}"),
            }),
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;

    fn md(source: &str) -> ModelDeployment {
        ModelDeployment::new("m", ModelDeploymentSpec::from_source(source))
    }

    #[test]
    fn pvc_adapters_live_on_the_claim_the_pods_mount() {
        let on_claim = md("pvc://weights/llama/70b");
        assert_eq!(
            source_in_pod(&on_claim, "pvc://weights/adapters/sql").unwrap(),
            "/models/adapters/sql"
        );
        let err = source_in_pod(&on_claim, "pvc://other/sql").unwrap_err();
        assert!(err.contains("only the model's claim (weights)"), "{err}");
        for passed in ["hf://org/sql-lora", "pip://p==1/a", "file:///adapters/sql"] {
            assert_eq!(source_in_pod(&on_claim, passed).unwrap(), passed);
        }
        // A fetched model with a cache claim: the claim is the model volume.
        let mut cached = md("hf://org/model");
        cached.spec.model.cache =
            serde_json::from_value(serde_json::json!({"claimName": "cache"})).unwrap();
        assert_eq!(
            source_in_pod(&cached, "pvc://cache/a").unwrap(),
            "/models/a"
        );
    }
}
