//! Topology and memory planning: pure functions from a spec, the model's
//! shape and the GPU's memory to the groups, pods and ranks the operator
//! creates, and whether the model fits with how long a context it leaves.
//! `shardserve plan` prints it; the operator refuses with a `Degraded`
//! condition what does not fit.

mod bytes;
mod shape;
#[cfg(test)]
mod tests;

use std::fmt;

use crate::crd::{DEFAULT_GPU_MEMORY_UTILIZATION_PERCENT, ModelDeploymentSpec};

pub use bytes::{BytesError, gib, parse_bytes};
pub use shape::{DEFAULT_BYTES_PER_WEIGHT, Shape};

/// Memory each GPU keeps for everything but weights and KV cache: the CUDA
/// context (~0.5 GiB), collective buffers, and the activations of one
/// prefill chunk. A round 2 GiB, on the safe side for models up to 70B.
pub const RUNTIME_OVERHEAD_BYTES: u64 = 2 << 30;

/// What the operator will create for a spec, and whether it can run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Replica groups (`spec.replicas`).
    pub groups: u32,
    /// Pods of one group: one per node the group spans.
    pub pods_per_group: u32,
    /// Ranks in each pod.
    pub ranks_per_pod: u32,
    /// GPUs each pod requests.
    pub gpus_per_pod: u32,
    /// Weights in every GPU.
    pub weight_bytes_per_gpu: u64,
    /// GPU memory left for the KV cache after weights and runtime overhead.
    pub kv_cache_bytes_per_gpu: u64,
    /// KV cache one token takes in every GPU.
    pub kv_bytes_per_token_per_gpu: u64,
    /// Tokens the KV cache of one group holds: the longest context a single
    /// sequence can reach.
    pub max_context_tokens: u64,
    /// Why it cannot run (empty when it fits).
    pub reasons: Vec<Misfit>,
}

impl Plan {
    /// Whether the spec runs as written.
    pub fn fits(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// One reason a spec cannot run, with the numbers that make it so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Misfit {
    HeadsNotDivisible { tensor: u64, heads: u64 },
    KvHeadsIncompatible { tensor: u64, kv_heads: u64 },
    IntermediateNotDivisible { tensor: u64, intermediate: u64 },
    RankWiderThanNode { per_rank: u32, per_node: u32 },
    UnevenPods { tensor: u32, ranks_per_node: u32 },
    WeightsTooBig { needed: u64, usable: u64 },
    ContextTooShort { max_seq_len: u32, max_context: u64 },
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::HeadsNotDivisible { tensor, heads } => write!(
                f,
                "spec.tensor: {tensor} does not divide the {heads} attention heads"
            ),
            Self::KvHeadsIncompatible { tensor, kv_heads } => write!(
                f,
                "spec.tensor: {tensor} neither divides nor is a multiple of the {kv_heads} KV heads"
            ),
            Self::IntermediateNotDivisible {
                tensor,
                intermediate,
            } => write!(
                f,
                "spec.tensor: {tensor} does not divide the MLP's intermediate size {intermediate}"
            ),
            Self::RankWiderThanNode { per_rank, per_node } => write!(
                f,
                "spec.gpu.perRank: {per_rank} GPUs per rank exceed the {per_node} GPUs of a node"
            ),
            Self::UnevenPods {
                tensor,
                ranks_per_node,
            } => write!(
                f,
                "spec.tensor: {tensor} ranks do not split evenly over nodes of {ranks_per_node} ranks"
            ),
            Self::WeightsTooBig { needed, usable } => write!(
                f,
                "weights and runtime need {} per GPU, more than the {} usable",
                gib(needed),
                gib(usable)
            ),
            Self::ContextTooShort {
                max_seq_len,
                max_context,
            } => write!(
                f,
                "spec.engine.maxSeqLen: {max_seq_len} tokens exceed the {max_context} the KV cache holds"
            ),
        }
    }
}

