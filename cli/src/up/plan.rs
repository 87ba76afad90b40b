//! The local topology of a set of manifests, as plain data: which worker
//! processes to start with which settings. Pure, so it is tested without
//! starting anything; ports are handed out afterwards by the caller.

use std::path::PathBuf;
use std::time::Duration;

use shardserve_operator::ModelDeployment;
use shardserve_operator::autoscale::Policy;

/// One replica group: `tensor` rank processes (rank 0 serves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerPlan {
    /// `<metadata.name>-<replica>`, how messages name this process.
    pub name: String,
    /// The served model name (what the router routes on).
    pub model: String,
    pub model_path: PathBuf,
    pub max_seq_len: Option<u32>,
    /// Sequences generated at once (`spec.engine.maxNumSeqs`).
    pub max_num_seqs: Option<u32>,
    /// Compute threads of each rank.
    pub threads: usize,
    /// Ranks in the group (tensor-parallel size).
    pub tensor: usize,
    /// `spec.engine.maxLoras` and `maxLoraRank`.
    pub max_loras: Option<u32>,
    pub max_lora_rank: Option<u32>,
}

/// One deployment: how to start any of its groups, and how many.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentPlan {
    /// `metadata.name`.
    pub name: String,
    /// Its groups' settings (`name` is the deployment's; [`Self::group`] numbers it).
    pub template: WorkerPlan,
    /// Groups to start with: `spec.replicas`, within the autoscaling bounds.
    pub replicas: u32,
    /// The builtin autoscaler's policy; `None`: `replicas` stays.
    pub policy: Option<Policy>,
    /// How long a group leaving waits for its requests to finish.
    pub drain_timeout: Duration,
    /// `spec.loraAdapters` as (name, local path): loaded into each group through
    /// its API once it serves, as the operator does on a cluster.
    pub adapters: Vec<(String, String)>,
}

impl DeploymentPlan {
    /// Group `replica`: `<name>-<replica>`.
    pub fn group(&self, replica: u32) -> WorkerPlan {
        WorkerPlan {
            name: format!("{}-{replica}", self.name),
            ..self.template.clone()
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{file}: spec.replicas: 0 leaves nothing to serve; use replicas: 1 or more, or \
         builtin autoscaling with minReplicas: 0 to start from zero"
    )]
    NoReplicas { file: String },
    #[error("{file}: metadata.name {name:?} is also the name of a deployment in {other}")]
    DuplicateName {
        file: String,
        name: String,
        other: String,
    },
    #[error("{file}: served model name {model:?} is also served by {other}; names must differ")]
    DuplicateModel {
        file: String,
        model: String,
        other: String,
    },
}

/// A checked deployment and its model file on this machine.
pub struct Resolved {
    pub deployment: ModelDeployment,
    pub model_path: PathBuf,
    /// `spec.loraAdapters` as (name, path on this machine).
    pub adapters: Vec<(String, PathBuf)>,
}

