//! The `ModelDeployment` custom resource and its operator: the types, model
//! sources, validation and manifest reading (`crd`), topology and memory
//! planning (`plan`), and the controller that turns a deployment into
//! groups of rank pods on a cluster (`controller`, run by
//! `shardserve operator`). `shardserve up` runs the same manifests locally.

pub mod adapters;
pub mod autoscale;
pub mod controller;
pub mod crd;
pub mod flows;
mod health;
pub mod leader;
pub mod load;
#[cfg(test)]
mod mock_api;
pub mod plan;
mod run;

pub use controller::labels;
pub use crd::crd_yaml;
pub use crd::manifest::{ManifestError, parse_manifests};
pub use crd::source::{ModelSource, SourceError};
pub use crd::validate::{ValidationError, validate};
pub use crd::{
    EngineSpec, ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus, ModelShape, ModelSpec,
};
pub use run::{OperatorSettings, RunError, run};
