//! Downloads from the Hugging Face Hub, or a mirror speaking its HTTP API
//! (`HF_ENDPOINT`), into shardserve's cache layout: `hf://org/name/FILE`
//! becomes one file, `hf://org/name` a model directory the engine loads
//! (`config.json`, tokenizer files, safetensors weights). `model::resolve`
//! calls [`fetch`] with the paths it chose.
//!
//! Two documented endpoints only: `GET /api/models/{repo}/revision/{rev}`
//! (the file listing and commit) and `GET /{repo}/resolve/{rev}/{file}`
//! (a file, usually a redirect to a CDN). Every file is streamed to
//! `NAME.partial` next to its place and renamed when complete, so an
//! interrupted download never leaves a truncated model file.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::blocking::{Client, Response};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shardserve_worker::progress::Tally;

/// The public Hub, when `HF_ENDPOINT` names no mirror.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision of a source that names none.
pub const DEFAULT_REVISION: &str = "main";

/// Written into a model directory once every file is in place; a later
/// fetch that finds it (and the files it lists) needs no network.
const COMPLETE_MARKER: &str = ".shardserve-complete.json";
const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const INDEX: &str = "model.safetensors.index.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
/// Small files taken along when the repository has them.
const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json", INDEX];

/// A read that waits longer than this for the next bytes fails, rather than
/// hanging an init container forever; there is no limit on a whole file.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the Hub is and who asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSettings {
    /// Base URL, e.g. `https://huggingface.co` or a mirror.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` to the endpoint (not to the CDN it
    /// redirects to).
    pub token: Option<String>,
}

/// What to fetch: one file of a repository, or its model directory.
#[derive(Clone, Copy, Debug)]
pub struct HubModel<'a> {
    /// `org/name`.
    pub repo: &'a str,
    pub revision: &'a str,
    pub file: Option<&'a str>,
}

