//! Collectives between the ranks of a tensor-parallel group.
//!
//! The model's row-parallel layers call `all_reduce_sum` after their partial
//! products; the leader broadcasts each step's plan. `SingleRank` is the
//! group of one (no communication at all); the TCP, in-process and NCCL
//! backends of the tensor-parallelism issue implement the same trait.

/// Position of this process in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RankId(pub usize);

/// Why a collective failed: a peer died, stalled or broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("collective {op} failed: {reason}")]
    Failed { op: &'static str, reason: String },
}

/// Operations every rank of a group calls in the same order.
pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> RankId;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `data` over all ranks, in place on every rank.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `data` concatenated in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError>;
    /// Rank 0's `bytes` on every rank (other ranks' input is ignored).
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;
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
    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(data.to_vec())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        Ok(bytes)
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}
