//! The CUDA kernels themselves (`kernels.cu`, compiled for the host by the cuda-emu
//! crate and run thread by thread, with the launch shapes `cuda.rs` uses) against the
//! ops' CPU implementations, which the rest of the tests hold to the CPU engine: the
//! kernels' indexing, barriers, shuffles and shared memory are checked here, on
//! machines without a GPU.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardserve_cuda_emu::{Grid, Order, kernels as k, launch};

use super::super::launch::{Launch, MAX_HEAD_DIM};
use super::super::*;
use super::draws::{rows as draw_rows, settings as draw_settings_all};
use super::{fill, naive, values};

/// A buffer for a kernel to write, with guard elements on both sides that must
/// survive the launch.
struct Guarded<T: Copy + PartialEq + std::fmt::Debug> {
    data: Vec<T>,
    guard: T,
}

const GUARD: usize = 64;

impl<T: Copy + PartialEq + std::fmt::Debug> Guarded<T> {
    fn new(inside: Vec<T>, guard: T) -> Self {
        let mut data = vec![guard; GUARD];
        data.extend(inside);
        data.extend(std::iter::repeat_n(guard, GUARD));
        Self { data, guard }
    }

    fn ptr(&mut self) -> *mut T {
        // SAFETY: GUARD elements precede the inside.
        unsafe { self.data.as_mut_ptr().add(GUARD) }
    }

    /// The inside, once the guards are checked.
    fn inside(&self) -> &[T] {
        let n = self.data.len();
        assert!(
            self.data[..GUARD]
                .iter()
                .chain(&self.data[n - GUARD..])
                .all(|g| *g == self.guard),
            "the kernel wrote outside its buffer"
        );
        &self.data[GUARD..n - GUARD]
    }
}

