//! The CUDA kernels themselves (`kernels.cu`, compiled for the host by the cuda-emu
//! crate and run thread by thread) against the ops' CPU implementations, which the
//! rest of the tests hold to the CPU engine: the kernels' indexing, barriers, shuffles
//! and shared memory are checked here, on machines without a GPU. Every launch is a
//! [`Call`] built by `calls.rs`, as `cuda.rs` builds it (kernel name, launch shape and
//! arguments), and its arguments are checked against the kernel's compiled parameters.

use std::ffi::c_void;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardserve_cuda_emu::{Grid, Kernel, Order};

use super::super::calls::{self, Arg, AttendBufs, AttendShape, AttendSplit, Buf, Call, Elem};
use super::super::launch::{Launch, MAX_HEAD_DIM};
use super::super::*;
use super::draws::{rows as draw_rows, settings as draw_settings_all};
use super::{fill, naive, values};

/// A host copy of a tensor's elements for a kernel to read or write, with guard bytes
/// on both sides that must survive the launch (in 16-byte words: aligned for every
/// element type and for kernels' 16-byte reads, as a GPU allocation is).
struct Guarded {
    words: Vec<u128>,
    dtype: DType,
    len: usize,
}

const GUARD_WORDS: usize = 8;
const GUARD: u128 = 0xa5a5_5a5a_a5a5_5a5a_a5a5_5a5a_a5a5_5a5a;

/// A tensor's elements as bytes, as they sit in memory.
fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_bits().to_ne_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_bits().to_ne_bytes())
            .collect(),
        other => panic!("no kernel takes {other:?}"),
    }
}