/// Refuses what a local run cannot do (before anything is fetched).
pub fn check_local(deployments: &[(String, ModelDeployment)]) -> Result<(), PlanError> {
    for (i, (file, md)) in deployments.iter().enumerate() {
        let builtin = md.spec.autoscaling.as_ref().and_then(Policy::of).is_some();
        if md.spec.replicas == 0 && !builtin {
            return Err(PlanError::NoReplicas { file: file.clone() });
        }
        for (other_file, other) in &deployments[..i] {
            if other.name() == md.name() {
                return Err(PlanError::DuplicateName {
                    file: file.clone(),
                    name: md.name().into(),
                    other: other_file.clone(),
                });
            }
            if other.served_model_name() == md.served_model_name() {
                return Err(PlanError::DuplicateModel {
                    file: file.clone(),
                    model: md.served_model_name().into(),
                    other: other_file.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Every deployment's plan; `cores` are split evenly between the ranks of the
/// groups started first (at least one per deployment) unless `threads` fixes the
/// count per rank.
pub fn plan_deployments(
    resolved: &[Resolved],
    cores: usize,
    threads: Option<usize>,
) -> Vec<DeploymentPlan> {
    let replicas = |md: &ModelDeployment| {
        let policy = md.spec.autoscaling.as_ref().and_then(Policy::of);
        match policy {
            Some(p) => md.spec.replicas.clamp(p.min, p.max),
            None => md.spec.replicas,
        }
    };
    let total: usize = resolved
        .iter()
        .map(|r| {
            let md = &r.deployment;
            replicas(md).max(1) as usize * md.spec.tensor.max(1) as usize
        })
        .sum();
    let threads = threads.unwrap_or_else(|| (cores / total.max(1)).max(1));
    resolved
        .iter()
        .map(|r| {
            let md = &r.deployment;
            DeploymentPlan {
                name: md.name().to_string(),
                template: WorkerPlan {
                    name: md.name().to_string(),
                    model: md.served_model_name().to_string(),
                    model_path: r.model_path.clone(),
                    max_seq_len: md.spec.engine.max_seq_len,
                    max_num_seqs: md.spec.engine.max_num_seqs,
                    threads,
                    tensor: md.spec.tensor.max(1) as usize,
                    max_loras: md.spec.engine.max_loras,
                    max_lora_rank: md.spec.engine.max_lora_rank,
                },
                replicas: replicas(md),
                policy: md.spec.autoscaling.as_ref().and_then(Policy::of),
                drain_timeout: md.spec.drain_timeout(),
                adapters: r
                    .adapters
                    .iter()
                    .map(|(name, path)| (name.clone(), path.display().to_string()))
                    .collect(),
            }
        })
        .collect()
}

/// The groups started first: every deployment's `replicas`, numbered from 0.
#[cfg(test)]
fn plan_workers(resolved: &[Resolved], cores: usize, threads: Option<usize>) -> Vec<WorkerPlan> {
    plan_deployments(resolved, cores, threads)
        .iter()
        .flat_map(|d| (0..d.replicas).map(|r| d.group(r)))
        .collect()
}

#[cfg(test)]
mod tests {
    use shardserve_operator::parse_manifests;

    use super::*;

    fn md(name: &str, extra: &str) -> ModelDeployment {
        let text = format!(
            "apiVersion: shardserve.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n  model:\n    source: file:///m.gguf\n{extra}"
        );
        parse_manifests(&text).unwrap().remove(0)
    }

    fn resolved(md: ModelDeployment) -> Resolved {
        Resolved {
            deployment: md,
            model_path: "/m.gguf".into(),
            adapters: Vec::new(),
        }
    }

    #[test]
    fn tensor_parallel_groups_split_the_cores_between_ranks() {
        let plans = plan_workers(
            &[resolved(md("a", "  tensor: 3\n  replicas: 2\n"))],
            12,
            None,
        );
        assert_eq!(plans.len(), 2);
        assert!(plans.iter().all(|p| p.tensor == 3 && p.threads == 2));
    }

    #[test]
    fn zero_replicas_and_duplicates_are_refused() {
        let err = check_local(&[("a.yaml".into(), md("a", "  replicas: 0\n"))]).unwrap_err();
        assert!(err.to_string().contains("spec.replicas: 0"), "{err}");
        // From zero is what builtin autoscaling is for.
        let scaled = md(
            "a",
            "  replicas: 0\n  autoscaling:\n    minReplicas: 0\n    maxReplicas: 2\n    targetInFlightRequests: 4\n",
        );
        check_local(&[("a.yaml".into(), scaled.clone())]).unwrap();
        let plans = plan_deployments(&[resolved(scaled)], 4, None);
        assert_eq!(plans[0].replicas, 0);
        assert_eq!(plans[0].policy.unwrap().max, 2);
        assert_eq!(plans[0].group(1).name, "a-1");
        assert_eq!(plans[0].template.threads, 4);
        let err = check_local(&[
            ("a.yaml".into(), md("a", "")),
            ("b.yaml".into(), md("b", "  servedModelName: a\n")),
        ])
        .unwrap_err();
        assert!(matches!(err, PlanError::DuplicateModel { .. }), "{err}");
    }

    #[test]
    fn replicas_become_named_workers_sharing_the_cores() {
        let plans = plan_workers(
            &[
                resolved(md("a", "  replicas: 2\n  engine:\n    maxSeqLen: 512\n")),
                resolved(md("b", "  servedModelName: bee\n")),
            ],
            8,
            None,
        );
        let names: Vec<_> = plans
            .iter()
            .map(|p| (p.name.as_str(), p.model.as_str()))
            .collect();
        assert_eq!(names, [("a-0", "a"), ("a-1", "a"), ("b-0", "bee")]);
        assert!(plans.iter().all(|p| p.threads == 2));
        assert_eq!(plans[0].max_seq_len, Some(512));
        assert_eq!(plans[2].max_seq_len, None);
        let one = plan_workers(&[resolved(md("a", "  replicas: 4\n"))], 2, None);
        assert!(one.iter().all(|p| p.threads == 1));
        let fixed = plan_workers(&[resolved(md("a", ""))], 2, Some(6));
        assert_eq!(fixed[0].threads, 6);
    }
}
