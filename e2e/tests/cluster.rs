//! The whole system on a real cluster, when `KUBECONFIG` points at one:
//! install the chart with helm, apply `examples/smollm2.yaml`, wait for
//! `Ready`, chat through the router (port-forward), scale to 2 groups, and
//! delete the deployment (its objects go with it). Without `KUBECONFIG` the
//! test says so and passes.
//!
//! Settings (environment):
//! - `SHARDSERVE_E2E_IMAGE=repository:tag`: the image the cluster runs
//!   (e.g. one built with `docker build .` and `kind load docker-image`);
//!   default: the chart's.
//! - `SHARDSERVE_E2E_FAKE_GPUS=0`: do not advertise fake `nvidia.com/gpu`
//!   on a node when no node has GPUs (the CPU demo asks for one GPU per
//!   rank, which the CPU image does not use).
//!
//! helm and kubectl come from `.tools/` (`make chart-tools`), else `PATH`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use shardserve_e2e::{free_port, http, repo_root, wait_for};

const NAMESPACE: &str = "shardserve-e2e";
const RELEASE: &str = "shardserve-e2e";
const MODEL: &str = "smollm2";

#[test]
fn chart_and_demo_deployment_on_a_cluster() {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("skipped: KUBECONFIG is not set (no cluster)");
        return;
    }
    let cluster = Cluster::new();
    let _cleanup = Cleanup(&cluster);
    cluster.install_chart();
    cluster.advertise_gpus_if_none();

    let manifest = repo_root().join("examples/smollm2.yaml");
    cluster.kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
    cluster.wait_ready(1, Duration::from_secs(900));

    // The router finds the deployment and answers through rank 0.
    let forward = cluster.port_forward_router();
    let port = forward.port;
    wait_for(
        Duration::from_secs(120),
        "the router to list smollm2",
        || {
            http(port, "GET", "/v1/models", None)
                .is_some_and(|(code, body)| code == 200 && body.contains(MODEL))
        },
    );
    let request = r#"{"model":"smollm2","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}"#;
    let (code, body) =
        http(port, "POST", "/v1/chat/completions", Some(request)).expect("the router answers");
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!text.is_empty(), "an empty answer: {body}");
    drop(forward);

    // Scaling adds a whole group.
    cluster.kubectl(&["scale", &format!("md/{MODEL}"), "--replicas=2"]);
    cluster.wait_ready(2, Duration::from_secs(900));
    let statefulsets = cluster.kubectl(&["get", "statefulsets", "-l", &selector(), "-o", "name"]);
    assert_eq!(
        statefulsets.lines().collect::<Vec<_>>(),
        ["statefulset.apps/smollm2-g0", "statefulset.apps/smollm2-g1"]
    );

    // Deleting the deployment deletes what the operator made.
    cluster.kubectl(&["delete", &format!("md/{MODEL}"), "--wait=true"]);
    wait_for(Duration::from_secs(180), "the groups to be deleted", || {
        let left = cluster.kubectl(&[
            "get",
            "statefulsets,services",
            "-l",
            &selector(),
            "-o",
            "name",
        ]);
        left.trim().is_empty()
    });
}

fn selector() -> String {
    format!("shardserve.io/model-deployment={MODEL}")
}

struct Cluster {
    helm: PathBuf,
    kubectl: PathBuf,
}

impl Cluster {
    fn new() -> Self {
        let tool = |name: &str| {
            let local = repo_root().join(".tools").join(name);
            if local.exists() {
                return local;
            }
            let found = Command::new(name).arg("version").arg("--client").output();
            assert!(
                found.is_ok(),
                "{name} is neither in .tools/ nor on PATH; run `make chart-tools`"
            );
            PathBuf::from(name)
        };
        Self {
            helm: tool("helm"),
            kubectl: tool("kubectl"),
        }
    }

    fn install_chart(&self) {
        let chart = repo_root().join("charts/shardserve");
        let mut args = vec![
            "upgrade".to_string(),
            "--install".into(),
            RELEASE.into(),
            chart.display().to_string(),
            "--namespace".into(),
            NAMESPACE.into(),
            "--create-namespace".into(),
            "--wait".into(),
            "--timeout=10m".into(),
        ];
        if let Ok(image) = std::env::var("SHARDSERVE_E2E_IMAGE") {
            let (repository, tag) = image
                .rsplit_once(':')
                .expect("SHARDSERVE_E2E_IMAGE is repository:tag");
            args.push(format!("--set=image.repository={repository}"));
            args.push(format!("--set=image.tag={tag}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok(Command::new(&self.helm).args(&args));
    }

    /// The demo asks for one `nvidia.com/gpu` per rank; a CPU cluster has
    /// none, so one node advertises four (an extended resource, as the
    /// Kubernetes documentation shows), unless told not to.
    fn advertise_gpus_if_none(&self) {
        let gpus = self.kubectl(&[
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.status.allocatable.nvidia\.com/gpu}{"\n"}{end}"#,
        ]);
        if gpus
            .lines()
            .any(|l| !l.trim().is_empty() && l.trim() != "0")
        {
            return;
        }
        if std::env::var("SHARDSERVE_E2E_FAKE_GPUS").as_deref() == Ok("0") {
            panic!("no node has nvidia.com/gpu and SHARDSERVE_E2E_FAKE_GPUS=0");
        }
        let node = self.kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]);
        println!(
            "no node has GPUs: advertising 4 fake nvidia.com/gpu on {node} (the CPU image does not use them)"
        );
        self.kubectl(&[
            "patch",
            "node",
            node.trim(),
            "--subresource=status",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]"#,
        ]);
    }

    fn wait_ready(&self, replicas: u32, timeout: Duration) {
        let md = format!("md/{MODEL}");
        let timeout = format!("--timeout={}s", timeout.as_secs());
        let ready = format!("--for=jsonpath={{.status.readyReplicas}}={replicas}");
        let out = self.try_kubectl(&["wait", &md, &ready, &timeout]);
        if !out.status.success() {
            let status = self.kubectl(&["get", &md, "-o", "yaml"]);
            let pods = self.kubectl(&["get", "pods", "-l", &selector(), "-o", "wide"]);
            panic!(
                "{md} did not reach {replicas} ready group(s): {}\n{status}\n{pods}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.kubectl(&["wait", &md, "--for=condition=Ready", "--timeout=60s"]);
    }

    fn port_forward_router(&self) -> PortForward {
        let port = free_port();
        let child = Command::new(&self.kubectl)
            .args(["-n", NAMESPACE, "port-forward"])
            .arg(format!("svc/{RELEASE}-router"))
            .arg(format!("{port}:80"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl port-forward starts");
        let forward = PortForward { child, port };
        wait_for(Duration::from_secs(30), "the port-forward", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        forward
    }

    fn try_kubectl(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .args(["-n", NAMESPACE])
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    fn kubectl(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(&self.kubectl)
                .args(["-n", NAMESPACE])
                .args(args),
        )
    }
}

/// Uninstalls the release and its namespace, whatever happened.
struct Cleanup<'a>(&'a Cluster);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .try_kubectl(&["delete", "md", "--all", "--wait=true", "--timeout=120s"]);
        let _ = Command::new(&self.0.helm)
            .args(["uninstall", RELEASE, "--namespace", NAMESPACE, "--wait"])
            .output();
        let _ = Command::new(&self.0.kubectl)
            .args(["delete", "namespace", NAMESPACE, "--wait=false"])
            .output();
    }
}

struct PortForward {
    child: Child,
    port: u16,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_ok(command: &mut Command) -> String {
    let out = command.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
