//! `shardserve up`: the whole local stack from a manifest, driven as a user
//! would; the official `openai` Python client against it; refusals of bad
//! manifests; and supervision (a dying child stops everything, Ctrl-C
//! leaves no orphans).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use shardserve_e2e::{
    children_of, cmdline, demo_model, free_port, is_alive, repo_root, shardserve_bin, signal,
};

/// Loading the demo model takes seconds; this only guards against a hang.
const STARTUP: Duration = Duration::from_secs(300);

/// A running `shardserve up`, its output collected in files.
struct Up {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Up {
    fn start(manifest: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        let child = Command::new(shardserve_bin())
            .arg("up")
            .arg(manifest)
            .args(extra)
            .env("SHARDSERVE_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("shardserve up starts");
        Up {
            child,
            stdout,
            stderr,
            _dir: dir,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until `up` prints that everything is ready.
    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let out = self.stdout();
            if out.contains("Ctrl-C stops") {
                return;
            }
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

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "up still running after {within:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
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

/// A manifest for the demo model file already in the cache (no pip).
fn local_manifest(dir: &Path, name: &str, replicas: u32) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: shardserve.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n  model:\n    source: file://{}\n  replicas: {replicas}\n  engine:\n    maxSeqLen: 512\n",
            demo_model().display()
        ),
    )
    .unwrap();
    path
}

fn addr_args(http: u16, grpc: u16) -> [String; 4] {
    [
        "--http-addr".into(),
        format!("127.0.0.1:{http}"),
        "--grpc-addr".into(),
        format!("127.0.0.1:{grpc}"),
    ]
}

#[test]
fn up_serves_openai_clients() {
    demo_model();
    let python = std::env::var_os("SHARDSERVE_E2E_PYTHON").map(PathBuf::from).expect(
        "SHARDSERVE_E2E_PYTHON is not set: run `make test`, which creates .venv with the openai package and passes its python",
    );
    assert!(
        python.is_file(),
        "{} is missing: run `make venv` (make test does it)",
        python.display()
    );
    let (http, grpc) = (free_port(), free_port());
    let args = addr_args(http, grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = Up::start(&repo_root().join("examples/smollm2.yaml"), &args);
    up.wait_ready();
    assert!(up.stdout().contains("curl http://"), "{}", up.stdout());
    let out = Command::new(&python)
        .arg(repo_root().join("e2e/python/openai_client.py"))
        .env("OPENAI_BASE_URL", format!("http://127.0.0.1:{http}/v1"))
        .env("SHARDSERVE_MODEL", "smollm2")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "openai client checks failed:\n{}{}\nup's log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        up.stderr()
    );
}

#[test]
fn up_refuses_bad_manifests_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(repo_root().join("examples/smollm2.yaml")).unwrap();
    for (name, text, expected) in [
        (
            "zero-tensor",
            good.replace("tensor: 1", "tensor: 0"),
            "spec.tensor: 0 is not a valid tensor parallel size",
        ),
        (
            "typo",
            good.replace("replicas: 1", "replica: 1"),
            "spec: unknown field `replica`",
        ),
        (
            "wrong-type",
            good.replace("maxSeqLen: 2048", "maxSeqLen: long"),
            "spec.engine.maxSeqLen: invalid type",
        ),
        (
            "bad-source",
            good.replace("pip://", "s3://"),
            "spec.model.source: unknown scheme `s3`",
        ),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(shardserve_bin())
            .arg("up")
            .arg(&path)
            .output()
            .expect("shardserve up runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: up accepted it");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{name}: the file is not named: {stderr}"
        );
    }
}

#[test]
fn up_stops_everything_when_a_worker_dies() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = local_manifest(dir.path(), "pair", 2);
    let mut up = Up::start(&manifest, &["--no-router"]);
    up.wait_ready();
    let workers: Vec<u32> = children_of(up.child.id())
        .into_iter()
        .filter(|&pid| cmdline(pid).contains(" worker "))
        .collect();
    assert_eq!(workers.len(), 2, "two workers expected: {workers:?}");
    signal(workers[0], "KILL");
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "up must fail when a worker dies");
    let stderr = up.stderr();
    assert!(
        stderr.contains(&format!(
            "(pid {}) exited: killed by signal 9 (SIGKILL)",
            workers[0]
        )),
        "{stderr}"
    );
    assert!(stderr.contains("worker pair-"), "{stderr}");
    assert!(!is_alive(workers[1]), "the other worker was left running");
}

#[test]
fn ctrl_c_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = local_manifest(dir.path(), "solo", 1);
    let (http, grpc) = (free_port(), free_port());
    let args = addr_args(http, grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = Up::start(&manifest, &args);
    up.wait_ready();
    let children = children_of(up.child.id());
    assert!(
        children.iter().any(|&p| cmdline(p).contains(" router ")),
        "a router child expected: {children:?}"
    );
    assert!(children.iter().any(|&p| cmdline(p).contains(" worker ")));
    signal(up.child.id(), "INT");
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "Ctrl-C is a clean stop: {status}\n{}",
        up.stderr()
    );
    for pid in children {
        assert!(!is_alive(pid), "child {pid} ({}) outlived up", cmdline(pid));
    }
}
