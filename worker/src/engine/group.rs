//! Ranks of a tensor-parallel group stepping together. The leader (rank 0)
//! schedules, samples and talks to clients; before each forward pass it
//! broadcasts the step's plan (which sequences, their tokens, positions and
//! KV cache block tables), and every follower runs the same forward pass on
//! its shard, writing its part of the keys and values into the same blocks.
//! Block bookkeeping lives on the leader alone; nothing else flows between
//! ranks but the all-reduces inside the model.

use serde::{Deserialize, Serialize};

use super::EngineError;
use crate::comm::{Collective, CommError};
use crate::kv::BlockId;
use crate::model::{LogitsFor, SeqSpan, StepModel};

/// What the leader tells the followers, once per step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GroupMessage {
    /// Run one forward pass over `spans`.
    Step { spans: Vec<PlannedSpan> },
    /// Nothing to do now; the leader is alive (it sends this while idle, so
    /// a follower's timeout only fires when the leader is really gone).
    Heartbeat,
    /// Load the adapter at `path` (checked by the leader) into `slot`; every
    /// rank then says whether it could.
    LoadAdapter { slot: u32, path: std::path::PathBuf },
    /// Drop the adapter in `slot`.
    UnloadAdapter { slot: u32 },
    /// The leader is shutting down: exit.
    Stop,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedSpan {
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub blocks: Vec<BlockId>,
    /// The adapter slot the sequence runs with.
    #[serde(default)]
    pub adapter: Option<u32>,
}

impl GroupMessage {
    pub fn step(spans: &[SeqSpan<'_>]) -> Self {
        GroupMessage::Step {
            spans: spans
                .iter()
                .map(|s| PlannedSpan {
                    tokens: s.tokens.to_vec(),
                    start_pos: s.start_pos,
                    blocks: s.blocks.to_vec(),
                    adapter: s.adapter,
                })
                .collect(),
        }
    }
}

/// Leader side: sends `message` to every follower.
pub fn announce(comm: &dyn Collective, message: &GroupMessage) -> Result<(), CommError> {
    let bytes = serde_json::to_vec(message).map_err(|e| CommError::Failed {
        op: "announce",
        reason: e.to_string(),
    })?;
    comm.broadcast_bytes(bytes).map(|_| ())
}

/// Follower side: runs the leader's steps on this rank's shard until the
/// leader says stop (`Ok`) or the group breaks (`Err`).
pub fn follow(model: &mut dyn StepModel, comm: &dyn Collective) -> Result<(), EngineError> {
    loop {
        let bytes = comm
            .broadcast_bytes(Vec::new())
            .map_err(crate::model::ModelError::from)?;
        let message: GroupMessage = serde_json::from_slice(&bytes).map_err(|e| {
            crate::model::ModelError::from(CommError::Failed {
                op: "follow",
                reason: format!("unreadable step plan from the leader: {e}"),
            })
        })?;
        let planned = match message {
            GroupMessage::Stop => return Ok(()),
            GroupMessage::Heartbeat => continue,
            GroupMessage::LoadAdapter { slot, path } => {
                super::adapters::follow_load(model, comm, slot, &path)?;
                continue;
            }
            GroupMessage::UnloadAdapter { slot } => {
                model.unload_adapter(slot);
                continue;
            }
            GroupMessage::Step { spans } => spans,
        };
        // The head is replicated and only the leader samples: followers skip the logits.
        let spans: Vec<SeqSpan<'_>> = planned
            .iter()
            .map(|p| SeqSpan {
                tokens: &p.tokens,
                start_pos: p.start_pos,
                blocks: &p.blocks,
                logits: LogitsFor::None,
                adapter: p.adapter,
            })
            .collect();
        super::pool::forward(model, &spans)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_plans_survive_the_wire() {
        let spans = [SeqSpan {
            tokens: &[1, 2, 3],
            start_pos: 7,
            blocks: &[4, 0, 9],
            logits: LogitsFor::Last,
            adapter: None,
        }];
        let message = GroupMessage::step(&spans);
        let bytes = serde_json::to_vec(&message).unwrap();
        assert_eq!(
            serde_json::from_slice::<GroupMessage>(&bytes).unwrap(),
            message
        );
    }
}
