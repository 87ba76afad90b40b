//! The pod of a group: its ranks, an init container fetching the model, and the
//! security settings of every shardserve pod (non-root, read-only root filesystem).
//!
//! A pod holds `ranks_per_pod` ranks; pod `p` holds ranks `p × ranks_per_pod + c`.
//! On CPUs each rank is a container (`rank-0`, …) with its own CPU and memory. On
//! GPUs one container, `rank-0`, holds all the pod's GPUs and runs its ranks as
//! processes (`worker --local-ranks`), rank `c` on GPU `c`: ranks in one container see
//! each other's GPUs, so NCCL moves activations over NVLink (peer to peer) rather
//! than through host memory, which it must between containers that each see one
//! GPU. The global rank 0 (pod 0, `rank-0`) is the only one serving gRPC; the gRPC
//! health probes sit on `rank-0`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    GRPCAction, HostPathVolumeSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, Probe, ResourceFieldSelector,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::{GroupContext, MODEL_DIR, ModelFiles};
use crate::controller::labels::{
    COORDINATOR_PORT, COORDINATOR_PORT_NAME, GROUP_LABEL, GRPC_PORT, GRPC_PORT_NAME, METRICS_PORT,
    METRICS_PORT_NAME, MODEL_DEPLOYMENT_LABEL, POD_INDEX_LABEL, coordinator_address, labels,
};
use crate::crd::WORKER_TLS_DIR;
use crate::crd::validate::dtype_name;
use crate::crd::{CpuMemory, DEFAULT_GPU_MEMORY_UTILIZATION_PERCENT};

/// The uid and gid of the image's `shardserve` user.
const USER: i64 = 65532;
/// The worker's `--rendezvous-timeout` default: ranks may load this long
/// before they meet, so the startup probe waits as long.
const RENDEZVOUS_SECONDS: i32 = 1800;
const STARTUP_PERIOD_SECONDS: i32 = 10;
/// The environment variable holding the pod's index in its group.
const POD_INDEX_ENV: &str = "SHARDSERVE_POD_INDEX";
/// Where a CPU pod's ranks keep their load progress (the worker's
/// `progress::PEERS_ENV`), in the pod's shared /tmp.
const PROGRESS_DIR_ENV: &str = "SHARDSERVE_PROGRESS_DIR";
const PROGRESS_DIR: &str = "/tmp/shardserve-progress";

/// Where a pod's ranks fetch LoRA adapters to (in its `/tmp` volume).
pub const ADAPTER_CACHE: &str = "/tmp/shardserve-cache";

const MODEL_VOLUME: &str = "model";
const TMP_VOLUME: &str = "tmp";
const SHM_VOLUME: &str = "dshm";
const TLS_VOLUME: &str = "tls";

