//! `shardserve operator`: the ModelDeployment controller, as the Helm chart
//! runs it (`charts/shardserve/templates/operator-deployment.yaml`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Args;
use shardserve_operator::controller::desired::{NetworkPeers, Peer};
use shardserve_operator::leader::LeaseSettings;
use shardserve_operator::{OperatorSettings, run as run_operator};

/// `--worker-device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerDevice {
    Cpu,
    Cuda,
}

#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Address to serve /healthz, /readyz and /metrics on.
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    /// Image of the worker pods when a ModelDeployment names none (the operator's own).
    #[arg(long, env = "SHARDSERVE_WORKER_IMAGE")]
    pub worker_image: String,
    /// A Hugging Face Hub mirror or proxy for the worker pods' model downloads
    /// (their `HF_ENDPOINT`), for clusters that must not reach the public Hub.
    #[arg(long, env = "SHARDSERVE_HUB_ENDPOINT")]
    pub hub_endpoint: Option<String>,
    /// Where the worker pods' ranks compute: `cuda` when the worker image is a CUDA
    /// build (each rank container then runs `--device cuda:0` on the GPU it is given).
    #[arg(long, env = "SHARDSERVE_WORKER_DEVICE", value_enum, default_value_t = WorkerDevice::Cpu)]
    pub worker_device: WorkerDevice,
    /// Watch ModelDeployments in this namespace only (default: every namespace).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Reconcile only while holding a Lease, so that several replicas can run.
    #[arg(long)]
    pub leader_election: bool,
    /// Namespace of the Lease (default: the pod's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "shardserve-operator")]
    pub leader_election_lease: String,
    /// This replica's name in the Lease and in events (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The router Service, `NAMESPACE/NAME`, whose pods' `/metrics` give the load:
    /// the builtin autoscaler scales on it and draining groups wait for their streams
    /// by it. Without it, builtin autoscaling does nothing and drains last their timeout.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_service)]
    pub router_service: Option<(String, String)>,
    /// Give each ModelDeployment a NetworkPolicy: its rank pods let in only the
    /// routers and the operator (gRPC), the metrics scrapers (metrics port) and the
    /// deployment's own ranks, and reach only their ranks, DNS and, while the model
    /// is fetched, HTTPS (and a Hub mirror's port).
    #[arg(long, requires_all = ["router_pods", "operator_pods"])]
    pub network_policies: bool,
    /// The router pods, `NAMESPACE:key=value,...` (`*` for every namespace).
    #[arg(long, value_name = "NAMESPACE:LABELS")]
    pub router_pods: Option<Peer>,
    /// The operator's own pods, `NAMESPACE:key=value,...`.
    #[arg(long, value_name = "NAMESPACE:LABELS")]
    pub operator_pods: Option<Peer>,
    /// Pods that scrape the workers' metrics port (Prometheus), `NAMESPACE:key=value,...`;
    /// repeat for several. None: nobody may.
    #[arg(long, value_name = "NAMESPACE:LABELS")]
    pub metrics_scrapers: Vec<Peer>,
}

fn parse_service(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("expected NAMESPACE/NAME, got {text:?}")),
    }
}