/// Why a Hub model could not be fetched; every message names the URL or the
/// repository and what to do.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{endpoint:?} is not a usable Hub URL (HF_ENDPOINT): {problem}")]
    Endpoint { endpoint: String, problem: String },
    #[error("cannot build the HTTP client: {cause}")]
    Client { cause: String },
    #[error(
        "cannot reach {url}: {cause}; check that this machine reaches the Hub, or set HF_ENDPOINT to a mirror"
    )]
    Unreachable { url: String, cause: String },
    #[error(
        "{url}: HTTP {status}{detail}: the repository is private or gated, or does not exist; {hint}"
    )]
    Denied {
        url: String,
        status: StatusCode,
        detail: String,
        hint: &'static str,
    },
    #[error("{url}: HTTP 404{detail}: no such {what}")]
    NotFound {
        url: String,
        detail: String,
        what: String,
    },
    #[error("{url}: HTTP {status}{detail}")]
    Status {
        url: String,
        status: StatusCode,
        detail: String,
    },
    #[error("{url}: the answer is not the Hub's file listing: {problem}")]
    BadListing { url: String, problem: String },
    #[error("hf://{repo}@{revision} is not a Hugging Face model directory: {problem}")]
    NotAModel {
        repo: String,
        revision: String,
        problem: String,
    },
    #[error("the download of {url} broke off after {got} of {expected} bytes: {cause}")]
    Interrupted {
        url: String,
        got: u64,
        expected: String,
        cause: String,
    },
    #[error("{url}: {problem}; the download was discarded")]
    Corrupt { url: String, problem: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Makes sure `model` is at `dest` (the file, or the model directory) and
/// returns `dest`. What is complete there already is not fetched again; a
/// file in place, or a directory with its completion marker, needs no
/// network at all.
///
/// Counts the bytes to fetch and fetched in `tally` (files already in place count
/// as fetched).
pub fn fetch(
    settings: &HubSettings,
    model: &HubModel<'_>,
    dest: &Path,
    tally: Arc<Tally>,
) -> Result<PathBuf, HubError> {
    match model.file {
        Some(file) => {
            if !dest.is_file() {
                let hub = Hub::new(settings, tally)?;
                let url = hub.url(&resolve_segments(model.repo, model.revision, file))?;
                eprintln!("downloading {url}");
                hub.download(&url, dest, &Expected::default(), file)?;
            }
            Ok(dest.to_path_buf())
        }
        None => {
            if !marker_holds(dest) {
                Hub::new(settings, tally)?.fetch_directory(model, dest)?;
            }
            Ok(dest.to_path_buf())
        }
    }
}

/// The HTTP side: one client, the endpoint, the token.
struct Hub {
    endpoint: Url,
    token: Option<String>,
    client: Client,
    tally: Arc<Tally>,
}

/// What the listing says a file should be; checked after download.
#[derive(Default)]
struct Expected {
    size: Option<u64>,
    sha256: Option<String>,
}

impl Hub {
    fn new(settings: &HubSettings, tally: Arc<Tally>) -> Result<Self, HubError> {
        let bad = |problem: String| HubError::Endpoint {
            endpoint: settings.endpoint.clone(),
            problem,
        };
        let endpoint = Url::parse(&settings.endpoint).map_err(|e| bad(e.to_string()))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.cannot_be_a_base() {
            return Err(bad("expected an http:// or https:// URL".into()));
        }
        let client = Client::builder()
            .user_agent(concat!("shardserve/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            // The blocking client applies this to the headers and to each
            // read, not to a whole body.
            .timeout(STALL_TIMEOUT)
            .build()
            .map_err(|e| HubError::Client { cause: chain(&e) })?;
        Ok(Self {
            endpoint,
            token: settings.token.clone().filter(|t| !t.is_empty()),
            client,
            tally,
        })
    }

    /// The endpoint (which may have a path of its own) plus `segments`,
    /// each percent-encoded.
    fn url(&self, segments: &[&str]) -> Result<Url, HubError> {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| HubError::Endpoint {
                endpoint: self.endpoint.to_string(),
                problem: "it cannot take a path".into(),
            })?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn get(&self, url: &Url, what: impl FnOnce() -> String) -> Result<Response, HubError> {
        let mut request = self.client.get(url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().map_err(|e| HubError::Unreachable {
            url: url.to_string(),
            // reqwest's own line repeats the URL; the reason is in its sources.
            cause: e.source().map_or_else(|| e.to_string(), chain),
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(status_error(url, &response, self.token.is_some(), what))
    }

    fn fetch_directory(&self, model: &HubModel<'_>, dir: &Path) -> Result<(), HubError> {
        let mut segments = vec!["api", "models"];
        segments.extend(model.repo.split('/'));
        segments.extend(["revision", model.revision]);
        let mut url = self.url(&segments)?;
        // `blobs` adds each file's size and LFS sha256 to the listing.
        url.set_query(Some("blobs=true"));
        let listing: Listing = self
            .get(&url, || {
                format!("repository {} or revision {}", model.repo, model.revision)
            })?
            .json()
            .map_err(|e| HubError::BadListing {
                url: url.to_string(),
                problem: chain(&e),
            })?;
        let not_a_model = |problem: String| HubError::NotAModel {
            repo: model.repo.to_string(),
            revision: model.revision.to_string(),
            problem,
        };
        let small = small_files(&listing).map_err(not_a_model)?;
        // Files come from the listed commit, so a branch moving meanwhile
        // cannot mix two versions.
        let commit = listing.sha.as_deref().unwrap_or(model.revision);
        let mut done = BTreeMap::new();
        self.fetch_files(model.repo, commit, &small, dir, &mut done)?;
        let index = read_index(&dir.join(INDEX))?;
        let weights = weight_files(&listing, index.as_ref()).map_err(not_a_model)?;
        self.fetch_files(model.repo, commit, &weights, dir, &mut done)?;
        let marker = Marker {
            source: format!("hf://{}@{}", model.repo, model.revision),
            commit: listing.sha.clone(),
            files: done,
        };
        let path = dir.join(COMPLETE_MARKER);
        let text = serde_json::to_string_pretty(&marker).unwrap_or_default();
        std::fs::write(&path, text).map_err(|source| HubError::Io { path, source })?;
        eprintln!("model ready: {}", dir.display());
        Ok(())
    }

    /// Fetches what of `files` is not complete in `dir` yet; records each
    /// file's size in `done`.
    fn fetch_files(
        &self,
        repo: &str,
        commit: &str,
        files: &[&Sibling],
        dir: &Path,
        done: &mut BTreeMap<String, u64>,
    ) -> Result<(), HubError> {
        for sibling in files {
            self.tally.add_total(sibling.expected().size.unwrap_or(0));
        }
        for sibling in files {
            let name = sibling.rfilename.as_str();
            let dest = dir.join(name);
            let expected = sibling.expected();
            let size = match file_size(&dest) {
                Some(size) if expected.size.is_none_or(|s| s == size) => {
                    self.tally.add_done(size);
                    size
                }
                _ => {
                    let url = self.url(&resolve_segments(repo, commit, name))?;
                    eprintln!("downloading {url}");
                    self.download(&url, &dest, &expected, name)?
                }
            };
            done.insert(name.to_string(), size);
        }
        Ok(())
    }

    /// Streams `url` to `dest` through `dest.partial`; returns its size.
    fn download(
        &self,
        url: &Url,
        dest: &Path,
        expected: &Expected,
        name: &str,
    ) -> Result<u64, HubError> {
        let mut response = self.get(url, || format!("file {name} (or repository or revision)"))?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|source| HubError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let partial = partial_path(dest);
        let written = stream_to(&mut response, url, &partial, expected, name, &self.tally);
        let size = match written {
            Ok(size) => size,
            Err(e) => {
                std::fs::remove_file(&partial).ok();
                return Err(e);
            }
        };
        std::fs::rename(&partial, dest).map_err(|source| HubError::Io {
            path: dest.to_path_buf(),
            source,
        })?;
        Ok(size)
    }
}

/// Copies the body to `partial`, checking length and (when known) sha256.
fn stream_to(
    response: &mut Response,
    url: &Url,
    partial: &Path,
    expected: &Expected,
    name: &str,
    tally: &Tally,
) -> Result<u64, HubError> {
    let io_error = |source| HubError::Io {
        path: partial.to_path_buf(),
        source,
    };
    let length = response.content_length().or(expected.size);
    if expected.size.is_none() {
        // Not counted from a listing beforehand.
        tally.add_total(length.unwrap_or(0));
    }
    let bar = progress(length, name);
    let mut file = File::create(partial).map_err(io_error)?;
    let mut hasher = expected.sha256.as_ref().map(|_| Sha256::new());
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = match response.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(HubError::Interrupted {
                    url: url.to_string(),
                    got,
                    expected: length.map_or("?".into(), |l| l.to_string()),
                    cause: chain(&e),
                });
            }
        };
        file.write_all(&buf[..n]).map_err(io_error)?;
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        got += n as u64;
        bar.inc(n as u64);
        tally.add_done(n as u64);
    }
    bar.finish_and_clear();
    let corrupt = |problem: String| HubError::Corrupt {
        url: url.to_string(),
        problem,
    };
    if let Some(length) = length
        && got != length
    {
        return Err(corrupt(format!("received {got} bytes, expected {length}")));
    }
    if let (Some(h), Some(want)) = (hasher, &expected.sha256) {
        let sha = super::hex(&h.finalize());
        if !sha.eq_ignore_ascii_case(want) {
            return Err(corrupt(format!("sha256 {sha}, the Hub lists {want}")));
        }
    }
    // On disk before the rename makes it the model file.
    file.sync_all().map_err(io_error)?;
    Ok(got)
}

fn progress(length: Option<u64>, name: &str) -> ProgressBar {
    let (bar, template) = match length {
        Some(len) => (
            ProgressBar::new(len),
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{msg} {spinner} {bytes} {bytes_per_sec}",
        ),
    };
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(name.to_string());
    bar
}

/// A failed answer as an error a user can act on; the Hub explains itself
/// in `X-Error-Code` / `X-Error-Message` headers.
fn status_error(
    url: &Url,
    response: &Response,
    sent_token: bool,
    what: impl FnOnce() -> String,
) -> HubError {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    let detail = match (header("x-error-code"), header("x-error-message")) {
        (Some(code), Some(message)) => format!(" ({code}: {message})"),
        (Some(one), None) | (None, Some(one)) => format!(" ({one})"),
        (None, None) => String::new(),
    };
    let url = url.to_string();
    match response.status() {
        status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => HubError::Denied {
            url,
            status,
            detail,
            hint: if sent_token {
                "the token sent (HF_TOKEN or the token file) was refused or cannot read it; a gated model needs its licence accepted on its Hub page"
            } else {
                "no token was sent: set HF_TOKEN to a token that can read it (a gated model needs its licence accepted on its Hub page)"
            },
        },
        StatusCode::NOT_FOUND => HubError::NotFound {
            url,
            detail,
            what: what(),
        },
        status => HubError::Status {
            url,
            status,
            detail,
        },
    }
}

/// The listing's parts we use.
#[derive(Debug, Deserialize)]
struct Listing {
    /// The commit the revision points at.
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: Option<String>,
    size: Option<u64>,
}

impl Sibling {
    fn expected(&self) -> Expected {
        let lfs = self.lfs.as_ref();
        Expected {
            size: lfs.and_then(|l| l.size).or(self.size),
            sha256: lfs.and_then(|l| l.sha256.clone()),
        }
    }
}

impl Listing {
    /// A file at the top of the repository (where the engine looks).
    fn top(&self, name: &str) -> Option<&Sibling> {
        self.siblings.iter().find(|s| s.rfilename == name)
    }

    fn top_level_with_suffix<'a>(&'a self, suffix: &'a str) -> impl Iterator<Item = &'a Sibling> {
        self.siblings
            .iter()
            .filter(move |s| !s.rfilename.contains('/') && s.rfilename.ends_with(suffix))
    }
}

/// The config, tokenizer and index files to fetch first; refuses a
/// repository the engine could not load.
fn small_files(listing: &Listing) -> Result<Vec<&Sibling>, String> {
    if listing
        .top_level_with_suffix(".safetensors")
        .next()
        .is_none()
    {
        let ggufs: Vec<&str> = listing
            .top_level_with_suffix(".gguf")
            .map(|s| s.rfilename.as_str())
            .collect();
        return Err(if ggufs.is_empty() {
            "it has no *.safetensors weights".into()
        } else {
            format!(
                "it has no *.safetensors weights; name one GGUF file instead (hf://org/name/FILE), one of: {}",
                ggufs.join(", ")
            )
        });
    }
    let mut files = Vec::new();
    for name in [CONFIG, TOKENIZER] {
        files.push(
            listing
                .top(name)
                .ok_or_else(|| format!("it has no {name}"))?,
        );
    }
    files.extend(OPTIONAL.iter().filter_map(|name| listing.top(name)));
    Ok(files)
}

/// The weights the engine will open: the shards the index names, else
/// `model.safetensors`, else every top-level `*.safetensors` (so extra
/// copies such as Mistral's `consolidated.safetensors` are not fetched).
fn weight_files<'a>(
    listing: &'a Listing,
    index: Option<&Index>,
) -> Result<Vec<&'a Sibling>, String> {
    if let Some(index) = index {
        let shards: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
        return shards
            .into_iter()
            .map(|shard| {
                listing
                    .top(shard)
                    .filter(|_| is_plain_name(shard))
                    .ok_or_else(|| format!("{INDEX} names {shard}, which the repository lacks"))
            })
            .collect();
    }
    if let Some(single) = listing.top(SINGLE_WEIGHTS) {
        return Ok(vec![single]);
    }
    Ok(listing.top_level_with_suffix(".safetensors").collect())
}

#[derive(Debug, Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// The fetched index, when the repository has one.
fn read_index(path: &Path) -> Result<Option<Index>, HubError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(HubError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| HubError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a safetensors index: {e}"),
            ),
        })
}

/// The completion record of a model directory.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    source: String,
    commit: Option<String>,
    /// Name → size of every file fetched.
    files: BTreeMap<String, u64>,
}

/// The directory was completed and still holds every file it listed.
fn marker_holds(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(COMPLETE_MARKER)) else {
        return false;
    };
    let Ok(marker) = serde_json::from_str::<Marker>(&text) else {
        return false;
    };
    !marker.files.is_empty()
        && marker
            .files
            .iter()
            .all(|(name, &size)| file_size(&dir.join(name)) == Some(size))
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

fn resolve_segments<'a>(repo: &'a str, revision: &'a str, file: &'a str) -> Vec<&'a str> {
    let mut segments: Vec<&str> = repo.split('/').collect();
    segments.extend(["resolve", revision]);
    segments.extend(file.split('/'));
    segments
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != ".."
}

/// An error and its causes in one line (reqwest keeps the reason, such as
/// "Connection refused", in the source chain).
fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
