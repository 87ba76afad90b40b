//! The TCP backend: ranks in separate processes or hosts, joined in a ring
//! of persistent connections (see `rendezvous`). Algorithms:
//!
//! - all-reduce: ring all-gather of the whole buffers, then every rank sums
//!   them in rank order, so every element is summed in one order whatever
//!   the buffer's length (a batch's tokens get the numbers they would alone);
//! - all-gather, barrier: ring all-gather; broadcast: a chain from rank 0.
//!
//! Every rank ends with bit-identical results. Large frames are
//! written by a helper thread while the caller reads, so a full ring of
//! writers cannot deadlock; small frames are written inline (lower latency).

mod rendezvous;
mod wire;

use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};

use super::element::{self, Element};
use super::{Collective, CommConfig, CommError, HostSlice, HostSliceMut, HostVec, RankId};
use wire::{Link, Op, Tag};

/// Frames up to this many bytes are written inline rather than from a
/// sender thread.
const SMALL_BYTES: usize = 32 * 1024;

/// One rank of a TCP group.
#[derive(Debug)]
pub(crate) struct TcpGroup {
    rank: RankId,
    world: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    next: Link,
    prev: Link,
    seq: u32,
    /// Set by the first failure: the links are then in an unknown state.
    broken: Option<String>,
}

impl TcpGroup {
    pub(crate) fn connect(cfg: &CommConfig) -> Result<Self, CommError> {
        let ring = rendezvous::meet(cfg)?;
        tracing::info!(
            rank = cfg.rank.0,
            world = cfg.world_size,
            "tcp collective group joined"
        );
        Ok(Self {
            rank: cfg.rank,
            world: cfg.world_size,
            state: Mutex::new(State {
                next: ring.next,
                prev: ring.prev,
                seq: 0,
                broken: None,
            }),
        })
    }

    /// Runs one collective under the lock; a failure breaks the group.
    fn run<R>(
        &self,
        op: Op,
        dtype: u8,
        body: impl FnOnce(&mut Ring<'_, '_>) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| CommError::Broken("a collective panicked".into()))?;
        if let Some(why) = &st.broken {
            return Err(CommError::Broken(why.clone()));
        }
        st.seq = st.seq.wrapping_add(1);
        let tag = Tag {
            op,
            dtype,
            seq: st.seq,
        };
        let State { next, prev, .. } = &mut *st;
        let result = std::thread::scope(|scope| {
            let mut ring = Ring {
                rank: self.rank.0,
                world: self.world,
                tag,
                prev,
                out: Outbox::Inline(next),
                scope,
            };
            let result = body(&mut ring);
            let flushed = ring.out.finish();
            result.and_then(|r| flushed.map(|()| r))
        });
        if let Err(e) = &result {
            st.broken = Some(e.to_string());
        }
        result
    }

    fn reduce<T: Element>(&self, data: &mut [T]) -> Result<(), CommError> {
        if self.world == 1 || data.is_empty() {
            return Ok(());
        }
        // Every rank gathers every contribution and sums them in rank order:
        // each element's sum then has one order whatever the buffer's length,
        // so a token's numbers do not depend on the batch it runs in (a ring
        // reduce-scatter would add each chunk in a different order, and the
        // chunks move with the length). It sends (n-1)/n more bytes than a
        // ring for three ranks; on CPU groups the products, not the wire,
        // set the pace.
        self.run(Op::AllReduce, T::DTYPE.code(), |ring| {
            let blocks = ring.all_gather(element::encode(data))?;
            if let Some(r) = blocks.iter().position(|b| b.len() != data.len() * T::SIZE) {
                return Err(ring.mismatch(r, blocks[r].len(), data.len() * T::SIZE));
            }
            element::sum_in_rank_order(&blocks, data);
            Ok(())
        })
    }

    fn gather<T: Element>(&self, data: &[T]) -> Result<Vec<T>, CommError> {
        if self.world == 1 {
            return Ok(data.to_vec());
        }
        let blocks: Vec<Vec<u8>> = self.run(Op::AllGather, T::DTYPE.code(), |ring| {
            ring.all_gather(element::encode(data))
        })?;
        Ok(element::concat(&blocks))
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> RankId {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
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
        if self.world == 1 {
            return Ok(bytes);
        }
        self.run(Op::Broadcast, 0, |ring| {
            // A chain 0 → 1 → … → n-1: no cycle, so inline writes are safe.
            let bytes = if ring.rank == 0 {
                bytes
            } else {
                ring.prev.recv(ring.tag)?
            };
            if ring.rank + 1 < ring.world {
                ring.out.send(ring.scope, ring.tag, bytes.clone())?;
            }
            Ok(bytes)
        })
    }
    fn barrier(&self) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        self.run(Op::Barrier, 0, |ring| {
            ring.all_gather(Vec::new()).map(|_| ())
        })
    }
}

