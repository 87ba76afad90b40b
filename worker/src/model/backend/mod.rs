//! The operations a transformer step is written against, and their two
//! implementations: [`Host`] (the project's CPU kernels on host rows: bit-exact and
//! batch-invariant) and [`Tensors`] (candle tensors on a device: a GPU, or candle's
//! CPU device for tests). The model (`super::Transformer`) and everything above it
//! (scheduler, block manager, sampling) are the same over both.
//!
//! A step begins with [`Backend::begin`], which turns the step's layout (token ids,
//! positions, block tables, the rows whose logits are wanted) into what the backend
//! reads in every layer — on a device, one upload — and ends with
//! [`Backend::download`], the only copy back.

mod host;
mod ops;
pub mod profile;
mod replay;
mod tensors;

pub use host::Host;
pub use replay::replayed_steps;
pub use tensors::{CacheDtype, Tensors};

use candle_core::Device;

use super::rope::Rope;
use super::{ModelError, SeqSpan};
use crate::comm::Collective;
use crate::kv::{KvCacheTooLarge, KvShape};
use crate::sampling::{Draw, Penalties, TokenLogprob, logprobs_of};
use crate::weights::Weight;

/// One step's tokens as every backend needs them, computed once by the model.
#[derive(Debug)]
pub struct StepLayout<'a> {
    pub spans: &'a [SeqSpan<'a>],
    /// Every span's tokens, in order.
    pub ids: Vec<u32>,
    /// The position of each of `ids`.
    pub positions: Vec<usize>,
    /// The rows (indices into `ids`) whose logits are wanted: first those
    /// downloaded whole, in span order, then those scored (`scored`), then the last
    /// rows of the `picked_spans`.
    pub wanted: Vec<usize>,
    /// How many of the rows downloaded whole each span owns.
    pub counts: Vec<usize>,
    /// How many of the rows scored each span owns.
    pub scored_counts: Vec<usize>,
    /// Each row scored: the id it is scored on and how many of the most likely
    /// tokens come with it ([`super::LogitsFor::Score`]).
    pub scored: Vec<(u32, usize)>,
    /// The spans (indices into `spans`) that want only an id picked from their last
    /// row ([`super::LogitsFor::Pick`]), in order, and how each is picked.
    pub picked_spans: Vec<usize>,
    pub picks: Vec<Pick>,
}

/// How a token is picked where the logits are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pick {
    /// Applied to the row before the pick (not to the log-probabilities, which are
    /// the raw logits').
    pub penalties: Option<Penalties>,
    /// `None`: the best id (the highest logit, ties to the lowest id).
    pub draw: Option<Draw>,
    /// Also the log-probabilities of the picked id and of the `k` most likely
    /// ([`crate::sampling::logprobs_of`]).
    pub logprobs: Option<usize>,
}

impl Pick {
    /// The best id, nothing else.
    pub const BEST: Pick = Pick {
        penalties: None,
        draw: None,
        logprobs: None,
    };

    /// [`Pick`] on a row on the host.
    pub fn on_host(&self, row: &[f32]) -> Picked {
        let id = crate::sampling::pick(row, self.penalties.as_ref(), &self.draw);
        Picked {
            id,
            logprobs: self.logprobs.map(|k| logprobs_of(row, id, k)),
        }
    }
}

/// A token picked where the logits are, with its log-probability and the `k` most
/// likely tokens' (best first) when they were asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Picked {
    pub id: u32,
    pub logprobs: Option<TokenScores>,
}

/// A token's log-probability and the `k` most likely tokens', best first.
pub type TokenScores = (TokenLogprob, Vec<TokenLogprob>);

/// What a step's download brings back: the rows, scores and picks of
/// [`StepLayout::wanted`], in its order.
#[derive(Debug, Default)]
pub struct Downloaded {
    pub rows: Vec<Vec<f32>>,
    pub scores: Vec<TokenScores>,
    pub picked: Vec<Picked>,
}

