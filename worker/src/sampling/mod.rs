//! Token selection on plain data.
//!
//! The engine hands this module one row of natural logits per sequence (a
//! `&[f32]` over the whole vocabulary) and gets a token id back. [`Sampler`]
//! owns a sequence's seeded RNG and applies its [`SamplingParams`];
//! [`log_softmax`], [`logprobs_of`] and [`argmax`] answer logprob requests
//! from the raw logits; [`StopMatcher`] holds back streamed text that could
//! still become a stop string. Nothing here touches tensors or I/O.

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
