//! Each kernel's call: the name of the kernel `kernels.cu` compiles, its launch shape
//! and its arguments in the order of its signature, built in one place from buffers
//! and the op's numbers. `cuda.rs` launches these calls with device pointers; the
//! emulated tests launch the same calls with host pointers, and check each argument
//! list against the signature the kernel was compiled with, so the argument lists a
//! GPU gets are the ones the tests run.

use candle_core::{DType, Result, bail};

use super::Rotation;
use super::launch::Launch;

/// What a kernel's pointer argument points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    BF16,
    F64,
    U32,
}

impl Elem {
    pub fn of(dtype: DType) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32,
            DType::F16 => Self::F16,
            DType::BF16 => Self::BF16,
            DType::F64 => Self::F64,
            DType::U32 => Self::U32,
            other => bail!("device kernels: elements of {other:?} are not supported"),
        })
    }

    /// The name kernels carry for it (`paged_attend_bf16`), and its code in a
    /// signature.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::F64 => "f64",
            Self::U32 => "u32",
        }
    }
}

/// A buffer handed to a kernel: where it starts (`P`: a device address, or a host
/// pointer in the emulator) and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf<P> {
    pub ptr: P,
    pub elem: Elem,
}

impl<P> Buf<P> {
    pub fn new(ptr: P, elem: Elem) -> Self {
        Self { ptr, elem }
    }
}

/// One argument, as the kernel's parameter takes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg<P> {
    Ptr(Buf<P>),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl<P> Arg<P> {
    /// Its code in a kernel's signature: `*bf16` for a pointer to bf16, `u32`, ...
    pub fn code(&self) -> String {
        match self {
            Self::Ptr(b) => format!("*{}", b.elem.name()),
            Self::U32(_) => "u32".into(),
            Self::U64(_) => "u64".into(),
            Self::F32(_) => "f32".into(),
        }
    }
}

/// A launch of the kernel named `kernel`.
#[derive(Clone, Debug, PartialEq)]
pub struct Call<P> {
    pub kernel: String,
    pub launch: Launch,
    pub args: Vec<Arg<P>>,
}

impl<P> Call<P> {
    /// The argument list's signature, as the emulator reports a kernel's:
    /// `*f16,*f32,u32,...`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn signature(&self) -> String {
        self.args
            .iter()
            .map(Arg::code)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn ptrs<P: Copy>(bufs: &[Buf<P>]) -> impl Iterator<Item = Arg<P>> + '_ {
    bufs.iter().map(|&b| Arg::Ptr(b))
}

/// The rotation's numbers, as the kernels take them: tokens, row width, query width,
/// KV width, head_dim, half, interleaved.
fn rotation_args<P>(r: &Rotation, tokens: usize) -> [Arg<P>; 7] {
    [
        tokens,
        r.q_width() + 2 * r.kv_width(),
        r.q_width(),
        r.kv_width(),
        r.head_dim,
        r.half,
        usize::from(r.interleaved),
    ]
    .map(|v| Arg::U32(v as u32))
}

/// The buffers of a step's rotation and cache write.
#[derive(Clone, Copy, Debug)]
pub struct RotateBufs<P> {
    /// One layer's cache, `cache_len` elements: keys, then values.
    pub cache: Buf<P>,
    pub cache_len: usize,
    /// The rotated queries, f32 `[tokens, heads, head_dim]`.
    pub q: Buf<P>,
    /// The QKV product's rows, the tokens' angles (cosines, then sines) and slots.
    pub qkv: Buf<P>,
    pub trig: Buf<P>,
    pub slots: Buf<P>,
}

/// Queries and keys rotated, keys and values written into the cache at the slots, the
/// queries (rounded to the cache's type) into `q`.
pub fn rotate_write<P: Copy>(b: &RotateBufs<P>, r: &Rotation, tokens: usize) -> Call<P> {
    let [t, width, q_width, kv_width, d, half, interleaved] = rotation_args(r, tokens);
    let mut args: Vec<Arg<P>> = ptrs(&[b.cache, b.q, b.qkv, b.trig, b.slots]).collect();
    args.extend([t, width, q_width, kv_width, d, half, interleaved]);
    args.push(Arg::U64((b.cache_len / 2) as u64));
    Call {
        kernel: format!(
            "paged_rotate_write_{}_{}",
            b.cache.elem.name(),
            b.qkv.elem.name()
        ),
        launch: Launch::elementwise((tokens * (r.q_width() + 2 * r.kv_width())) as u32),
        args,
    }
}

