//! The `ModelDeployment` custom resource: its types, model sources, validation
//! and manifest reading (`crd`). Planning and reconcile come with the operator
//! issue; `shardserve up` already runs manifests locally with these types.

pub mod crd;
pub mod plan;

pub use crd::crd_yaml;
pub use crd::manifest::{ManifestError, parse_manifests};
pub use crd::source::{ModelSource, SourceError};
pub use crd::validate::{ValidationError, validate};
pub use crd::{
    EngineSpec, ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus, ModelShape, ModelSpec,
};