/// Plans `spec` for a model of `shape` on GPUs of `gpu_memory` bytes.
pub fn plan(spec: &ModelDeploymentSpec, shape: &Shape, gpu_memory: u64) -> Plan {
    let mut reasons = Vec::new();
    let tensor = u64::from(spec.tensor.max(1));
    if !shape.heads.is_multiple_of(tensor) {
        reasons.push(Misfit::HeadsNotDivisible {
            tensor,
            heads: shape.heads,
        });
    }
    if !(shape.kv_heads.is_multiple_of(tensor) || tensor.is_multiple_of(shape.kv_heads.max(1))) {
        reasons.push(Misfit::KvHeadsIncompatible {
            tensor,
            kv_heads: shape.kv_heads,
        });
    }
    if !shape.intermediate_size.is_multiple_of(tensor) {
        reasons.push(Misfit::IntermediateNotDivisible {
            tensor,
            intermediate: shape.intermediate_size,
        });
    }

    let (pods_per_group, ranks_per_pod) = topology(spec, &mut reasons);
    let per_rank = u64::from(spec.gpu.per_rank.max(1));

    // A rank of several GPUs spreads its share over them evenly.
    let weight_bytes_per_gpu =
        (shape.rank_params(tensor) as f64 * shape.bytes_per_weight).ceil() as u64 / per_rank;
    let kv_dtype = spec.engine.kv_cache_dtype.unwrap_or_default();
    let kv_bytes_per_token_per_gpu =
        shape.rank_kv_bytes_per_token(tensor, kv_dtype.bytes()) / per_rank;
    let percent = spec
        .engine
        .gpu_memory_utilization_percent
        .unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION_PERCENT);
    let usable = (u128::from(gpu_memory) * u128::from(percent) / 100) as u64;
    let needed = weight_bytes_per_gpu.saturating_add(RUNTIME_OVERHEAD_BYTES);
    let kv_cache_bytes_per_gpu = usable.saturating_sub(needed);
    if needed > usable {
        reasons.push(Misfit::WeightsTooBig { needed, usable });
    }
    let max_context_tokens = kv_cache_bytes_per_gpu / kv_bytes_per_token_per_gpu.max(1);
    if let Some(max_seq_len) = spec.engine.max_seq_len
        && needed <= usable
        && u64::from(max_seq_len) > max_context_tokens
    {
        reasons.push(Misfit::ContextTooShort {
            max_seq_len,
            max_context: max_context_tokens,
        });
    }
    Plan {
        groups: spec.replicas,
        pods_per_group,
        ranks_per_pod,
        gpus_per_pod: ranks_per_pod.saturating_mul(spec.gpu.per_rank),
        weight_bytes_per_gpu,
        kv_cache_bytes_per_gpu,
        kv_bytes_per_token_per_gpu,
        max_context_tokens,
        reasons,
    }
}

/// How a group is laid out over pods, as [`plan`] computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Pods of one group: one per node the group spans.
    pub pods_per_group: u32,
    /// Ranks in each pod.
    pub ranks_per_pod: u32,
}

/// The pod layout of `spec` alone (no model shape, no GPU memory), and why
/// it cannot run (empty when it can): what the operator needs when the
/// model's shape is unknown.
pub fn layout(spec: &ModelDeploymentSpec) -> (Layout, Vec<Misfit>) {
    let mut reasons = Vec::new();
    let (pods_per_group, ranks_per_pod) = topology(spec, &mut reasons);
    let layout = Layout {
        pods_per_group,
        ranks_per_pod,
    };
    (layout, reasons)
}

/// Pods per group and ranks per pod: a group fills nodes, one pod per node.
fn topology(spec: &ModelDeploymentSpec, reasons: &mut Vec<Misfit>) -> (u32, u32) {
    let tensor = spec.tensor.max(1);
    let (per_rank, per_node) = (spec.gpu.per_rank.max(1), spec.gpu.per_node.max(1));
    let ranks_per_node = per_node / per_rank;
    if ranks_per_node == 0 {
        reasons.push(Misfit::RankWiderThanNode { per_rank, per_node });
        return (tensor, 1);
    }
    let ranks_per_pod = tensor.min(ranks_per_node);
    if !tensor.is_multiple_of(ranks_per_pod) {
        reasons.push(Misfit::UnevenPods {
            tensor,
            ranks_per_node,
        });
    }
    (tensor.div_ceil(ranks_per_pod), ranks_per_pod)
}