/// One collective in progress: this rank's place in the ring and its links.
struct Ring<'scope, 'env> {
    rank: usize,
    world: usize,
    tag: Tag,
    prev: &'env mut Link,
    out: Outbox<'scope, 'env>,
    scope: &'scope Scope<'scope, 'env>,
}

impl Ring<'_, '_> {
    /// Every rank's block, in rank order: at step s, pass on the block of
    /// rank (me - s) and receive the block of rank (me - s - 1).
    fn all_gather(&mut self, own: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        let n = self.world;
        let mut blocks = vec![Vec::new(); n];
        blocks[self.rank] = own;
        for s in 0..n - 1 {
            let send = (self.rank + n - s) % n;
            let recv = (self.rank + 2 * n - s - 1) % n;
            self.out.send(self.scope, self.tag, blocks[send].clone())?;
            blocks[recv] = self.prev.recv(self.tag)?;
        }
        Ok(blocks)
    }

    fn mismatch(&self, rank: usize, got: usize, want: usize) -> CommError {
        CommError::Protocol {
            rank: RankId(rank),
            op: self.tag.op.name(),
            detail: format!(
                "{got} bytes where this rank has {want} (buffers of different lengths)"
            ),
        }
    }
}

/// Where this rank's outgoing frames go: written inline while they are
/// small; from the first large frame on, queued to a writer thread (so
/// frame order is kept) which writes while the caller reads.
enum Outbox<'scope, 'env> {
    Inline(&'env mut Link),
    Threaded {
        queue: std::sync::mpsc::Sender<(Tag, Vec<u8>)>,
        writer: ScopedJoinHandle<'scope, Result<(), CommError>>,
    },
    Done,
}

impl<'scope, 'env> Outbox<'scope, 'env> {
    fn send(
        &mut self,
        scope: &'scope Scope<'scope, 'env>,
        tag: Tag,
        frame: Vec<u8>,
    ) -> Result<(), CommError> {
        if let Outbox::Inline(link) = self {
            if frame.len() <= SMALL_BYTES {
                return link.send(tag, &frame);
            }
            let Outbox::Inline(link) = std::mem::replace(self, Outbox::Done) else {
                unreachable!("matched above")
            };
            let (queue, frames) = std::sync::mpsc::channel::<(Tag, Vec<u8>)>();
            let writer = scope.spawn(move || {
                for (tag, frame) in frames {
                    link.send(tag, &frame)?;
                }
                Ok(())
            });
            *self = Outbox::Threaded { queue, writer };
        }
        match self {
            Outbox::Threaded { queue, .. } => {
                // The writer only hangs up after a write error: report it.
                if queue.send((tag, frame)).is_err() {
                    return std::mem::replace(self, Outbox::Done).finish();
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Waits until every queued frame is written.
    fn finish(self) -> Result<(), CommError> {
        match self {
            Outbox::Threaded { queue, writer } => {
                drop(queue);
                writer
                    .join()
                    .unwrap_or_else(|_| Err(CommError::Broken("the ring writer panicked".into())))
            }
            _ => Ok(()),
        }
    }
}