/// The heads of one rank's attention and where Q, K and V sit in a row of the
/// stacked projection.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One adapter's `A` and `B` acting on some rows of a step:
/// `y[row, offset..offset + outputs] += scale · B·(A·x[row])` for each of `rows`.
pub struct LoraPair<'a, B: Backend> {
    pub rows: &'a [usize],
    pub a: &'a B::Dense,
    pub b: &'a B::Dense,
    pub scale: f32,
    /// Where the pair's outputs start in a row of `y` (a part of stacked layers).
    pub offset: usize,
}

/// Logits rows per span, each over the whole vocabulary.
pub type SpanLogits = Vec<Vec<Vec<f32>>>;

/// What one step hands back, per span.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// The logits rows each span asked for (none for a `Best` span).
    pub logits: SpanLogits,
    /// The scores of each `Score` span's rows (empty for the others).
    pub scores: Vec<Vec<TokenScores>>,
    /// What was picked from each `Pick` span's last row, or a `Score` span's that
    /// picks (`None` for the others).
    pub picked: Vec<Option<Picked>>,
}

/// A step's device work, from its inputs to the normed rows whose logits are wanted
/// (see [`Backend::run_layers`]).
pub type StepLayers<'l, 'a, B> = dyn FnMut(
        &<B as Backend>::Step<'a>,
        &mut <B as Backend>::Cache,
    ) -> Result<Option<<B as Backend>::Hidden>, ModelError>
    + 'l;

