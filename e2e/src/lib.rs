//! Helpers of the end-to-end tests (in `tests/`), which drive the
//! `shardserve` binary as a user would.

pub mod lora;
pub mod pki;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `shardserve` binary of this build (next to the test executables).
pub fn shardserve_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/shardserve
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(format!("shardserve{}", std::env::consts::EXE_SUFFIX)))
        .expect("target directory");
    assert!(
        bin.exists(),
        "shardserve binary missing at {}; build it first (`make test` does: cargo build --workspace --all-targets)",
        bin.display()
    );
    bin
}

/// The demo model in the cache; fails with a clear message when it is missing.
pub fn demo_model() -> PathBuf {
    let cache = std::env::var_os("SHARDSERVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/shardserve")
        });
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "demo model missing at {}; run `make fetch-demo` (make test does it first)",
        path.display()
    );
    path
}

/// Runs `shardserve` with `args` (two compute threads) and returns its output.
pub fn run(args: &[&str]) -> Output {
    Command::new(shardserve_bin())
        .args(args)
        .env("SHARDSERVE_THREADS", "2")
        .output()
        .expect("shardserve runs")
}

/// Runs `shardserve` expecting success and one JSON object on stdout.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "shardserve {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    assert_eq!(
        stdout.trim_end().lines().count(),
        1,
        "one line of JSON expected, got: {stdout}"
    );
    serde_json::from_str(stdout.trim()).expect("stdout is JSON")
}

/// A port free at the time of asking on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The repository root (for `examples/`, `e2e/python/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the repository")
        .to_path_buf()
}

/// The series of `prefix` (`shardserve_worker_`, `shardserve_router_`) that the chart's
/// Grafana dashboard queries, as they appear in `/metrics` text (histograms by their
/// `_bucket` series).
pub fn dashboard_series(prefix: &str) -> std::collections::BTreeSet<String> {
    fn walk(value: &serde_json::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        match value {
            serde_json::Value::String(s) => {
                let mut rest = s.as_str();
                while let Some(at) = rest.find(prefix) {
                    let tail = &rest[at..];
                    let end = tail
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(tail.len());
                    out.insert(tail[..end].to_string());
                    rest = &tail[end..];
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, prefix, out)),
            serde_json::Value::Object(fields) => fields.values().for_each(|v| walk(v, prefix, out)),
            _ => {}
        }
    }
    let path = repo_root().join("charts/shardserve/dashboards/shardserve.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut series = std::collections::BTreeSet::new();
    walk(&dashboard, prefix, &mut series);
    series
}

/// The dashboard's series of `prefix` that `/metrics` text `metrics` lacks.
pub fn dashboard_series_missing(prefix: &str, metrics: &str) -> Vec<String> {
    dashboard_series(prefix)
        .into_iter()
        .filter(|name| {
            !metrics
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        })
        .collect()
}

/// The Python of the test tools (`.venv`: the `openai` package, kubernetes-validate),
/// which `make test` passes as `SHARDSERVE_E2E_PYTHON`.
pub fn e2e_python() -> PathBuf {
    let python = std::env::var_os("SHARDSERVE_E2E_PYTHON").map(PathBuf::from).expect(
        "SHARDSERVE_E2E_PYTHON is not set: run `make test`, which creates .venv with the openai package and passes its python",
    );
    assert!(
        python.is_file(),
        "{} is missing: run `make venv` (make test does it)",
        python.display()
    );
    python
}

/// `.tools/<path>` of the repository when it is there (`make chart-tools` puts helm
/// and kubectl there), else `name` on `PATH`.
pub fn tool(path: &str, name: &str) -> PathBuf {
    let local = repo_root().join(path);
    if local.is_file() {
        local
    } else {
        PathBuf::from(name)
    }
}

/// Pids of the live (not zombie) children of `parent`, read from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(state, ppid)| ppid == parent && state != 'Z'))
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The command line of `pid`, space-separated.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// (state, parent pid) from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Sends `signal` (a name such as "INT" or "KILL") to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Loading the demo model takes seconds; this only guards against a hang.
pub const STARTUP: Duration = Duration::from_secs(300);

/// A `shardserve` process (one compute thread) whose output goes to files,
/// so that tests can wait for it with deadlines; stopped with Ctrl-C, then
/// killed, when dropped.
pub struct Process {
    pub child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        let child = Command::new(shardserve_bin())
            .args(args)
            .env("SHARDSERVE_THREADS", "1")
            .env_remove("SHARDSERVE_API_KEY")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("shardserve starts");
        Process {
            child,
            stdout,
            stderr,
            _dir: dir,
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until `shardserve up` prints that everything is ready.
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        while !self.stdout().contains("Ctrl-C stops") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "up exited ({status}) before it was ready:\n{}",
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < STARTUP,
                "up not ready:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the process to exit; kills it and fails after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!("still running after {within:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), "INT");
            let start = Instant::now();
            while matches!(self.child.try_wait(), Ok(None))
                && start.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A manifest in `dir` for the demo model file already in the cache (no pip).
pub fn demo_manifest(dir: &Path, name: &str, replicas: u32) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: shardserve.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n  model:\n    source: file://{}\n  replicas: {replicas}\n  engine:\n    maxSeqLen: 512\n",
            demo_model().display()
        ),
    )
    .expect("manifest written");
    path
}

/// Polls `done` every 2 s until it holds; fails the test after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// One HTTP/1.0 request to 127.0.0.1:`port`: the status code and body, `None` when
/// there is no answer.
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .ok()?;
    let body = body.unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}