pub fn run(args: OperatorArgs) -> Result<()> {
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("shardserve-operator-{}", std::process::id()));
    let leader_election = args.leader_election.then(|| LeaseSettings {
        namespace: args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: args.leader_election_lease.clone(),
        identity: identity.clone(),
    });
    let settings = OperatorSettings {
        health_addr: args.health_addr,
        worker_image: args.worker_image,
        hub_endpoint: args.hub_endpoint.filter(|url| !url.is_empty()),
        worker_cuda: args.worker_device == WorkerDevice::Cuda,
        namespace: args.namespace,
        leader_election,
        identity,
        router_service: args.router_service,
        network: match (args.network_policies, args.router_pods, args.operator_pods) {
            (true, Some(router), Some(operator)) => Some(NetworkPeers {
                router,
                operator,
                scrapers: args.metrics_scrapers,
            }),
            _ => None,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_operator(settings))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: OperatorArgs,
    }

    #[test]
    fn the_charts_flags_parse() {
        let cli = Cli::try_parse_from([
            "operator",
            "--health-addr=0.0.0.0:8081",
            "--worker-image=ghcr.io/shardserve/shardserve:0.1.0",
            "--namespace=models",
            "--leader-election",
            "--leader-election-namespace=shardserve",
            "--leader-election-lease=shardserve-operator",
            "--router-service=shardserve/shardserve-router",
        ])
        .unwrap();
        let a = cli.args;
        assert_eq!(a.health_addr, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(a.worker_image, "ghcr.io/shardserve/shardserve:0.1.0");
        assert_eq!(a.namespace.as_deref(), Some("models"));
        assert!(a.leader_election);
        assert_eq!(a.leader_election_namespace.as_deref(), Some("shardserve"));
        assert_eq!(a.leader_election_lease, "shardserve-operator");
        assert_eq!(
            a.router_service,
            Some(("shardserve".into(), "shardserve-router".into()))
        );
        let bad = Cli::try_parse_from(["operator", "--worker-image=x", "--router-service=router"]);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("expected NAMESPACE/NAME")
        );
    }

    /// The operator points workers at the file `shardserve model fetch`
    /// leaves in the cache; both must agree on the layout.
    #[test]
    fn workers_load_the_file_model_fetch_writes() {
        use shardserve_operator::controller::desired::{MODEL_DIR, ModelFiles};
        let source = shardserve_operator::ModelSource::parse(crate::model::DEMO_SOURCE).unwrap();
        let fetched = crate::model::demo_path(std::path::Path::new(MODEL_DIR));
        assert_eq!(ModelFiles::of(&source).path(), fetched.to_str().unwrap());
    }

    /// The worker accepts the arguments the operator gives rank pods, and every rank
    /// of a group spanning pods gets its own global rank and, with CUDA workers (one
    /// container per pod starting the pod's other ranks), its own GPU of the pod.
    #[test]
    fn rank_pods_arguments_make_every_rank_once() {
        use shardserve_operator::controller::{check::check, desired};
        use shardserve_worker::device::DeviceSpec;
        #[derive(Parser)]
        struct Worker {
            #[command(flatten)]
            args: crate::worker::WorkerArgs,
        }
        let text = include_str!("../../examples/llama-3-70b-2-nodes.yaml");
        let mut md = shardserve_operator::parse_manifests(text)
            .unwrap()
            .remove(0);
        md.metadata.namespace = Some("llm".into());
        md.metadata.uid = Some("uid".into());
        let settings = desired::WorkerSettings {
            image: "shardserve".into(),
            hub_endpoint: None,
            cuda: true,
            network: None,
        };
        let objects = desired::desired(&md, &check(&md).unwrap(), &settings).unwrap();
        let statefulset = &objects.groups[0].statefulset;
        let pod = statefulset
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let mut ranks = Vec::new();
        let parse = |args: Vec<String>| {
            Worker::try_parse_from(std::iter::once("shardserve".to_string()).chain(args))
                .unwrap()
                .args
        };
        assert_eq!(pod.containers.len(), 1);
        for index in 0..2 {
            // What Kubernetes does with $(VAR) in args.
            let args: Vec<String> = pod.containers[0].args.as_ref().unwrap()[1..]
                .iter()
                .map(|a| a.replace("$(SHARDSERVE_POD_INDEX)", &index.to_string()))
                .collect();
            let first = parse(args.clone());
            assert_eq!(first.local_ranks, Some(4));
            // The processes it starts: its arguments, their own --rank.
            let children = (1..4).map(|local| {
                let mut child = crate::worker::child_rank_args(args.clone().into_iter());
                child.extend(["--rank".to_string(), local.to_string()]);
                parse(child)
            });
            for (local, worker) in std::iter::once(first).chain(children).enumerate() {
                let group = worker.global_group().unwrap();
                assert_eq!(group.tensor, 8);
                assert_eq!(
                    group.coordinator.as_deref(),
                    Some("llama-3-70b-2-nodes-g0-0.llama-3-70b-2-nodes-g0.llm.svc:29500")
                );
                assert_eq!(group.device, DeviceSpec::Cuda(Some(local)));
                assert_eq!(worker.local_ranks.is_some(), local == 0);
                ranks.push(group.rank);
            }
        }
        assert_eq!(ranks, (0..8).collect::<Vec<_>>());
    }
}
