//! Token selection on plain data.
//!
//! [`Sampler`] owns a sequence's seeded RNG and turns its [`SamplingParams`] into
//! what picks each next token: its [`Penalties`] and its [`Draw`] (one uniform
//! number a sampled token). [`pick`] picks from one row of natural logits (a
//! `&[f32]` over the whole vocabulary) on the host; a device backend does the same
//! where the logits are. [`log_softmax`], [`logprobs_of`] and [`argmax`] answer
//! logprob requests from the raw logits; [`StopMatcher`] holds back streamed text
//! that could still become a stop string. Nothing here touches tensors or I/O.

mod logprobs;
mod params;
mod penalties;
mod sampler;
mod stop;

pub use logprobs::{TokenLogprob, argmax, log_softmax, logprobs_of};
pub use params::{SamplingError, SamplingParams};
pub use penalties::Penalties;
pub use sampler::{Draw, Sampler, draw, pick};
pub use stop::{StopMatcher, StopStep};