/// The buffers of a step's attention in one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttendBufs<P> {
    /// `[tokens, heads, head_dim]`: f32, or the half-precision type of the product
    /// it feeds; the queries likewise, f32.
    pub out: Buf<P>,
    pub q: Buf<P>,
    /// The layer's keys and its values (each half of its cache).
    pub keys: Buf<P>,
    pub values: Buf<P>,
    /// The plan's block tables, (sequence, positions seen) per token, the token order
    /// and the tiles ([`super::AttendPlan`]).
    pub tables: Buf<P>,
    pub tokens: Buf<P>,
    pub order: Buf<P>,
    pub tiles: Buf<P>,
    /// The chunks' partial softmaxes ([`AttendSplit::partial_len`] floats).
    pub partial: Buf<P>,
}

/// The numbers of a step's attention in one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttendShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Width of a row of the block tables.
    pub max_blocks: usize,
    pub scale: f32,
}

/// How a step's tokens go to the attention kernels: the first `per_token` of the
/// order to the per-token kernel, each token's positions in `chunks` of `chunk_len`;
/// the plan's tiles to the tiled kernel, with its launch and positions a tile, when
/// `tiled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttendSplit {
    pub per_token: usize,
    pub chunks: u32,
    pub chunk_len: u32,
    pub tiled: Option<(Launch, u32)>,
}

impl AttendSplit {
    /// What the GPU runs for a plan of `tokens` tokens, `tiles` runs of them and
    /// `singles` one-token spans (`longest` and `longest_single`: the most positions
    /// any token, any single, sees): prompts' runs to the tiled kernel where the head
    /// fits it, else every token to the per-token kernel; long sequences of few
    /// tokens split into chunks.
    pub fn new(
        tokens: usize,
        shape: &AttendShape,
        tiles: usize,
        singles: usize,
        longest: usize,
        longest_single: usize,
    ) -> Self {
        let tiled = Launch::attend_tiles(tiles, shape.heads, shape.head_dim).filter(|_| tiles > 0);
        let (per_token, longest) = match tiled {
            Some(_) => (singles, longest_single),
            None => (tokens, longest),
        };
        let (chunks, chunk_len) = Launch::attend_chunks(per_token, shape.heads, longest);
        Self {
            per_token,
            chunks,
            chunk_len,
            tiled,
        }
    }

    /// Floats of the chunks' partial results (each chunk's maximum, sum and
    /// unnormalised sums); 1 where sequences are whole (not read, but the kernel takes
    /// a pointer).
    pub fn partial_len(&self, shape: &AttendShape) -> usize {
        if self.chunks > 1 {
            self.per_token * self.chunks as usize * shape.heads * (shape.head_dim + 2)
        } else {
            1
        }
    }

    /// The launches, in order: the per-token kernel and the merge of its chunks (when
    /// it has tokens, and chunks), then the tiled kernel.
    pub fn calls<P: Copy>(&self, b: &AttendBufs<P>, s: &AttendShape) -> Vec<Call<P>> {
        let (cache, out) = (b.keys.elem.name(), b.out.elem.name());
        let (heads, kv_heads, d, bs) = (
            s.heads as u32,
            s.kv_heads as u32,
            s.head_dim as u32,
            s.block_size as u32,
        );
        // Both kernels begin alike.
        let common = |mut args: Vec<Arg<P>>| {
            let mut all: Vec<Arg<P>> = ptrs(&[b.out, b.q, b.keys, b.values, b.tables]).collect();
            all.extend([Arg::U32(s.max_blocks as u32), Arg::Ptr(b.tokens)]);
            all.append(&mut args);
            all
        };
        let mut calls = Vec::new();
        if self.per_token > 0 {
            calls.push(Call {
                kernel: format!("paged_attend_{cache}_{out}"),
                launch: Launch::attend(self.per_token, s.heads, s.head_dim, self.chunks),
                args: common(vec![
                    Arg::Ptr(b.order),
                    Arg::U32(heads),
                    Arg::U32(kv_heads),
                    Arg::U32(d),
                    Arg::U32(bs),
                    Arg::F32(s.scale),
                    Arg::U32(self.chunks),
                    Arg::U32(self.chunk_len),
                    Arg::Ptr(b.partial),
                ]),
            });
            if self.chunks > 1 {
                let mut args: Vec<Arg<P>> = ptrs(&[b.out, b.partial, b.order]).collect();
                args.extend([heads, d, self.chunks].map(Arg::U32));
                calls.push(Call {
                    kernel: format!("paged_attend_combine_{out}"),
                    launch: Launch::attend_combine(self.per_token, s.heads),
                    args,
                });
            }
        }
        if let Some((launch, positions)) = self.tiled {
            calls.push(Call {
                kernel: format!("paged_attend_tiles_{cache}_{out}"),
                launch,
                args: common(vec![
                    Arg::Ptr(b.tiles),
                    Arg::U32(heads),
                    Arg::U32(kv_heads),
                    Arg::U32(d),
                    Arg::U32(bs),
                    Arg::U32(positions),
                    Arg::F32(s.scale),
                ]),
            });
        }
        calls
    }
}