impl Guarded {
    fn new(t: &Tensor) -> Self {
        let bytes = bytes_of(t);
        let mut words = vec![GUARD; GUARD_WORDS];
        let inside = bytes.len().div_ceil(16);
        let at = words.len();
        words.resize(at + inside, 0);
        // SAFETY: the words from `at` hold at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words[at..].as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
        }
        words.extend(std::iter::repeat_n(GUARD, GUARD_WORDS));
        Self {
            words,
            dtype: t.dtype(),
            len: t.elem_count(),
        }
    }

    /// `n` elements of `value`, as a kernel's output before the launch.
    fn filled<T: candle_core::WithDType>(value: T, n: usize) -> Self {
        Self::new(&Tensor::full(value, n, &Device::Cpu).unwrap())
    }

    /// `n` NaNs of `dtype` (f32, f16 or bf16): an output no element of which is
    /// mistaken for one the kernel wrote.
    fn nans(n: usize, dtype: DType) -> Self {
        Self::new(
            &Tensor::full(f32::NAN, n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
    }

    fn buf(&mut self) -> Buf<*mut c_void> {
        Buf::new(
            self.words[GUARD_WORDS..].as_mut_ptr().cast(),
            Elem::of(self.dtype).unwrap(),
        )
    }

    /// The elements, once the guards are checked.
    fn tensor(&self) -> Tensor {
        let n = self.words.len();
        assert!(
            self.words[..GUARD_WORDS]
                .iter()
                .chain(&self.words[n - GUARD_WORDS..])
                .all(|&g| g == GUARD),
            "the kernel wrote outside its buffer"
        );
        let bytes = self.len * self.dtype.size_in_bytes();
        // SAFETY: the words inside the guards hold `bytes` bytes.
        let inside = unsafe {
            std::slice::from_raw_parts(self.words[GUARD_WORDS..].as_ptr().cast::<u8>(), bytes)
        };
        Tensor::from_raw_buffer(inside, self.dtype, &[self.len], &Device::Cpu).unwrap()
    }

    fn f32s(&self) -> Vec<f32> {
        to_vec(&self.tensor().to_dtype(DType::F32).unwrap())
    }
}

/// Runs `call` on the emulator, with the block's threads in `order` between barriers
/// (every test runs in both: a GPU promises neither), once its arguments are checked
/// against the parameters its kernel was compiled with.
fn run(call: &Call<*mut c_void>, order: Order) {
    let kernel = Kernel::find(&call.kernel)
        .unwrap_or_else(|| panic!("kernels.cu defines no kernel {}", call.kernel));
    assert_eq!(
        call.signature(),
        kernel.signature(),
        "{}: the call's arguments against the kernel's parameters",
        call.kernel
    );
    let params: Vec<*mut c_void> = call
        .args
        .iter()
        .map(|a| match a {
            Arg::Ptr(b) => (&raw const b.ptr) as *mut c_void,
            Arg::U32(v) => (v as *const u32) as *mut c_void,
            Arg::U64(v) => (v as *const u64) as *mut c_void,
            Arg::F32(v) => (v as *const f32) as *mut c_void,
        })
        .collect();
    let grid = Grid {
        blocks: call.launch.blocks,
        threads: call.launch.threads,
        shared_bytes: call.launch.shared_bytes,
        order,
    };
    // SAFETY: the arguments match the kernel's parameters (checked above) and each test
    // sizes its buffers for the launch it asks for.
    unsafe { kernel.launch(grid, &params) }
        .unwrap_or_else(|e| panic!("{} failed ({order:?}): {e}", call.kernel));
}

fn to_vec<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

/// A layer's cache (`[2, blocks, block_size, kv_heads, head_dim]`) filled through the
/// CPU op, its block tables and the plan of a step: `lens` positions per sequence, the
/// last `queries[s]` of them being the step's tokens.
struct Paged {
    cache: Tensor,
    tables: Vec<u32>,
    max_blocks: usize,
    tokens: Vec<u32>,
}

fn paged(dtype: DType, shape: (usize, usize, usize), lens: &[usize], queries: &[usize]) -> Paged {
    let (bs, kvh, d) = shape;
    let blocks_each: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
    let total: usize = blocks_each.iter().sum();
    let max_blocks = *blocks_each.iter().max().unwrap();
    // Blocks handed out in a shuffled order, one spare.
    let mut order: Vec<u32> = (0..total as u32 + 1).collect();
    order.reverse();
    order.rotate_left(total / 3);
    let cache = Tensor::zeros((2, total + 1, bs, kvh, d), dtype, &Device::Cpu).unwrap();
    let mut tables = vec![0u32; lens.len() * max_blocks];
    let mut next = order.into_iter();
    let mut tokens = Vec::new();
    for (s, (&len, &n)) in lens.iter().zip(queries).enumerate() {
        let table = &mut tables[s * max_blocks..][..blocks_each[s]];
        table.iter_mut().for_each(|b| *b = next.next().unwrap());
        let slots: Vec<u32> = (0..len)
            .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        let entries = |seed| values(len * kvh * d, seed);
        fill(
            &cache,
            &entries(10 + s as u32),
            &entries(20 + s as u32),
            &slots,
        );
        tokens.extend((len - n + 1..=len).flat_map(|seen| [s as u32, seen as u32]));
    }
    Paged {
        cache,
        tables,
        max_blocks,
        tokens,
    }
}

#[test]
fn the_rotation_kernels_write_and_rotate_what_the_ops_do() {
    for order in Order::BOTH {
        the_rotation_kernels_write_and_rotate_what_the_ops_do_in(order);
    }
}

fn the_rotation_kernels_write_and_rotate_what_the_ops_do_in(order: Order) {
    let dev = Device::Cpu;
    let (heads, kvh, d, blocks, bs) = (6, 2, 24, 6, 4);
    let slots: Vec<u32> = vec![21, 0, 7, 13, 2];
    let tokens = slots.len();
    let width = (heads + 2 * kvh) * d;
    let qkv_f32 = Tensor::from_vec(values(tokens * width, 4), (tokens, width), &dev).unwrap();
    let slots_t = Tensor::new(slots.as_slice(), &dev).unwrap();
    // Whole heads and partial rotations (24 and 10 of 24 features), both styles.
    for (half, interleaved) in [(12, false), (12, true), (5, false), (5, true)] {
        let rotation = Rotation {
            heads,
            kv_heads: kvh,
            head_dim: d,
            half,
            interleaved,
        };
        let trig = Tensor::from_vec(values(2 * tokens * half, 6), (2, tokens, half), &dev).unwrap();
        // The QKV product's rows as f32 and as a half-precision weight's product leaves
        // them, into caches of each type.
        for product in [DType::F32, DType::F16, DType::BF16] {
            let qkv = qkv_f32.to_dtype(product).unwrap();
            for dtype in [DType::F16, DType::BF16, DType::F32] {
                let cache = Tensor::zeros((2, blocks, bs, kvh, d), dtype, &dev).unwrap();
                let q = rotate_and_write(&cache, &qkv, &trig, &slots_t, rotation).unwrap();
                let want: Vec<f32> = to_vec(&cache.to_dtype(DType::F32).unwrap());
                let want_q: Vec<f32> = to_vec(&q);

                let size = 2 * blocks * bs * kvh * d;
                let mut c = Guarded::new(&Tensor::zeros(size, dtype, &dev).unwrap());
                let mut q_out = Guarded::filled(f32::NAN, tokens * heads * d);
                let (mut qkv_h, mut trig_h) = (Guarded::new(&qkv), Guarded::new(&trig));
                let mut slots_h = Guarded::new(&slots_t);
                let bufs = calls::RotateBufs {
                    cache: c.buf(),
                    cache_len: size,
                    q: q_out.buf(),
                    qkv: qkv_h.buf(),
                    trig: trig_h.buf(),
                    slots: slots_h.buf(),
                };
                run(&calls::rotate_write(&bufs, &rotation, tokens), order);
                let what = format!("cache {dtype:?}, product {product:?}, {rotation:?}");
                assert_eq!(c.f32s(), want, "{what}");
                assert_eq!(q_out.f32s(), want_q, "{what}");
            }
        }
    }
}

#[test]
fn the_attention_kernels_compute_what_the_op_computes() {
    for order in Order::BOTH {
        the_attention_kernels_compute_what_the_op_computes_in(order);
    }
}

fn the_attention_kernels_compute_what_the_op_computes_in(order: Order) {
    // Decode and prefill tokens together (prompts' runs to the tiled kernel, in runs of
    // 16 tokens and tiles of up to 32 positions, decode tokens to the per-token one),
    // grouped query heads, sequences longer than the per-token kernel's round of 128
    // positions, head widths below, at and above a warp's and beyond one feature per
    // thread; and every token through the per-token kernel (heads too wide for tiles).
    type Case<'a> = (DType, usize, usize, usize, &'a [usize], &'a [usize]);
    // Heads of 96 f16 and 24 bf16 features read values in 12 and 3 lanes of 16 bytes, with
    // lanes of the warp left over.
    let cases: [Case; 8] = [
        (DType::F16, 4, 2, 64, &[5, 140], &[5, 1]),
        (DType::F16, 2, 1, 96, &[75, 3], &[1, 3]),
        (DType::BF16, 3, 1, 24, &[45], &[1]),
        (DType::BF16, 6, 3, 20, &[300, 9], &[2, 3]),
        (DType::F32, 2, 1, 160, &[33], &[1]),
        (DType::F16, 4, 2, 128, &[129, 1, 40], &[1, 1, 37]),
        (DType::BF16, 2, 1, 256, &[20, 3], &[18, 1]),
        (DType::BF16, 2, 2, MAX_HEAD_DIM, &[40], &[2]),
    ];
    for (dtype, heads, kvh, d, lens, queries) in cases {
        let bs = 16;
        let p = paged(dtype, (bs, kvh, d), lens, queries);
        let tokens = p.tokens.len() / 2;
        let q = values(tokens * heads * d, 7);
        let dev = Device::Cpu;
        let plan = AttendPlan::new(
            p.tables.clone(),
            lens.len(),
            p.tokens.clone(),
            queries.iter().copied(),
            &dev,
        )
        .unwrap();
        let qt = Tensor::from_vec(q.clone(), (tokens, heads, d), &dev).unwrap();
        let want: Vec<f32> = to_vec(&attend(&qt, &p.cache, &plan, DType::F32).unwrap());
        let scale = 1.0 / (d as f32).sqrt();
        let shape = AttendShape {
            heads,
            kv_heads: kvh,
            head_dim: d,
            block_size: bs,
            max_blocks: p.max_blocks,
            scale,
        };
        let tiled = TokenTiles::new(queries.iter().copied());
        let n_tiles = tiled.tiles.len() / 2;
        let tile_launch = Launch::attend_tiles(n_tiles, heads, d).filter(|_| n_tiles > 0);
        // What the GPU runs, and every other way: prompts' tokens tiled or not, each
        // token's positions in chunks of 128 or whole.
        let mut splits = vec![AttendSplit::new(
            tokens,
            &shape,
            n_tiles,
            plan.singles,
            plan.longest,
            plan.longest_single,
        )];
        for (tiles, split) in [(true, false), (true, true), (false, false), (false, true)] {
            if tiles && tile_launch.is_none() {
                continue;
            }
            let per_token = if tiles { tiled.singles } else { tokens };
            let longest = tiled.order[..per_token]
                .iter()
                .map(|&t| p.tokens[2 * t as usize + 1])
                .max()
                .unwrap_or(0);
            let (chunks, chunk_len) = if split {
                (longest.div_ceil(128).max(1), 128)
            } else {
                (1, u32::MAX)
            };
            splits.push(AttendSplit {
                per_token,
                chunks,
                chunk_len,
                tiled: tile_launch.filter(|_| tiles),
            });
        }
        let host = |v: Vec<u32>| Guarded::new(&Tensor::new(v.as_slice(), &dev).unwrap());
        // Outputs in half precision (for a half-precision product after) through one
        // split that launches every kernel it can: each the f32 output, rounded.
        let rich = (splits
            .iter()
            .position(|s| s.chunks > 1 && s.tiled.is_some()))
        .or_else(|| splits.iter().position(|s| s.chunks > 1))
        .unwrap_or(0);
        let launches = splits.iter().enumerate().flat_map(|(i, &split)| {
            let outs: &[DType] = if i == rich {
                &[DType::F32, DType::F16, DType::BF16]
            } else {
                &[DType::F32]
            };
            outs.iter().map(move |&out| (split, out))
        });
        let mut in_f32 = Vec::new();
        for (split, out_dtype) in launches {
            let n = tokens * heads * d;
            let mut out = Guarded::nans(n, out_dtype);
            let mut partial = Guarded::filled(f32::NAN, split.partial_len(&shape));
            let mut q_h = Guarded::new(&Tensor::new(q.as_slice(), &dev).unwrap());
            let mut keys = Guarded::new(&p.cache.get(0).unwrap());
            let mut vals = Guarded::new(&p.cache.get(1).unwrap());
            let mut tables = host(p.tables.clone());
            let mut meta = host(p.tokens.clone());
            let mut token_order = host(tiled.order.clone());
            let mut runs = host(tiled.tiles.clone());
            let bufs = AttendBufs {
                out: out.buf(),
                q: q_h.buf(),
                keys: keys.buf(),
                values: vals.buf(),
                tables: tables.buf(),
                tokens: meta.buf(),
                order: token_order.buf(),
                tiles: runs.buf(),
                partial: partial.buf(),
            };
            for call in split.calls(&bufs, &shape) {
                run(&call, order);
            }
            partial.tensor();
            if out_dtype == DType::F32 {
                in_f32 = out.f32s();
                check_attention(&p, &q, &in_f32, &want, (dtype, heads, kvh, d, bs));
            } else {
                let rounded = Tensor::new(in_f32.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(out_dtype)
                    .unwrap();
                assert_eq!(
                    bytes_of(&out.tensor()),
                    bytes_of(&rounded),
                    "{dtype:?} cache, d {d}, {out_dtype:?} output of {split:?}"
                );
            }
        }
    }
}

/// The kernels' output against a naive softmax in f64 over the cached entries, and
/// against the op's CPU twin.
fn check_attention(
    p: &Paged,
    q: &[f32],
    got: &[f32],
    want: &[f32],
    (dtype, heads, kvh, d, bs): (DType, usize, usize, usize, usize),
) {
    let tokens = p.tokens.len() / 2;
    // The op's CPU twin rounds the softmax weights to the cache's type, as the CPU
    // engine does; the kernel keeps them in f32: a naive softmax in f64 over the
    // cached entries is the reference, the twin within the weights' rounding.
    let cached: Vec<f32> = to_vec(&p.cache.to_dtype(DType::F32).unwrap());
    let (keys, vals) = cached.split_at(cached.len() / 2);
    let rounding = match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        _ => 1e-5,
    };
    for t in 0..tokens {
        let (s, seen) = (p.tokens[2 * t] as usize, p.tokens[2 * t + 1] as usize);
        for h in 0..heads {
            let kv_head = h / (heads / kvh);
            let at = |cache: &[f32]| -> Vec<Vec<f32>> {
                (0..seen)
                    .map(|pos| {
                        let slot = p.tables[s * p.max_blocks + pos / bs] as usize * bs + pos % bs;
                        cache[(slot * kvh + kv_head) * d..][..d].to_vec()
                    })
                    .collect()
            };
            let row = t * heads + h;
            let reference = naive(&q[row * d..][..d], &at(keys), &at(vals));
            for x in 0..d {
                let (g, w, r) = (got[row * d + x], want[row * d + x], reference[x]);
                assert!(
                    (g - r).abs() < 1e-5,
                    "{dtype:?} d {d}, token {t} head {h}: {g} vs {r}"
                );
                assert!(
                    (g - w).abs() < rounding,
                    "{dtype:?} d {d}, token {t} head {h}: {g} vs twin {w}"
                );
            }
        }
    }
}

#[test]
fn the_norm_and_swiglu_kernels_compute_what_the_ops_compute() {
    for order in Order::BOTH {
        the_norm_and_swiglu_kernels_compute_what_the_ops_compute_in(order);
    }
}

/// Within a unit in the last place of `dtype` (f32 arithmetic that differs in its last
/// bits, `expf` or `sqrtf`, may round a value the other way).
fn close_in(dtype: DType, got: &[f32], want: &[f32], what: &str) {
    let ulp = match dtype {
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
        _ => 1e-6,
    };
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= ulp * w.abs().max(1.0),
            "{what}: {g} vs {w}"
        );
    }
}