/// Where a transformer computes. Each method is one operation of a step; the
/// associated types are the backend's forms of activations, weights and cache.
pub trait Backend: Send + Sync + std::fmt::Debug + Sized + 'static {
    /// The activations of a step: one row per token.
    type Hidden;
    /// A matrix (a rank's shard) in the form this backend multiplies.
    type Matrix: Send + Sync + std::fmt::Debug;
    /// A vector: a norm's weight, a bias.
    type Vector: Send + Sync + std::fmt::Debug;
    /// A LoRA adapter's `A` or `B`: dense f32.
    type Dense: Send + Sync + std::fmt::Debug;
    /// The paged KV cache of every layer.
    type Cache: Send + std::fmt::Debug;
    /// What a step's layers read besides activations (ids, rotary angles, slot
    /// mapping, block tables), prepared once per step.
    type Step<'a>;

    /// Where weights are loaded to.
    fn device(&self) -> Device;
    fn matrix(&self, weight: Weight) -> Result<Self::Matrix, ModelError>;
    fn vector(&self, values: Vec<f32>) -> Result<Self::Vector, ModelError>;
    /// `rows × cols` f32 values, row-major, as an adapter's matrix.
    fn dense(&self, rows: usize, cols: usize, values: Vec<f32>) -> Result<Self::Dense, ModelError>;
    /// `[rows, cols]` of a matrix.
    fn dims(matrix: &Self::Matrix) -> [usize; 2];
    /// Matrices one under the other, as one, where their forms allow it; else the
    /// parts handed back.
    fn stack(&self, parts: Vec<Self::Matrix>) -> Result<Self::Matrix, Vec<Self::Matrix>>;
    /// A cache of `blocks` blocks of `block_size` positions, zeroed.
    fn new_cache(
        &self,
        shape: KvShape,
        blocks: usize,
        block_size: usize,
    ) -> Result<Self::Cache, KvCacheTooLarge>;

    fn begin<'a>(
        &self,
        layout: &'a StepLayout<'a>,
        rope: &'a Rope,
        cache: &Self::Cache,
    ) -> Result<Self::Step<'a>, ModelError>;
    /// Runs `layers` (a step's device work, from its inputs to the normed rows whose
    /// logits are wanted) on the step `layout` describes. `replayable`: every step of
    /// this shape launches the same work on inputs of the same sizes, so a backend may
    /// record it once and replay the recording with each step's inputs.
    fn run_layers<'a>(
        &self,
        layout: &'a StepLayout<'a>,
        rope: &'a Rope,
        cache: &mut Self::Cache,
        replayable: bool,
        layers: &mut StepLayers<'_, 'a, Self>,
    ) -> Result<Option<Self::Hidden>, ModelError> {
        let _ = replayable;
        let step = self.begin(layout, rope, cache)?;
        layers(&step, cache)
    }

    /// Rows of `table` for the step's ids.
    fn embed(
        &self,
        table: &Self::Matrix,
        step: &Self::Step<'_>,
    ) -> Result<Self::Hidden, ModelError>;
    /// `x · Wᵀ (+ b)`.
    fn linear(
        &self,
        x: &Self::Hidden,
        w: &Self::Matrix,
        bias: Option<&Self::Vector>,
    ) -> Result<Self::Hidden, ModelError>;
    /// Parts side by side in each row.
    fn concat(&self, parts: Vec<Self::Hidden>) -> Result<Self::Hidden, ModelError>;
    /// Adds each adapter pair's product to its rows of `y` (a column-parallel
    /// layer's output; `x` its input).
    fn add_lora(
        &self,
        y: &mut Self::Hidden,
        x: &Self::Hidden,
        pairs: &[LoraPair<'_, Self>],
    ) -> Result<(), ModelError>;
    /// `Σ_ranks x_r · W_rᵀ`: this rank's partial product, all-reduced; the rank's
    /// partial adapter products (`A` split by columns like `W`) are added to its
    /// rows before the all-reduce.
    fn linear_all_reduce(
        &self,
        x: &Self::Hidden,
        w: &Self::Matrix,
        comm: &dyn Collective,
        lora: &[LoraPair<'_, Self>],
    ) -> Result<Self::Hidden, ModelError>;
    /// The RMSNorm of `x`, handed to `next` as `swiglu` hands its output.
    fn rms_norm(
        &self,
        x: &Self::Hidden,
        weight: &Self::Vector,
        eps: f32,
        next: &Self::Matrix,
    ) -> Result<Self::Hidden, ModelError>;
    /// `silu(gate) · up` of rows holding gate then up, handed to `next` (the matrix that
    /// multiplies it: a backend may give it in the form that matrix multiplies).
    fn swiglu(
        &self,
        gate_up: &Self::Hidden,
        next: &Self::Matrix,
    ) -> Result<Self::Hidden, ModelError>;
    /// `x += y` (the residual connection).
    fn add(&self, x: &mut Self::Hidden, y: &Self::Hidden) -> Result<(), ModelError>;
    /// `x += y`, then the RMSNorm of `x` (a residual connection and the norm after it;
    /// a backend may fuse them), handed to `next` as `rms_norm` hands it.
    fn add_rms_norm(
        &self,
        x: &mut Self::Hidden,
        y: &Self::Hidden,
        weight: &Self::Vector,
        eps: f32,
        next: &Self::Matrix,
    ) -> Result<Self::Hidden, ModelError> {
        self.add(x, y)?;
        self.rms_norm(x, weight, eps, next)
    }
    /// Rotates Q and K of `qkv` (rows of Q|K|V), writes K and V into `layer` of the
    /// cache, and returns each token's attention output over its sequence's
    /// positions (`[tokens, heads · head_dim]`), handed to `next` as `swiglu` hands its.
    fn attention(
        &self,
        qkv: Self::Hidden,
        shape: AttentionShape,
        layer: usize,
        step: &Self::Step<'_>,
        cache: &mut Self::Cache,
        next: &Self::Matrix,
    ) -> Result<Self::Hidden, ModelError>;
    /// Rows `start..start + len` of `x`.
    fn rows(&self, x: &Self::Hidden, start: usize, len: usize) -> Result<Self::Hidden, ModelError>;
    /// The rows of the step's wanted logits ([`StepLayout::wanted`]).
    fn wanted_rows(
        &self,
        x: &Self::Hidden,
        step: &Self::Step<'_>,
    ) -> Result<Self::Hidden, ModelError>;
    /// Logits back on the host, as [`StepLayout::wanted`] says: the first `whole`
    /// rows of `logits` as f32, then for each of `scored` the log-probability of its
    /// id and its `k` most likely tokens ([`crate::sampling::logprobs_of`]), then of
    /// each row after them only what is picked there, as `picks` says. A step's only
    /// download.
    fn download(
        &self,
        logits: &Self::Hidden,
        whole: usize,
        scored: &[(u32, usize)],
        picks: &[Pick],
    ) -> Result<Downloaded, ModelError>;
}