/// RMSNorm of `rows` rows of `width` (f32) into `out` (f32, or the half-precision type
/// of the product it feeds).
pub fn rms_norm<P: Copy>(
    out: Buf<P>,
    x: Buf<P>,
    weight: Buf<P>,
    rows: usize,
    width: usize,
    eps: f32,
) -> Call<P> {
    let mut args: Vec<Arg<P>> = ptrs(&[out, x, weight]).collect();
    args.extend([Arg::U32(width as u32), Arg::F32(eps)]);
    Call {
        kernel: format!("rms_norm_{}", out.elem.name()),
        launch: Launch::per_row(rows),
        args,
    }
}

/// `x += y` in place (`y` a product's output: f32, f16 or bf16), then the RMSNorm of
/// the sums into `out` (as [`rms_norm`]'s).
pub fn add_rms_norm<P: Copy>(
    out: Buf<P>,
    x: Buf<P>,
    y: Buf<P>,
    weight: Buf<P>,
    rows: usize,
    width: usize,
    eps: f32,
) -> Call<P> {
    let mut args: Vec<Arg<P>> = ptrs(&[out, x, y, weight]).collect();
    args.extend([Arg::U32(width as u32), Arg::F32(eps)]);
    Call {
        kernel: format!("add_rms_norm_{}_{}", out.elem.name(), y.elem.name()),
        launch: Launch::per_row(rows),
        args,
    }
}

/// `silu(gate) · up` of `rows` rows holding gate then up (`half` each), into `out`
/// (f32, or the half-precision type of the product it feeds).
pub fn swiglu<P: Copy>(out: Buf<P>, gate_up: Buf<P>, rows: usize, half: usize) -> Call<P> {
    let (rows, half) = (rows as u32, half as u32);
    let mut args: Vec<Arg<P>> = ptrs(&[out, gate_up]).collect();
    args.extend([Arg::U32(rows), Arg::U32(half)]);
    Call {
        kernel: format!("swiglu_{}_{}", out.elem.name(), gate_up.elem.name()),
        launch: Launch::elementwise(rows * half),
        args,
    }
}

/// An id drawn from each of `rows` rows of logits, as `settings` (5 f64 a row) say.
pub fn draw<P: Copy>(
    out: Buf<P>,
    logits: Buf<P>,
    settings: Buf<P>,
    rows: usize,
    vocab: usize,
) -> Call<P> {
    let (launch, chunk) = Launch::draw(rows, vocab);
    let mut args: Vec<Arg<P>> = ptrs(&[out, logits, settings]).collect();
    args.extend([Arg::U32(vocab as u32), Arg::U32(chunk)]);
    Call {
        kernel: "draw_f32".into(),
        launch,
        args,
    }
}

/// Each row's log-probability of its `chosen` id and its `n` most likely tokens'.
pub fn top_logprobs<P: Copy>(
    out: Buf<P>,
    logits: Buf<P>,
    chosen: Buf<P>,
    rows: usize,
    vocab: usize,
    n: usize,
) -> Call<P> {
    let (launch, chunk) = Launch::draw(rows, vocab);
    let mut args: Vec<Arg<P>> = ptrs(&[out, logits, chosen]).collect();
    args.extend([vocab as u32, n as u32, chunk].map(Arg::U32));
    Call {
        kernel: "top_logprobs_f32".into(),
        launch,
        args,
    }
}

/// Penalties applied in place to rows of logits: `n` (row, id, count) entries.
pub fn penalise<P: Copy>(
    logits: Buf<P>,
    entries: Buf<P>,
    settings: Buf<P>,
    n: usize,
    vocab: usize,
) -> Call<P> {
    let mut args: Vec<Arg<P>> = ptrs(&[logits, entries, settings]).collect();
    args.extend([Arg::U32(n as u32), Arg::U32(vocab as u32)]);
    Call {
        kernel: "penalise_f32".into(),
        launch: Launch::elementwise(n as u32),
        args,
    }
}