fn the_norm_and_swiglu_kernels_compute_what_the_ops_compute_in(order: Order) {
    let dev = Device::Cpu;
    let (rows, width) = (5, 300);
    let x = values(rows * width, 8);
    let w = values(width, 9);
    let xt = Tensor::from_vec(x.clone(), (rows, width), &dev).unwrap();
    let wt = Tensor::new(w.as_slice(), &dev).unwrap();
    let mut w_h = Guarded::new(&wt);
    // Norms into f32, or into the half-precision type of the product after them.
    let outs = [DType::F32, DType::F16, DType::BF16];
    for out_dtype in outs {
        let want = to_vec::<f32>(
            &rms_norm(&xt, &wt, 1e-5, out_dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        );
        let mut out = Guarded::nans(rows * width, out_dtype);
        let mut x_h = Guarded::new(&xt);
        let norm = calls::rms_norm(out.buf(), x_h.buf(), w_h.buf(), rows, width, 1e-5);
        run(&norm, order);
        close_in(out_dtype, &out.f32s(), &want, "rms_norm");
    }

    // The residual connection and norm in one: the sums into `x` in place, as the op
    // leaves them, and their norm; and SwiGLU. The added rows and SwiGLU's input come
    // from a product: f32, or f16/bf16 from a half-precision weight.
    let y = values(rows * width, 11);
    let gate_up = Tensor::from_vec(
        values(rows * width, 10).iter().map(|v| v * 8.0).collect(),
        (rows, width),
        &dev,
    )
    .unwrap();
    let half = width / 2;
    for product in [DType::F32, DType::F16, DType::BF16] {
        let yt = Tensor::from_vec(y.clone(), (rows, width), &dev)
            .unwrap()
            .to_dtype(product)
            .unwrap();
        let sums = (&xt + &yt.to_dtype(DType::F32).unwrap()).unwrap();
        let mut y_h = Guarded::new(&yt);
        for out_dtype in outs {
            let residual = xt.copy().unwrap();
            let normed = add_rms_norm(&residual, &yt, &wt, 1e-5, out_dtype).unwrap();
            assert_eq!(to_vec::<f32>(&residual), to_vec::<f32>(&sums));
            assert_eq!(normed.dtype(), out_dtype);
            let want = to_vec::<f32>(
                &rms_norm(&sums, &wt, 1e-5, out_dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            );
            assert_eq!(to_vec::<f32>(&normed.to_dtype(DType::F32).unwrap()), want);
            let mut out = Guarded::nans(rows * width, out_dtype);
            let mut x_h = Guarded::new(&xt);
            let add_norm = calls::add_rms_norm(
                out.buf(),
                x_h.buf(),
                y_h.buf(),
                w_h.buf(),
                rows,
                width,
                1e-5,
            );
            run(&add_norm, order);
            let what = format!("add_rms_norm of {product:?} into {out_dtype:?}");
            assert_eq!(x_h.f32s(), to_vec::<f32>(&sums), "{what}: the sums");
            close_in(out_dtype, &out.f32s(), &want, &what);
        }
        let gu = gate_up.to_dtype(product).unwrap();
        let mut gu_h = Guarded::new(&gu);
        // SwiGLU into f32, or into the half-precision type of the product after it.
        for out_dtype in outs {
            let want_swiglu: Vec<f32> = to_vec(
                &swiglu(&gu, out_dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            );
            let mut out_swiglu = Guarded::nans(rows * half, out_dtype);
            run(
                &calls::swiglu(out_swiglu.buf(), gu_h.buf(), rows, half),
                order,
            );
            assert_eq!(out_swiglu.tensor().dtype(), out_dtype);
            let what = format!("swiglu of {product:?} into {out_dtype:?}");
            close_in(out_dtype, &out_swiglu.f32s(), &want_swiglu, &what);
        }
    }
}

#[test]
fn the_draw_kernel_picks_the_ops_tokens() {
    for order in Order::BOTH {
        the_draw_kernel_picks_the_ops_tokens_in(order);
    }
}

fn the_draw_kernel_picks_the_ops_tokens_in(order: Order) {
    // A sample of the twin tests' rows and settings (each emulated draw runs 256
    // threads through dozens of barriers), several rows a launch.
    let mut rng = StdRng::seed_from_u64(21);
    let mut compared = 0;
    for vocab in [3, 1000, 5000] {
        let rows = draw_rows(vocab, &mut rng);
        let mut all = draw_settings_all(vocab, &mut rng);
        let picked: Vec<_> = (0..6)
            .map(|_| all.swap_remove(rng.random_range(0..all.len())))
            .collect();
        for d in picked {
            let logits: Vec<f32> = rows.concat();
            let settings: Vec<f64> = (0..rows.len())
                .flat_map(|_| draw_settings(&Some(d)))
                .collect();
            let dev = Device::Cpu;
            let want: Vec<u32> = to_vec(
                &draw(
                    &Tensor::from_vec(logits.clone(), (rows.len(), vocab), &dev).unwrap(),
                    &Tensor::from_vec(settings.clone(), (rows.len(), 5), &dev).unwrap(),
                )
                .unwrap(),
            );
            let mut out = Guarded::filled(u32::MAX, rows.len());
            let mut logits_h = Guarded::new(&Tensor::new(logits.as_slice(), &dev).unwrap());
            let mut settings_h = Guarded::new(&Tensor::new(settings.as_slice(), &dev).unwrap());
            let call = calls::draw(
                out.buf(),
                logits_h.buf(),
                settings_h.buf(),
                rows.len(),
                vocab,
            );
            run(&call, order);
            assert_eq!(to_vec::<u32>(&out.tensor()), want, "vocab {vocab}, {d:?}");
            compared += rows.len();
        }
    }
    assert!(compared >= 100);
}

#[test]
fn the_top_logprobs_kernel_gives_the_ops_table() {
    for order in Order::BOTH {
        the_top_logprobs_kernel_gives_the_ops_table_in(order);
    }
}

fn the_top_logprobs_kernel_gives_the_ops_table_in(order: Order) {
    let mut rng = StdRng::seed_from_u64(22);
    for vocab in [3, 1000] {
        let rows = draw_rows(vocab, &mut rng);
        for n in [0, 1, 5, 20] {
            let n = n.min(vocab);
            let logits: Vec<f32> = rows.concat();
            let chosen: Vec<u32> = (0..rows.len())
                .map(|_| rng.random_range(0..vocab as u32 + 1))
                .collect();
            let dev = Device::Cpu;
            let want: Vec<f32> = to_vec(
                &top_logprobs(
                    &Tensor::from_vec(logits.clone(), (rows.len(), vocab), &dev).unwrap(),
                    &Tensor::new(chosen.as_slice(), &dev).unwrap(),
                    n,
                )
                .unwrap(),
            );
            let mut out = Guarded::filled(f32::NAN, rows.len() * (1 + 3 * n));
            let mut logits_h = Guarded::new(&Tensor::new(logits.as_slice(), &dev).unwrap());
            let mut chosen_h = Guarded::new(&Tensor::new(chosen.as_slice(), &dev).unwrap());
            let call = calls::top_logprobs(
                out.buf(),
                logits_h.buf(),
                chosen_h.buf(),
                rows.len(),
                vocab,
                n,
            );
            run(&call, order);
            for (i, (g, w)) in out.f32s().iter().zip(&want).enumerate() {
                let same = g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() < 1e-5;
                assert!(same, "vocab {vocab} n {n}, entry {i}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn the_penalise_kernel_penalises_as_the_op() {
    for order in Order::BOTH {
        the_penalise_kernel_penalises_as_the_op_in(order);
    }
}

fn the_penalise_kernel_penalises_as_the_op_in(order: Order) {
    let mut rng = StdRng::seed_from_u64(23);
    let (rows, vocab) = (3, 300);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| rng.random::<f32>() * 8.0 - 4.0)
        .collect();
    // (row, id, times generated), an id beyond the vocabulary among them.
    let entries: Vec<u32> = vec![
        0, 0, 0, 0, 7, 2, 0, 299, 1, 1, 7, 3, 1, 8, 1, 1, 1000, 2, 2, 5, 0,
    ];
    let settings: Vec<f32> = vec![1.3, 0.0, 0.0, 1.0, 0.4, 0.3, 0.8, 0.2, 0.1];
    let dev = Device::Cpu;
    let t = Tensor::from_vec(logits.clone(), (rows, vocab), &dev).unwrap();
    let n = entries.len() / 3;
    penalise(
        &t,
        &Tensor::from_vec(entries.clone(), (n, 3), &dev).unwrap(),
        &Tensor::from_vec(settings.clone(), (rows, 3), &dev).unwrap(),
    )
    .unwrap();
    let mut got = Guarded::new(&Tensor::new(logits.as_slice(), &dev).unwrap());
    let mut entries_h = Guarded::new(&Tensor::new(entries.as_slice(), &dev).unwrap());
    let mut settings_h = Guarded::new(&Tensor::new(settings.as_slice(), &dev).unwrap());
    let call = calls::penalise(got.buf(), entries_h.buf(), settings_h.buf(), n, vocab);
    run(&call, order);
    assert_eq!(got.f32s(), to_vec::<f32>(&t));
}
