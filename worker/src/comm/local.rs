//! Ranks as threads of one process, for unit tests of the sharded model.
//!
//! Every collective is one *exchange*: each rank deposits its bytes, the
//! last to arrive publishes the round's blocks, and every rank computes its
//! result from them in rank order (so results are bit-identical, and equal
//! to the TCP backend's small-message path).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::element::{self, Element};
use super::{Collective, CommError, HostSlice, HostSliceMut, HostVec, RankId};

/// Constructor of an in-process group.
pub struct LocalGroup;

impl LocalGroup {
    /// `world` handles, one per rank (hand each to its own thread). A rank
    /// that waits more than 30 s for the others gets `CommError::Timeout`.
    // A group is its handles: one per rank thread, nothing else to own.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<Arc<dyn Collective>> {
        Self::with_timeout(world, Duration::from_secs(30))
    }

    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<Arc<dyn Collective>> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(Round {
                generation: 0,
                deposits: vec![None; world],
                arrived: 0,
                published: Arc::new(Vec::new()),
            }),
            turned: Condvar::new(),
        });
        (0..world)
            .map(|r| {
                Arc::new(LocalRank {
                    rank: RankId(r),
                    shared: shared.clone(),
                }) as Arc<dyn Collective>
            })
            .collect()
    }
}

#[derive(Debug)]
struct Round {
    generation: u64,
    deposits: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// The blocks of the last completed round, in rank order.
    published: Arc<Vec<Vec<u8>>>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<Round>,
    turned: Condvar,
}

#[derive(Debug)]
struct LocalRank {
    rank: RankId,
    shared: Arc<Shared>,
}

impl LocalRank {
    fn exchange(&self, op: &'static str, bytes: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>, CommError> {
        let s = &self.shared;
        let broken = |e: String| CommError::Broken(e);
        let mut round = s.state.lock().map_err(|e| broken(e.to_string()))?;
        let generation = round.generation;
        round.deposits[self.rank.0] = Some(bytes);
        round.arrived += 1;
        if round.arrived == s.world {
            let blocks = round
                .deposits
                .iter_mut()
                .map(|d| d.take().unwrap_or_default())
                .collect();
            round.published = Arc::new(blocks);
            round.arrived = 0;
            round.generation += 1;
            s.turned.notify_all();
            return Ok(round.published.clone());
        }
        let deadline = Instant::now() + s.timeout;
        while round.generation == generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing = round.deposits.iter().position(Option::is_none).unwrap_or(0);
                return Err(CommError::Timeout {
                    rank: RankId(missing),
                    op,
                    after: s.timeout,
                });
            }
            round = s
                .turned
                .wait_timeout(round, left)
                .map_err(|e| broken(e.to_string()))?
                .0;
        }
        Ok(round.published.clone())
    }

    fn reduce<T: Element>(&self, data: &mut [T]) -> Result<(), CommError> {
        let blocks = self.exchange("all_reduce", element::encode(data))?;
        check_lengths(&blocks, data.len() * T::SIZE)?;
        element::sum_in_rank_order(&blocks, data);
        Ok(())
    }

    fn gather<T: Element>(&self, data: &[T]) -> Result<Vec<T>, CommError> {
        let blocks = self.exchange("all_gather", element::encode(data))?;
        Ok(element::concat(&blocks))
    }
}

fn check_lengths(blocks: &[Vec<u8>], want: usize) -> Result<(), CommError> {
    match blocks.iter().position(|b| b.len() != want) {
        None => Ok(()),
        Some(r) => Err(CommError::Protocol {
            rank: RankId(r),
            op: "all_reduce",
            detail: format!("{} bytes where this rank has {want}", blocks[r].len()),
        }),
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> RankId {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce(&self, data: HostSliceMut<'_>) -> Result<(), CommError> {
        match data {
            HostSliceMut::F32(d) => self.reduce(d),
            HostSliceMut::F64(d) => self.reduce(d),
            HostSliceMut::F16(d) => self.reduce(d),
            HostSliceMut::BF16(d) => self.reduce(d),
        }
    }
    fn all_gather_host(&self, data: HostSlice<'_>) -> Result<HostVec, CommError> {
        Ok(match data {
            HostSlice::F32(d) => self.gather(d)?.into(),
            HostSlice::F64(d) => self.gather(d)?.into(),
            HostSlice::F16(d) => self.gather(d)?.into(),
            HostSlice::BF16(d) => self.gather(d)?.into(),
        })
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        let mine = if self.rank.0 == 0 { bytes } else { Vec::new() };
        Ok(self.exchange("broadcast", mine)?[0].clone())
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}
