//! Collectives between the ranks of a tensor-parallel group.
//!
//! The model's row-parallel layers call `all_reduce_sum` after their partial
//! products; the leader broadcasts each step's plan. `SingleRank` is the
//! group of one (no communication at all); the TCP, in-process and NCCL
//! backends of the tensor-parallelism issue implement the same trait.

use candle_core::{Result, Tensor};

/// Position of this process in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RankId(pub usize);

/// Operations every rank of a group calls in the same order.
pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> RankId;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `t` over all ranks; every rank gets the result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Concatenation of every rank's `t` along `dim`, in rank order.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// Rank 0's `bytes` on every rank (other ranks' input is ignored).
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A group of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> RankId {
        RankId(0)
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
