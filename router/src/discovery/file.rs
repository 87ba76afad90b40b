//! Backends from a JSON file that another process rewrites: `shardserve up`
//! starts, restarts and stops workers and writes the list each time (to a new
//! file renamed over the old, so a reader never sees half of it). The router
//! reads it again whenever its modification time or size changes; a file that
//! does not parse is logged and the last good list kept.
//!
//! ```json
//! {"models": {"smollm2": ["http://127.0.0.1:50061"], "scaled-to-zero": []}}
//! ```
//!
//! A model with an empty list is known (listed, its requests held) with no
//! backend ready.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Backend, Deployment, Discovery};

/// How often the file's metadata is looked at.
const POLL: Duration = Duration::from_millis(200);

/// The file's content.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendsFile {
    /// Served model name → gRPC URLs of its ready group leaders.
    pub models: BTreeMap<String, Vec<String>>,
    /// Served model name → the LoRA adapters its manifest declares.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adapters: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileDiscoveryError {
    #[error("cannot read the backends file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the backends file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl BackendsFile {
    /// The deployments it lists; a URL that is not `http(s)://` is an error.
    pub fn deployments(&self) -> Result<Vec<Deployment>, String> {
        self.models
            .iter()
            .map(|(model, urls)| {
                if model.is_empty() {
                    return Err("a model name is empty".to_string());
                }
                let backends = urls
                    .iter()
                    .map(|url| Backend::from_url(url).map_err(|e| format!("model {model}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Deployment {
                    model: model.clone(),
                    backends,
                    adapters: self.adapters.get(model).cloned().unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Writes it to `path` whole: a temporary file beside it, renamed over it.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".new");
        std::fs::write(&temporary, json)?;
        std::fs::rename(&temporary, path)
    }
}

/// The deployments of a backends file, followed as it changes.
pub struct FileDiscovery {
    tx: watch::Sender<Vec<Deployment>>,
}

impl FileDiscovery {
    /// Reads `path` (it must exist and parse now) and follows it from then on;
    /// call within a Tokio runtime.
    pub fn open(path: &Path) -> Result<Self, FileDiscoveryError> {
        let (deployments, mut seen) = read(path)?;
        let (tx, _) = watch::channel(deployments);
        let sender = tx.clone();
        let path = path.to_path_buf();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                if sender.sender_count() == 1 {
                    // The discovery was dropped: nobody follows the file any more.
                    return;
                }
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                match read(&path) {
                    Ok((deployments, stamp)) => {
                        seen = stamp;
                        sender.send_if_modified(|current| {
                            let changed = *current != deployments;
                            *current = deployments;
                            changed
                        });
                    }
                    Err(e) => {
                        seen = now;
                        tracing::warn!("{e}; keeping the last list");
                    }
                }
            }
        });
        Ok(Self { tx })
    }
}

impl Discovery for FileDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<Deployment>> {
        self.tx.subscribe()
    }
}

/// What tells a rewrite: modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<(Vec<Deployment>, Stamp), FileDiscoveryError> {
    let stamp = stamp(path);
    let text = std::fs::read(path).map_err(|source| FileDiscoveryError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| FileDiscoveryError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let file: BackendsFile = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    Ok((file.deployments().map_err(invalid)?, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(models: &[(&str, &[&str])]) -> BackendsFile {
        BackendsFile {
            models: models
                .iter()
                .map(|(m, urls)| (m.to_string(), urls.iter().map(|u| u.to_string()).collect()))
                .collect(),
            adapters: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn the_list_follows_the_file_and_a_bad_rewrite_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backends.json");
        file(&[("m", &["http://127.0.0.1:1"])])
            .write(&path)
            .unwrap();
        let discovery = FileDiscovery::open(&path).unwrap();
        let mut rx = discovery.watch();
        assert_eq!(rx.borrow()[0].backends[0].id, "127.0.0.1:1");

        file(&[
            ("m", &["http://127.0.0.1:1", "http://127.0.0.1:2"]),
            ("zero", &[]),
        ])
        .write(&path)
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let now = rx.borrow_and_update().clone();
        assert_eq!(now.len(), 2);
        assert_eq!(now[0].backends.len(), 2);
        assert_eq!((now[1].model.as_str(), now[1].backends.len()), ("zero", 0));

        std::fs::write(&path, "{\"models\": {\"m\": [\"ftp://x\"]}}").unwrap();
        tokio::time::sleep(POLL * 3).await;
        assert!(!rx.has_changed().unwrap(), "a bad file changes nothing");
        assert_eq!(rx.borrow().len(), 2);
    }

    #[test]
    fn a_missing_or_bad_file_is_refused_at_the_start_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.json");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let e = FileDiscovery::open(&path).err().unwrap();
        assert!(e.to_string().contains("absent.json"), "{e}");
        std::fs::write(&path, "{\"models\": {\"m\": [\"127.0.0.1:1\"]}}").unwrap();
        let e = FileDiscovery::open(&path).err().unwrap().to_string();
        assert!(e.contains("must start with http:// or https://"), "{e}");
    }
}