/// Runs `kernel` on the emulator as `cuda.rs` launches it, with the block's threads in
/// `order` between barriers (every test runs in both: a GPU promises neither).
fn run(shape: Launch, order: Order, kernel: impl Fn()) {
    let grid = Grid {
        blocks: shape.blocks,
        threads: shape.threads,
        shared_bytes: shape.shared_bytes,
        order,
    };
    // SAFETY: each test sizes its buffers for the launch it asks for.
    unsafe { launch(grid, kernel) }.unwrap_or_else(|e| panic!("kernel failed ({order:?}): {e}"));
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
    let (qw, kvw) = (heads * d, kvh * d);
    let width = qw + 2 * kvw;
    let (t, w, q_w, kv_w, dd) = (tokens as u32, width as u32, qw as u32, kvw as u32, d as u32);
    // The QKV product's rows as f32 and as a half-precision weight's product leaves them.
    let qkv_f32 = Tensor::from_vec(values(tokens * width, 4), (tokens, width), &dev).unwrap();
    let qkv_f16 = qkv_f32.to_dtype(DType::F16).unwrap();
    let qkv_bf16 = qkv_f32.to_dtype(DType::BF16).unwrap();
    let (h32, h16, hb16) = (
        to_vec::<f32>(&qkv_f32),
        to_vec::<f16>(&qkv_f16),
        to_vec::<bf16>(&qkv_bf16),
    );
    let (p32, p16, pb16) = (h32.as_ptr(), h16.as_ptr(), hb16.as_ptr());
    // Whole heads and partial rotations (24 and 10 of 24 features), both styles.
    for (half, interleaved) in [(12, false), (12, true), (5, false), (5, true)] {
        let trig = values(2 * tokens * half, 6);
        let rotation = Rotation {
            heads,
            kv_heads: kvh,
            head_dim: d,
            half,
            interleaved,
        };
        let trig_t = Tensor::from_vec(trig.clone(), (2, tokens, half), &dev).unwrap();
        let slots_t = Tensor::new(slots.as_slice(), &dev).unwrap();
        let (h, il) = (half as u32, u32::from(interleaved));
        let (tp, sp) = (trig.as_ptr(), slots.as_ptr());
        for (product, qkv_t) in [
            (DType::F32, &qkv_f32),
            (DType::F16, &qkv_f16),
            (DType::BF16, &qkv_bf16),
        ] {
            for dtype in [DType::F16, DType::BF16, DType::F32] {
                let cache = Tensor::zeros((2, blocks, bs, kvh, d), dtype, &dev).unwrap();
                write_kv(&cache, qkv_t, &trig_t, &slots_t, rotation).unwrap();
                let want: Vec<f32> = to_vec(&cache.to_dtype(DType::F32).unwrap());
                let want_q: Vec<f32> =
                    to_vec(&rotate_queries(qkv_t, &trig_t, rotation, dtype).unwrap());
                let size = 2 * blocks * bs * kvw;
                let values_at = (size / 2) as u64;
                let write = Launch::elementwise(t * 2 * kv_w);
                let rotate = Launch::elementwise(t * q_w);
                let mut q_out = Guarded::new(vec![f32::NAN; tokens * qw], f32::MAX);
                let qo = q_out.ptr();
                macro_rules! go {
                    ($zero:expr, $guard:expr, $qp:expr, $write:path, $queries:path) => {{
                        let mut c = Guarded::new(vec![$zero; size], $guard);
                        let (cp, qp) = (c.ptr(), $qp);
                        run(write, order, || unsafe {
                            $write(cp, qp, tp, sp, t, w, q_w, kv_w, dd, h, il, values_at)
                        });
                        run(rotate, order, || unsafe {
                            $queries(qo, qp, tp, t, w, q_w, dd, h, il)
                        });
                        c.inside()
                            .iter()
                            .map(|x| f32::from(*x))
                            .collect::<Vec<f32>>()
                    }};
                }
                use DType::{BF16, F16, F32};
                let (z16, zb16, m16, mb16) = (f16::ZERO, bf16::ZERO, f16::MAX, bf16::MAX);
                let got = match (dtype, product) {
                    (F16, F32) => go!(
                        z16,
                        m16,
                        p32,
                        k::paged_write_kv_f16_f32,
                        k::rotate_queries_f16_f32
                    ),
                    (F16, F16) => go!(
                        z16,
                        m16,
                        p16,
                        k::paged_write_kv_f16_f16,
                        k::rotate_queries_f16_f16
                    ),
                    (F16, _) => go!(
                        z16,
                        m16,
                        pb16,
                        k::paged_write_kv_f16_bf16,
                        k::rotate_queries_f16_bf16
                    ),
                    (BF16, F32) => go!(
                        zb16,
                        mb16,
                        p32,
                        k::paged_write_kv_bf16_f32,
                        k::rotate_queries_bf16_f32
                    ),
                    (BF16, F16) => go!(
                        zb16,
                        mb16,
                        p16,
                        k::paged_write_kv_bf16_f16,
                        k::rotate_queries_bf16_f16
                    ),
                    (BF16, _) => go!(
                        zb16,
                        mb16,
                        pb16,
                        k::paged_write_kv_bf16_bf16,
                        k::rotate_queries_bf16_bf16
                    ),
                    (_, F32) => go!(
                        0f32,
                        f32::MAX,
                        p32,
                        k::paged_write_kv_f32_f32,
                        k::rotate_queries_f32_f32
                    ),
                    (_, F16) => go!(
                        0f32,
                        f32::MAX,
                        p16,
                        k::paged_write_kv_f32_f16,
                        k::rotate_queries_f32_f16
                    ),
                    _ => go!(
                        0f32,
                        f32::MAX,
                        pb16,
                        k::paged_write_kv_f32_bf16,
                        k::rotate_queries_f32_bf16
                    ),
                };
                let what = format!("cache {dtype:?}, product {product:?}, {rotation:?}");
                assert_eq!(got, want, "{what}");
                assert_eq!(q_out.inside(), want_q.as_slice(), "{what}");
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
    // grouped query heads, sequences longer than the per-token kernel's tile of 128
    // positions, head widths below, at and above a warp's and beyond one feature per
    // thread; and every token through the per-token kernel (heads too wide for tiles).
    type Case<'a> = (DType, usize, usize, usize, &'a [usize], &'a [usize]);
    let cases: [Case; 6] = [
        (DType::F16, 4, 2, 64, &[5, 140], &[5, 1]),
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
        let want: Vec<f32> = to_vec(&attend(&qt, &p.cache, &plan).unwrap());
        let tiled = TokenTiles::new(queries.iter().copied());
        let tile_launch = Launch::attend_tiles(tiled.tiles.len() / 2, heads, d);
        // Prompts' tokens tiled or not, each token's positions in chunks of 128 or whole.
        for (tiles, split) in [(true, false), (true, true), (false, false), (false, true)] {
            if tiles && tile_launch.is_none() {
                continue;
            }
            let mut out = Guarded::new(vec![f32::NAN; tokens * heads * d], f32::MAX);
            let o = out.ptr();
            let (tables, meta) = (p.tables.as_ptr(), p.tokens.as_ptr());
            let (token_order, runs) = (tiled.order.as_ptr(), tiled.tiles.as_ptr());
            let scale = 1.0 / (d as f32).sqrt();
            let (mb, h, kv, dd, b) = (
                p.max_blocks as u32,
                heads as u32,
                kvh as u32,
                d as u32,
                bs as u32,
            );
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
            let mut partial = Guarded::new(
                vec![f32::NAN; per_token * chunks as usize * heads * (d + 2)],
                f32::MAX,
            );
            let pp = partial.ptr();
            macro_rules! go {
                ($t:ty, $f:path, $g:path) => {{
                    let cache = to_vec::<$t>(&p.cache);
                    let (keys, vals) = cache.split_at(cache.len() / 2);
                    let (kp, vp, qp) = (keys.as_ptr(), vals.as_ptr(), q.as_ptr());
                    if per_token > 0 {
                        run(
                            Launch::attend(per_token, heads, d, chunks),
                            order,
                            || unsafe {
                                $f(
                                    o,
                                    qp,
                                    kp,
                                    vp,
                                    tables,
                                    mb,
                                    meta,
                                    token_order,
                                    h,
                                    kv,
                                    dd,
                                    b,
                                    scale,
                                    chunks,
                                    chunk_len,
                                    pp,
                                )
                            },
                        );
                        if chunks > 1 {
                            run(Launch::attend_combine(per_token, heads), order, || unsafe {
                                k::paged_attend_combine(o, pp, token_order, h, dd, chunks)
                            });
                        }
                    }
                    if let (true, Some((shape, positions))) = (tiles, tile_launch) {
                        run(shape, order, || unsafe {
                            $g(
                                o, qp, kp, vp, tables, mb, meta, runs, h, kv, dd, b, positions,
                                scale,
                            )
                        });
                    }
                }};
            }
            match dtype {
                DType::F16 => go!(f16, k::paged_attend_f16, k::paged_attend_tiles_f16),
                DType::BF16 => go!(bf16, k::paged_attend_bf16, k::paged_attend_tiles_bf16),
                _ => go!(f32, k::paged_attend_f32, k::paged_attend_tiles_f32),
            }
            partial.inside();
            check_attention(&p, &q, &out, &want, (dtype, heads, kvh, d, bs));
        }
    }
}

/// The kernels' output against a naive softmax in f64 over the cached entries, and
/// against the op's CPU twin.
fn check_attention(
    p: &Paged,
    q: &[f32],
    out: &Guarded<f32>,
    want: &[f32],
    (dtype, heads, kvh, d, bs): (DType, usize, usize, usize, usize),
) {
    let tokens = p.tokens.len() / 2;
    // The op's CPU twin rounds the softmax weights to the cache's type, as the CPU
    // engine does; the kernel keeps them in f32: a naive softmax in f64 over the
    // cached entries is the reference, the twin within the weights' rounding.
    let cached: Vec<f32> = to_vec(&p.cache.to_dtype(DType::F32).unwrap());
    let (keys, vals) = cached.split_at(cached.len() / 2);
    let got = out.inside();
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

fn the_norm_and_swiglu_kernels_compute_what_the_ops_compute_in(order: Order) {
    let dev = Device::Cpu;
    let (rows, width) = (5, 300);
    let x = values(rows * width, 8);
    let w = values(width, 9);
    let want: Vec<f32> = to_vec(
        &rms_norm(
            &Tensor::from_vec(x.clone(), (rows, width), &dev).unwrap(),
            &Tensor::new(w.as_slice(), &dev).unwrap(),
            1e-5,
        )
        .unwrap(),
    );
    let mut out = Guarded::new(vec![f32::NAN; rows * width], f32::MAX);
    let (o, xp, wp) = (out.ptr(), x.as_ptr(), w.as_ptr());
    run(Launch::per_row(rows), order, || unsafe {
        k::rms_norm_f32(o, xp, wp, width as u32, 1e-5)
    });
    for (g, w) in out.inside().iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
    }

    // The residual connection and norm in one: the sums, then the norm of the sums,
    // each as the separate ops give them; and SwiGLU. The added rows and SwiGLU's input
    // come from a product: f32, or f16/bf16 from a half-precision weight.
    let y = values(rows * width, 11);
    let xt = Tensor::from_vec(x.clone(), (rows, width), &dev).unwrap();
    let wt = Tensor::new(w.as_slice(), &dev).unwrap();
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
        let mut want: Vec<f32> = to_vec(&sums);
        want.extend(to_vec::<f32>(&rms_norm(&sums, &wt, 1e-5).unwrap()));
        assert_eq!(
            to_vec::<f32>(&add_rms_norm(&xt, &yt, &wt, 1e-5).unwrap()),
            want
        );
        let gu = gate_up.to_dtype(product).unwrap();
        let want_swiglu: Vec<f32> = to_vec(&swiglu(&gu).unwrap());
        let mut out = Guarded::new(vec![f32::NAN; 2 * rows * width], f32::MAX);
        let mut out_swiglu = Guarded::new(vec![f32::NAN; rows * half], f32::MAX);
        let (o, os) = (out.ptr(), out_swiglu.ptr());
        let (r, wd, hf) = (rows as u32, width as u32, half as u32);
        macro_rules! go {
            ($t:ty, $add_norm:path, $swiglu:path) => {{
                let (yh, gh) = (to_vec::<$t>(&yt), to_vec::<$t>(&gu));
                let (yp, gp) = (yh.as_ptr(), gh.as_ptr());
                run(Launch::per_row(rows), order, || unsafe {
                    $add_norm(o, xp, yp, wp, r, wd, 1e-5)
                });
                run(Launch::elementwise(r * hf), order, || unsafe {
                    $swiglu(os, gp, r, hf)
                });
            }};
        }
        match product {
            DType::F16 => go!(f16, k::add_rms_norm_f16, k::swiglu_f16),
            DType::BF16 => go!(bf16, k::add_rms_norm_bf16, k::swiglu_bf16),
            _ => go!(f32, k::add_rms_norm_f32, k::swiglu_f32),
        }
        for (g, w) in out.inside().iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{product:?}: {g} vs {w}"
            );
        }
        for (g, w) in out_swiglu.inside().iter().zip(&want_swiglu) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{product:?}: {g} vs {w}"
            );
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
            let (shape, chunk) = Launch::draw(rows.len(), vocab);
            let mut out = Guarded::new(vec![u32::MAX; rows.len()], u32::MAX - 1);
            let (o, lp, sp) = (out.ptr(), logits.as_ptr(), settings.as_ptr());
            run(shape, order, || unsafe {
                k::draw_f32(o, lp, sp, vocab as u32, chunk)
            });
            assert_eq!(out.inside(), want.as_slice(), "vocab {vocab}, {d:?}");
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
            let (shape, chunk) = Launch::draw(rows.len(), vocab);
            let mut out = Guarded::new(vec![f32::NAN; rows.len() * (1 + 3 * n)], f32::MAX);
            let (o, lp, cp) = (out.ptr(), logits.as_ptr(), chosen.as_ptr());
            run(shape, order, || unsafe {
                k::top_logprobs_f32(o, lp, cp, vocab as u32, n as u32, chunk)
            });
            for (i, (g, w)) in out.inside().iter().zip(&want).enumerate() {
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
    let mut got = Guarded::new(logits, f32::MAX);
    let (g, ep, sp) = (got.ptr(), entries.as_ptr(), settings.as_ptr());
    run(Launch::elementwise(n as u32), order, || unsafe {
        k::penalise_f32(g, ep, sp, n as u32, vocab as u32)
    });
    assert_eq!(got.inside(), to_vec::<f32>(&t).as_slice());
}
