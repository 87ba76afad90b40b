//! The `ModelDeployment` custom resource (`shardserve.io/v1alpha1`): what a
//! user writes to serve one model. `shardserve up` reads the same manifest
//! locally; the operator reconciles it on a cluster.
//!
//! The types carry the schema (their doc comments become `kubectl explain`);
//! [`source`] parses the model source, [`validate`] checks what the schema
//! cannot say, and [`manifest`] reads YAML files into checked resources.

pub mod manifest;
pub mod source;
pub mod validate;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every shardserve resource.
pub const GROUP: &str = "shardserve.io";
/// The version of `ModelDeployment` these types describe.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in a manifest.
pub const API_VERSION: &str = "shardserve.io/v1alpha1";
/// `kind` as written in a manifest.
pub const KIND: &str = "ModelDeployment";

/// A language model served by groups of worker ranks behind the router.
///
/// One group holds one copy of the model, split over `tensor` ranks; the
/// deployment runs `replicas` groups and the router spreads requests over them.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shardserve.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelDeploymentSpec {
    /// The model to serve: where its weights come from.
    pub model: ModelSpec,

    /// The name clients ask for in requests (`"model"` in the OpenAI API).
    /// Defaults to the resource's `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,

    /// Tensor parallel size: how many ranks (GPUs) one copy of the model is
    /// split across. Attention heads must divide evenly among them.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub tensor: u32,

    /// How many independent copies (groups of `tensor` ranks) serve the model.
    #[serde(default = "one")]
    pub replicas: u32,

    /// Limits of the inference engine in every rank.
    #[serde(default, skip_serializing_if = "EngineSpec::is_default")]
    pub engine: EngineSpec,
}

/// Where the weights come from, and how they are stored.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// The model's location, one of: `hf://org/name[@revision][/file]` (a
    /// Hugging Face Hub repository, optionally one file in it);
    /// `file:///abs/path` or `file://relative/path` (relative to the
    /// manifest's directory, local runs only); `pvc://claim/path` (a path in
    /// a PersistentVolumeClaim of the same namespace);
    /// `pip://package==version/path/in/wheel` (a file shipped inside a PyPI
    /// wheel, pinned to one version).
    pub source: String,
}

/// Engine limits. Unset fields take the engine's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineSpec {
    /// Longest sequence, prompt plus generated tokens. Defaults to the
    /// model's trained context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_seq_len: Option<u32>,

    /// Most sequences one group generates at the same time; further requests
    /// wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_num_seqs: Option<u32>,
}

impl EngineSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn one() -> u32 {
    1
}

impl ModelDeployment {
    /// The resource's name (empty when the manifest has none; validation
    /// refuses that).
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The name clients use: `spec.servedModelName`, else `metadata.name`.
    pub fn served_model_name(&self) -> &str {
        self.spec
            .served_model_name
            .as_deref()
            .unwrap_or_else(|| self.name())
    }
}
