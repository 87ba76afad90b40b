//! `shardserve up`: the whole local stack from a manifest, driven as a user
//! would; the official `openai` Python client against it; refusals of bad
//! manifests; supervision (a killed group starts again, the router dying stops
//! everything, Ctrl-C leaves no orphans); and autoscaling from zero and back.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shardserve_e2e::{
    Process, children_of, cmdline, demo_manifest, demo_model, e2e_python, free_port, is_alive,
    repo_root, shardserve_bin, signal, wait_for,
};

/// A running `shardserve up MANIFEST EXTRA...`.
fn start_up(manifest: &Path, extra: &[&str]) -> Process {
    let mut args = vec![std::ffi::OsStr::new("up"), manifest.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    Process::start(&args)
}

fn addr_args(http: u16, grpc: u16) -> [String; 4] {
    [
        "--http-addr".into(),
        format!("127.0.0.1:{http}"),
        "--grpc-addr".into(),
        format!("127.0.0.1:{grpc}"),
    ]
}

/// `e2e/python/elastic_load.py MODE` against the router on `http`, started.
fn elastic_load(http: u16, model: &str, mode: &str) -> std::process::Child {
    Command::new(e2e_python())
        .arg(repo_root().join("e2e/python/elastic_load.py"))
        .arg(mode)
        .env("OPENAI_BASE_URL", format!("http://127.0.0.1:{http}/v1"))
        .env("SHARDSERVE_MODEL", model)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs")
}

#[test]
fn up_serves_openai_clients() {
    demo_model();
    let python = e2e_python();
    let (http, grpc) = (free_port(), free_port());
    let args = addr_args(http, grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = start_up(&repo_root().join("examples/smollm2.yaml"), &args);
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

/// `up`'s worker processes (rank processes of every group), by pid.
fn workers_of(up: &Process) -> Vec<u32> {
    children_of(up.child.id())
        .into_iter()
        .filter(|&pid| cmdline(pid).contains(" worker "))
        .collect()
}

#[test]
fn a_worker_killed_under_streaming_load_starts_again_and_loses_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = demo_manifest(dir.path(), "pair", 2);
    let (http, grpc) = (free_port(), free_port());
    let args = addr_args(http, grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = start_up(&manifest, &args);
    up.wait_ready();
    let workers = workers_of(&up);
    assert_eq!(workers.len(), 2, "two workers expected: {workers:?}");
    let mut load = elastic_load(http, "pair", "crash");
    let mut stdout = std::io::BufReader::new(load.stdout.take().unwrap());
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0
        && !line.contains("load started")
    {
        line.clear();
    }
    assert!(line.contains("load started"), "the load did not start");
    signal(workers[0], "KILL");
    let out = load.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    println!("{rest}");
    assert!(
        out.status.success(),
        "{rest}{}\nup's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        up.stderr()
    );
    wait_for(
        Duration::from_secs(60),
        "the killed group to serve again",
        || up.stderr().matches(": serving on ").count() >= 3,
    );
    let stderr = up.stderr();
    assert!(
        stderr.contains(&format!(
            "(pid {}) exited: killed by signal 9 (SIGKILL); group pair-",
            workers[0]
        )) && stderr.contains("starts again in 1 s (restart 1)"),
        "{stderr}"
    );
    assert!(up.child.try_wait().unwrap().is_none(), "up keeps running");
    let now = workers_of(&up);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.contains(&workers[1]), "the other group was left alone");
}

#[test]
fn up_stops_everything_when_the_router_dies() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = demo_manifest(dir.path(), "solo", 1);
    let (http, grpc) = (free_port(), free_port());
    let args = addr_args(http, grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = start_up(&manifest, &args);
    up.wait_ready();
    let router = children_of(up.child.id())
        .into_iter()
        .find(|&pid| cmdline(pid).contains(" router "))
        .expect("a router child");
    let workers = workers_of(&up);
    signal(router, "KILL");
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "up must fail when its router dies");
    let stderr = up.stderr();
    assert!(
        stderr.contains(&format!("router (pid {router}) exited: killed by signal 9")),
        "{stderr}"
    );
    for pid in workers {
        assert!(!is_alive(pid), "worker {pid} was left running");
    }
}

#[test]
fn a_model_scales_from_zero_to_two_groups_and_back_losing_no_request() {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("elastic.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: shardserve.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: elastic\n\
             spec:\n  model:\n    source: file://{}\n  replicas: 0\n  drainTimeoutSeconds: 60\n\
             \x20 autoscaling:\n    minReplicas: 0\n    maxReplicas: 2\n    targetInFlightRequests: 4\n\
             \x20   scaleDownDelaySeconds: 20\n  engine:\n    maxSeqLen: 512\n    maxNumSeqs: 8\n",
            model.display()
        ),
    )
    .unwrap();
    let (http, grpc) = (free_port(), free_port());
    let args = addr_args(http, grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = start_up(&manifest, &args);
    up.wait_ready();
    assert!(workers_of(&up).is_empty(), "no group before a request");
    let out = elastic_load(http, "elastic", "scale")
        .wait_with_output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "{report}{}\nup's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        up.stderr()
    );
    wait_for(Duration::from_secs(30), "every worker to stop", || {
        workers_of(&up).is_empty()
    });
    let stderr = up.stderr();
    for line in [
        "autoscaler: elastic from 0 to 1 group(s): 1 request(s) wait and no group runs",
        "autoscaler: elastic from 1 to 2 group(s)",
        "group elastic-0: drained; stopping it",
        "group elastic-1: drained; stopping it",
    ] {
        assert!(stderr.contains(line), "no {line:?} in up's log:\n{stderr}");
    }
}

#[test]
fn ctrl_c_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = demo_manifest(dir.path(), "solo", 1);
    let (http, grpc) = (free_port(), free_port());
    let args = addr_args(http, grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = start_up(&manifest, &args);
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