pub(super) fn pod_spec(group: &GroupContext<'_>) -> PodSpec {
    let ranks_per_pod = group.topology.ranks_per_pod.max(1);
    let mut volumes = vec![empty_dir(TMP_VOLUME, None)];
    match group.files {
        ModelFiles::Fetched { .. } => volumes.push(model_cache(group)),
        ModelFiles::Claim { claim, .. } => volumes.push(Volume {
            name: MODEL_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        }),
        ModelFiles::InImage { .. } => {}
    }
    if group.topology.tensor > 1 {
        // Collectives (NCCL) use shared memory; the runtime's 64 MiB is too small.
        volumes.push(empty_dir(SHM_VOLUME, Some("Memory")));
    }
    if let Some(tls) = &group.md.spec.tls {
        volumes.push(Volume {
            name: TLS_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                // The pod's group (fs_group) reads the key; nobody else.
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let fetch = match group.files {
        ModelFiles::Fetched { source, .. } => Some(vec![fetch_container(group, source)]),
        _ => None,
    };
    let spec = &group.md.spec;
    PodSpec {
        init_containers: fetch,
        containers: if group.cuda {
            vec![rank_container(group, 0)]
        } else {
            (0..ranks_per_pod)
                .map(|local| rank_container(group, local))
                .collect()
        },
        volumes: Some(volumes),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        affinity: Some(affinity(group)),
        // A worker told to stop finishes its streams first.
        termination_grace_period_seconds: Some(
            spec.drain_timeout().as_secs() as i64
                + i64::from(crate::crd::TERMINATION_GRACE_EXTRA_SECONDS),
        ),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(USER),
            run_as_group: Some(USER),
            fs_group: Some(USER),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        // Ranks talk to each other and to nobody else: no API token, and no
        // environment variables for every Service of the namespace.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        ..PodSpec::default()
    }
}

/// The container of local rank `local` of every pod of the group.
fn rank_container(group: &GroupContext<'_>, local: u32) -> Container {
    let md = group.md;
    let topology = group.topology;
    let name = format!("rank-{local}");
    let mut args = strings(&[
        "worker",
        "--model",
        group.files.path(),
        "--served-model-name",
        md.served_model_name(),
        "--tensor",
        &topology.tensor.to_string(),
        "--listen",
        &format!("0.0.0.0:{GRPC_PORT}"),
        "--metrics-addr",
        &format!("0.0.0.0:{METRICS_PORT}"),
        // Streams finish within the drain timeout after SIGTERM (a node drain, an
        // eviction); the pod's grace period gives 30 s more.
        "--drain-timeout",
        &md.spec.drain_timeout().as_secs().to_string(),
        // Where LoRA adapters from hf:// and pip:// are fetched when the operator
        // loads them: the pod's writable /tmp, shared by its rank containers (the
        // model's volume is mounted read-only).
        "--cache",
        ADAPTER_CACHE,
    ]);
    let mut env = vec![EnvVar {
        // One compute thread per CPU of the container's limit (the node's
        // CPUs when unlimited), so ranks sharing a pod do not oversubscribe.
        name: "SHARDSERVE_THREADS".into(),
        value_from: Some(EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector {
                container_name: Some(name.clone()),
                resource: "limits.cpu".into(),
                divisor: Some(Quantity("1".into())),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    if topology.tensor > 1 {
        let coordinator = coordinator_address(&group.owner.name, group.id, &group.owner.namespace);
        args.extend(strings(&[
            "--coordinator",
            &coordinator,
            "--rank",
            &local.to_string(),
        ]));
        if topology.pods_per_group > 1 {
            // The worker adds pod index × ranks per pod to --rank; Kubernetes
            // expands $(VAR) in args, no shell needed.
            args.extend(strings(&[
                "--pod-index",
                &format!("$({POD_INDEX_ENV})"),
                "--ranks-per-pod",
                &topology.ranks_per_pod.to_string(),
            ]));
            env.push(EnvVar {
                name: POD_INDEX_ENV.into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        api_version: None,
                        field_path: format!("metadata.labels['{POD_INDEX_LABEL}']"),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }
    if !group.cuda && topology.ranks_per_pod > 1 {
        // The pod's first rank reports its load progress for all its ranks, which
        // keep their counts in files in the pod's shared /tmp.
        env.push(EnvVar {
            name: PROGRESS_DIR_ENV.into(),
            value: Some(PROGRESS_DIR.into()),
            ..EnvVar::default()
        });
    }
    if let Some(dtype) = &md.spec.model.dtype {
        args.extend(strings(&["--dtype", &dtype_name(dtype)]));
    }
    let engine = &md.spec.engine;
    if group.cuda {
        // The container holds the pod's GPUs; bare `cuda` gives local rank c GPU c.
        args.extend(strings(&["--device", "cuda"]));
        if topology.ranks_per_pod > 1 {
            args.extend(strings(&[
                "--local-ranks",
                &topology.ranks_per_pod.to_string(),
            ]));
        }
        let percent = engine
            .gpu_memory_utilization_percent
            .unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION_PERCENT);
        args.extend(strings(&[
            "--gpu-memory-utilization",
            &percent.to_string(),
            "--kv-cache-dtype",
            &dtype_name(&engine.kv_cache_dtype.unwrap_or_default()),
        ]));
    } else if let Some(dtype) = &engine.kv_cache_dtype {
        // A CPU worker keeps float16 and refuses other types by name at start-up.
        args.extend(strings(&["--kv-cache-dtype", &dtype_name(dtype)]));
    }
    if let Some(max) = md.spec.engine.max_seq_len {
        args.extend(strings(&["--max-seq-len", &max.to_string()]));
    }
    if let Some(max) = md.spec.engine.max_num_seqs {
        args.extend(strings(&["--max-num-seqs", &max.to_string()]));
    }
    // The limits only: the adapters themselves reach running groups through their
    // API, so that changing spec.loraAdapters never rolls a group.
    if let Some(max) = md.spec.engine.max_loras {
        args.extend(strings(&["--max-loras", &max.to_string()]));
    }
    if let Some(max) = md.spec.engine.max_lora_rank {
        args.extend(strings(&["--max-lora-rank", &max.to_string()]));
    }
    let tls = md.spec.tls.is_some();
    if tls {
        // The gRPC port then serves the Inference API over mutual TLS only; health
        // stays plain beside it, since kubelet's gRPC probes speak no TLS.
        args.extend(strings(&[
            "--tls-cert",
            &format!("{WORKER_TLS_DIR}/tls.crt"),
            "--tls-key",
            &format!("{WORKER_TLS_DIR}/tls.key"),
            "--tls-client-ca",
            &format!("{WORKER_TLS_DIR}/ca.crt"),
        ]));
    }
    let mut mounts = vec![mount(TMP_VOLUME, "/tmp", false)];
    if tls {
        mounts.push(mount(TLS_VOLUME, WORKER_TLS_DIR, true));
    }
    if !matches!(group.files, ModelFiles::InImage { .. }) {
        mounts.push(mount(MODEL_VOLUME, MODEL_DIR, true));
    }
    if topology.tensor > 1 {
        mounts.push(mount(SHM_VOLUME, "/dev/shm", false));
    }
    let leader = local == 0;
    Container {
        name,
        image: Some(group.image.to_string()),
        args: Some(args),
        env: Some(env),
        ports: leader.then(|| {
            vec![
                container_port(GRPC_PORT_NAME, GRPC_PORT),
                container_port(METRICS_PORT_NAME, METRICS_PORT),
                container_port(COORDINATOR_PORT_NAME, COORDINATOR_PORT),
            ]
        }),
        // The first rank of every pod serves gRPC health, SERVING once the whole
        // group has met (rank 0 beside the Inference API, a follower alone):
        // until then the pod is not ready. The router sees pod 0 only.
        readiness_probe: leader.then(|| grpc_probe(5, 3)),
        // A startup probe would restart a pod while it waits for the others
        // to start (its ranks wait for the group as long as they need), so
        // only groups of one pod have it.
        startup_probe: (leader && topology.pods_per_group == 1).then(|| {
            grpc_probe(
                STARTUP_PERIOD_SECONDS,
                RENDEZVOUS_SECONDS / STARTUP_PERIOD_SECONDS,
            )
        }),
        resources: Some(resources(group, true)),
        volume_mounts: Some(mounts),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

/// `shardserve model fetch SOURCE --cache /models` before the ranks start.
fn fetch_container(group: &GroupContext<'_>, source: &str) -> Container {
    Container {
        name: "fetch-model".into(),
        image: Some(group.image.to_string()),
        // It answers the operator's progress questions on the pod's gRPC port
        // until the ranks start.
        args: Some(strings(&[
            "model",
            "fetch",
            source,
            "--cache",
            MODEL_DIR,
            "--progress-addr",
            &format!("0.0.0.0:{GRPC_PORT}"),
        ])),
        env: Some(fetch_env(group)).filter(|env| !env.is_empty()),
        resources: Some(resources(group, false)),
        volume_mounts: Some(vec![
            mount(TMP_VOLUME, "/tmp", false),
            mount(MODEL_VOLUME, MODEL_DIR, false),
        ]),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

/// The fetch's `HF_TOKEN` (from the spec's Secret) and `HF_ENDPOINT` (the
/// operator's Hub mirror), where set.
fn fetch_env(group: &GroupContext<'_>) -> Vec<EnvVar> {
    let token = group
        .md
        .spec
        .model
        .token_secret
        .as_ref()
        .map(|secret| EnvVar {
            name: "HF_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone().unwrap_or_else(|| "token".into()),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    let endpoint = group.hub_endpoint.map(|url| EnvVar {
        name: "HF_ENDPOINT".into(),
        value: Some(url.into()),
        ..EnvVar::default()
    });
    token.into_iter().chain(endpoint).collect()
}

/// CPU and memory from `spec.resources`; a rank adds its GPUs (as requests
/// and limits: extended resources cannot be overcommitted).
fn resources(group: &GroupContext<'_>, with_gpus: bool) -> ResourceRequirements {
    let spec = &group.md.spec;
    // On GPUs the one rank container holds every rank of the pod (see the module).
    let ranks = match group.cuda {
        true => group.topology.ranks_per_pod.max(1),
        false => 1,
    };
    let gpus = with_gpus.then(|| {
        (
            spec.gpu.resource_name.clone(),
            Quantity((spec.gpu.per_rank * ranks).to_string()),
        )
    });
    let amounts = |cpu_memory: Option<&CpuMemory>| {
        let mut map = BTreeMap::new();
        if let Some(cm) = cpu_memory {
            if let Some(cpu) = &cm.cpu {
                map.insert("cpu".to_string(), cpu.clone());
            }
            if let Some(memory) = &cm.memory {
                map.insert("memory".to_string(), memory.clone());
            }
        }
        map.extend(gpus.clone());
        (!map.is_empty()).then_some(map)
    };
    let resources = spec.resources.as_ref();
    ResourceRequirements {
        requests: amounts(resources.and_then(|r| r.requests.as_ref())),
        limits: amounts(resources.and_then(|r| r.limits.as_ref())),
        claims: None,
    }
}

/// The user's affinity, plus a preference to put groups on different nodes
/// (a node's loss then takes one copy of the model, not all).
fn affinity(group: &GroupContext<'_>) -> Affinity {
    let mut affinity = group.md.spec.affinity.clone().unwrap_or_default();
    let spread = WeightedPodAffinityTerm {
        weight: 100,
        pod_affinity_term: PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_labels: Some(labels([(MODEL_DEPLOYMENT_LABEL, group.md.name())])),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: GROUP_LABEL.into(),
                    operator: "NotIn".into(),
                    values: Some(vec![group.id.to_string()]),
                }]),
            }),
            topology_key: "kubernetes.io/hostname".into(),
            ..PodAffinityTerm::default()
        },
    };
    let anti = affinity
        .pod_anti_affinity
        .get_or_insert_with(PodAntiAffinity::default);
    anti.preferred_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new)
        .push(spread);
    affinity
}

fn grpc_probe(period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: GRPC_PORT,
            service: None,
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

/// Where fetched weights go: the spec's cache that outlives pods (filled once,
/// found in place by every later fetch), else the pod's own `emptyDir`.
fn model_cache(group: &GroupContext<'_>) -> Volume {
    let cache = group.md.spec.model.cache.as_ref();
    match (
        cache.and_then(|c| c.claim_name.as_ref()),
        cache.and_then(|c| c.host_path.as_ref()),
    ) {
        (Some(claim), _) => Volume {
            name: MODEL_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Volume::default()
        },
        (None, Some(path)) => Volume {
            name: MODEL_VOLUME.into(),
            host_path: Some(HostPathVolumeSource {
                path: path.clone(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Volume::default()
        },
        (None, None) => empty_dir(MODEL_VOLUME, None),
    }
}

fn empty_dir(name: &str, medium: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(Into::into),
            size_limit: None,
        }),
        ..Volume::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}
