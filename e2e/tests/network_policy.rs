//! NetworkPolicies read back as flows: the chart's (router, operator), rendered by
//! helm, and the operator's for a ModelDeployment, built from the flags the chart
//! gives the operator. Each listed flow must pass and every other tried flow must
//! not (`shardserve_operator::flows` reads policies as the API documents them).
//! The operator's policy also passes strict schema validation (the chart's does in
//! `make chart-check`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::Value;
use shardserve_e2e::{e2e_python, repo_root, tool};
use shardserve_operator::controller::check::check;
use shardserve_operator::controller::desired::{NetworkPeers, Peer, WorkerSettings, desired};
use shardserve_operator::flows::{Endpoint, Flow, Namespaces, Pod, allows};
use shardserve_operator::parse_manifests;

const RELEASE: &str = "shardserve";
const RELEASE_NS: &str = "shardserve";
const MODELS_NS: &str = "models";

/// `helm template` of the chart with `values` files, as JSON documents.
fn render(values: &[&str]) -> Vec<Value> {
    let chart = repo_root().join("charts/shardserve");
    let mut command = Command::new(tool(".tools/helm", "helm"));
    command.args([
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NS,
    ]);
    for file in values {
        command.args(["-f", repo_root().join(file).to_str().unwrap()]);
    }
    let out = command
        .output()
        .expect("helm runs (`make chart-tools` puts it in .tools/; make test does it)");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn deployment<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    of_kind(docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == component)
        .unwrap_or_else(|| panic!("no {component} Deployment rendered"))
}

/// A pod of a rendered Deployment, with its template's labels.
fn pod_of(deployment: &Value) -> Pod {
    let labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    Pod {
        namespace: RELEASE_NS.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect(),
        ports: BTreeMap::new(),
    }
}

/// The values of `--flag=VALUE` in the operator's rendered arguments.
fn flag_values(operator: &Value, flag: &str) -> Vec<String> {
    let prefix = format!("{flag}=");
    operator["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str()?.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// The NetworkPolicy the operator makes for `manifest` in `models`, with the
/// peers the rendered chart gives it, and the pods of its first group.
fn operator_policy(
    docs: &[Value],
    manifest: &str,
    source: Option<&str>,
    hub: Option<&str>,
) -> (NetworkPolicy, Vec<Pod>) {
    let operator = deployment(docs, "operator");
    let args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    assert!(
        args.iter().any(|a| a == "--network-policies"),
        "the chart turns the operator's NetworkPolicies on: {args:?}"
    );
    let peer = |flag: &str| -> Peer { flag_values(operator, flag)[0].parse().unwrap() };
    let settings = WorkerSettings {
        image: "shardserve:test".into(),
        hub_endpoint: hub.map(str::to_string),
        cuda: false,
        network: Some(NetworkPeers {
            router: peer("--router-pods"),
            operator: peer("--operator-pods"),
            scrapers: flag_values(operator, "--metrics-scrapers")
                .iter()
                .map(|p| p.parse().unwrap())
                .collect(),
        }),
    };
    let text = std::fs::read_to_string(repo_root().join(manifest)).unwrap();
    let mut md = parse_manifests(&text).unwrap().remove(0);
    if let Some(source) = source {
        md.spec.model.source = source.into();
    }
    md.metadata.namespace = Some(MODELS_NS.into());
    md.metadata.uid = Some("5f0c6d1e-0000-4000-8000-000000000001".into());
    let objects = desired(&md, &check(&md).unwrap(), &settings).unwrap();
    let template = objects.groups[0]
        .statefulset
        .spec
        .as_ref()
        .unwrap()
        .template
        .clone();
    let labels = template.metadata.unwrap().labels.unwrap();
    let pods = (0..2)
        .map(|index| {
            let mut labels = labels.clone();
            labels.insert("apps.kubernetes.io/pod-index".into(), index.to_string());
            Pod {
                namespace: MODELS_NS.into(),
                labels,
                ports: BTreeMap::new(),
            }
        })
        .collect();
    (objects.network_policy.expect("a NetworkPolicy"), pods)
}

fn policies(docs: &[Value]) -> Vec<NetworkPolicy> {
    of_kind(docs, "NetworkPolicy")
        .into_iter()
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect()
}

/// Every flow of `expected` is allowed or refused as it says; all mismatches listed.
fn check_flows(
    policies: &[NetworkPolicy],
    namespaces: &Namespaces,
    expected: &[(&str, Flow, bool)],
) {
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(_, flow, allowed)| allows(policies, namespaces, flow) != *allowed)
        .map(|(what, _, allowed)| {
            format!(
                "{what}: {}",
                if *allowed {
                    "refused, should pass"
                } else {
                    "passes, should be refused"
                }
            )
        })
        .collect();
    assert!(wrong.is_empty(), "flows:\n{}", wrong.join("\n"));
}

fn validate_strictly(policy: &NetworkPolicy, dir: &Path) {
    let file = dir.join("policy.yaml");
    std::fs::write(&file, serde_norway::to_string(policy).unwrap()).unwrap();
    let out = Command::new(e2e_python())
        .arg(repo_root().join("scripts/validate-manifests.py"))
        .args(["-k", "1.33", "-k", "1.35"])
        .arg(&file)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "the operator's NetworkPolicy fails strict validation:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn default_policies_allow_exactly_the_listed_flows() {
    let docs = render(&[]);
    let router = Endpoint::Pod(pod_of(deployment(&docs, "router")));
    let operator = Endpoint::Pod(pod_of(deployment(&docs, "operator")));
    let (worker_policy, ranks) =
        operator_policy(&docs, "examples/llama-3-70b-2-nodes.yaml", None, None);
    let dir = tempfile::tempdir().unwrap();
    validate_strictly(&worker_policy, dir.path());
    let (other_policy, other_ranks) =
        operator_policy(&docs, "examples/llama-3-70b-tp8.yaml", None, None);

    let mut all = policies(&docs);
    assert_eq!(all.len(), 2, "the chart's router and operator policies");
    all.extend([worker_policy, other_policy]);

    let mut namespaces = Namespaces::new([RELEASE_NS, MODELS_NS, "kube-system"]);
    namespaces.add("monitoring", []);
    let leader = Endpoint::Pod(ranks[0].clone());
    let follower = Endpoint::Pod(ranks[1].clone());
    let other = Endpoint::Pod(other_ranks[0].clone());
    let prometheus = Endpoint::Pod(Pod::new(
        "monitoring",
        [("app.kubernetes.io/name", "prometheus")],
    ));
    let stranger = Endpoint::Pod(Pod::new(MODELS_NS, [("app", "notebook")]));
    let neighbour = Endpoint::Pod(Pod::new(RELEASE_NS, [("app", "debug")]));
    let dns = Endpoint::Pod(Pod::new("kube-system", [("k8s-app", "kube-dns")]));
    let client = Endpoint::Address("198.51.100.20".parse().unwrap());
    let api_server = Endpoint::Address("10.96.0.1".parse().unwrap());
    let hub = Endpoint::Address("203.0.113.10".parse().unwrap());

    check_flows(
        &all,
        &namespaces,
        &[
            // Listed.
            (
                "client -> router http",
                Flow::tcp(&client, &router, 8080),
                true,
            ),
            (
                "client -> router grpc",
                Flow::tcp(&client, &router, 50051),
                true,
            ),
            (
                "router -> leader grpc",
                Flow::tcp(&router, &leader, 50051),
                true,
            ),
            (
                "operator -> follower grpc (progress)",
                Flow::tcp(&operator, &follower, 50051),
                true,
            ),
            (
                "operator -> router metrics (load)",
                Flow::tcp(&operator, &router, 9090),
                true,
            ),
            (
                "follower -> leader coordinator",
                Flow::tcp(&follower, &leader, 29500),
                true,
            ),
            (
                "leader -> follower collective",
                Flow::tcp(&leader, &follower, 41234),
                true,
            ),
            (
                "prometheus -> leader metrics",
                Flow::tcp(&prometheus, &leader, 9090),
                true,
            ),
            (
                "prometheus -> operator metrics",
                Flow::tcp(&prometheus, &operator, 8081),
                true,
            ),
            (
                "prometheus -> router metrics",
                Flow::tcp(&prometheus, &router, 9090),
                true,
            ),
            (
                "router -> API server",
                Flow::tcp(&router, &api_server, 443),
                true,
            ),
            (
                "operator -> API server",
                Flow::tcp(&operator, &api_server, 6443),
                true,
            ),
            ("worker -> DNS", Flow::udp(&leader, &dns, 53), true),
            ("router -> DNS", Flow::udp(&router, &dns, 53), true),
            ("operator -> DNS", Flow::tcp(&operator, &dns, 53), true),
            (
                "worker fetch -> hub https",
                Flow::tcp(&follower, &hub, 443),
                true,
            ),
            // Not listed.
            (
                "client -> worker grpc",
                Flow::tcp(&client, &leader, 50051),
                false,
            ),
            (
                "stranger -> worker grpc",
                Flow::tcp(&stranger, &leader, 50051),
                false,
            ),
            (
                "stranger -> worker metrics",
                Flow::tcp(&stranger, &leader, 9090),
                false,
            ),
            (
                "stranger -> worker coordinator",
                Flow::tcp(&stranger, &leader, 29500),
                false,
            ),
            (
                "other deployment -> worker grpc",
                Flow::tcp(&other, &leader, 50051),
                false,
            ),
            (
                "other deployment -> worker collective",
                Flow::tcp(&other, &follower, 41234),
                false,
            ),
            (
                "worker -> other deployment",
                Flow::tcp(&leader, &other, 29500),
                false,
            ),
            (
                "prometheus -> worker grpc",
                Flow::tcp(&prometheus, &leader, 50051),
                false,
            ),
            (
                "router -> worker metrics",
                Flow::tcp(&router, &leader, 9090),
                false,
            ),
            (
                "router -> worker coordinator",
                Flow::tcp(&router, &leader, 29500),
                false,
            ),
            ("worker -> router", Flow::tcp(&leader, &router, 8080), false),
            (
                "worker -> operator",
                Flow::tcp(&leader, &operator, 8081),
                false,
            ),
            (
                "worker -> API server",
                Flow::tcp(&leader, &api_server, 6443),
                false,
            ),
            ("worker -> hub http", Flow::tcp(&leader, &hub, 80), false),
            (
                "neighbour -> operator",
                Flow::tcp(&neighbour, &operator, 8081),
                false,
            ),
            (
                "client -> operator",
                Flow::tcp(&client, &operator, 8081),
                false,
            ),
            (
                "router -> operator",
                Flow::tcp(&router, &operator, 8081),
                false,
            ),
            (
                "stranger -> router metrics",
                Flow::tcp(&stranger, &router, 9090),
                false,
            ),
            (
                "worker -> router metrics",
                Flow::tcp(&leader, &router, 9090),
                false,
            ),
            (
                "operator -> worker metrics",
                Flow::tcp(&operator, &leader, 9090),
                false,
            ),
            ("router -> hub http", Flow::tcp(&router, &hub, 80), false),
        ],
    );
}

#[test]
fn chosen_clients_scrapers_and_api_server_narrow_the_flows() {
    // ci/all-values.yaml: clients from labelled namespaces, a scraper in any namespace,
    // the API server's CIDR, a Hub mirror on its own port, one watched namespace.
    let docs = render(&["charts/shardserve/ci/all-values.yaml"]);
    let router = Endpoint::Pod(pod_of(deployment(&docs, "router")));
    let operator = Endpoint::Pod(pod_of(deployment(&docs, "operator")));
    let hub_endpoint = flag_values(deployment(&docs, "operator"), "--hub-endpoint");
    assert_eq!(
        hub_endpoint,
        vec!["https://hub-mirror.internal:8443".to_string()]
    );
    let (worker_policy, ranks) = operator_policy(
        &docs,
        "examples/llama-3-70b-2-nodes.yaml",
        None,
        Some(&hub_endpoint[0]),
    );
    let (local_policy, local_ranks) = operator_policy(
        &docs,
        "examples/smollm2.yaml",
        Some("file:///models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    validate_strictly(&local_policy, dir.path());
    // Two deployments in one namespace, each with its policy.
    let mut all = policies(&docs);
    all.extend([worker_policy, local_policy]);

    let mut namespaces = Namespaces::new([RELEASE_NS, MODELS_NS]);
    namespaces.add("apps", [("shardserve.io/client", "true")]);
    namespaces.add("batch", []);
    namespaces.add("observability", []);
    let app = Endpoint::Pod(Pod::new("apps", [("app", "chatbot")]));
    let batch = Endpoint::Pod(Pod::new("batch", [("app", "job")]));
    let scraper = Endpoint::Pod(Pod::new(
        "observability",
        [("app.kubernetes.io/name", "prometheus")],
    ));
    let leader = Endpoint::Pod(ranks[0].clone());
    let demo = Endpoint::Pod(local_ranks[0].clone());
    let api_server = Endpoint::Address("10.96.0.1".parse().unwrap());
    let elsewhere = Endpoint::Address("203.0.113.10".parse().unwrap());

    check_flows(
        &all,
        &namespaces,
        &[
            ("app -> router http", Flow::tcp(&app, &router, 8080), true),
            ("app -> router grpc", Flow::tcp(&app, &router, 50051), true),
            (
                "batch -> router http",
                Flow::tcp(&batch, &router, 8080),
                false,
            ),
            (
                "operator -> router metrics (load)",
                Flow::tcp(&operator, &router, 9090),
                true,
            ),
            (
                "operator -> router http",
                Flow::tcp(&operator, &router, 8080),
                false,
            ),
            (
                "operator -> router grpc",
                Flow::tcp(&operator, &router, 50051),
                false,
            ),
            (
                "scraper anywhere -> router metrics",
                Flow::tcp(&scraper, &router, 9090),
                true,
            ),
            (
                "app -> router metrics",
                Flow::tcp(&app, &router, 9090),
                false,
            ),
            (
                "scraper anywhere -> worker metrics",
                Flow::tcp(&scraper, &leader, 9090),
                true,
            ),
            (
                "router -> API server CIDR",
                Flow::tcp(&router, &api_server, 6443),
                true,
            ),
            (
                "router -> API server, a port not listed",
                Flow::tcp(&router, &api_server, 443),
                false,
            ),
            (
                "router -> elsewhere 443",
                Flow::tcp(&router, &elsewhere, 443),
                false,
            ),
            (
                "operator -> elsewhere 6443",
                Flow::tcp(&operator, &elsewhere, 6443),
                false,
            ),
            (
                "fetch -> mirror port",
                Flow::tcp(&leader, &elsewhere, 8443),
                true,
            ),
            ("fetch -> https", Flow::tcp(&leader, &elsewhere, 443), true),
            ("fetch -> http", Flow::tcp(&leader, &elsewhere, 80), false),
            // The demo's model is in the image: its pods fetch nothing.
            (
                "in-image model -> https",
                Flow::tcp(&demo, &elsewhere, 443),
                false,
            ),
            (
                "demo -> llama collective",
                Flow::tcp(&demo, &leader, 29500),
                false,
            ),
            (
                "router -> demo grpc",
                Flow::tcp(&router, &demo, 50051),
                true,
            ),
        ],
    );
}

#[test]
fn static_routers_reach_their_backends_anywhere() {
    let docs = render(&["charts/shardserve/ci/static-values.yaml"]);
    let all = policies(&docs);
    assert_eq!(all.len(), 1, "the router's policy alone (no operator)");
    let router = Endpoint::Pod(pod_of(deployment(&docs, "router")));
    let backend = Endpoint::Address("10.20.30.40".parse().unwrap());
    let namespaces = Namespaces::new([RELEASE_NS]);
    check_flows(
        &all,
        &namespaces,
        &[(
            "router -> static backend",
            Flow::tcp(&router, &backend, 50051),
            true,
        )],
    );
}
