//! The device backend's CUDA kernels (`worker/src/model/backend/ops/kernels.cu`), compiled
//! for the host and run thread by thread, so that the kernels themselves, not only their
//! Rust twins, are tested on machines without a GPU.
//!
//! Each thread of a block is a fiber; a block barrier or a warp shuffle switches back to
//! a scheduler that resumes the threads once every live one has arrived, so barriers,
//! shuffles and shared memory behave as on a GPU, and threads that can never meet are
//! reported as a deadlock. Arithmetic is IEEE without contraction: where `nvcc
//! --use_fast_math` approximates (`expf`, `sqrtf`, divisions), results differ from a
//! GPU's in the last bits, as the twins' do.
//!
//! Not a GPU: blocks run one after another (a kernel that needs two blocks at once would
//! deadlock), and nothing checks memory accesses: callers keep guard elements around
//! their buffers.

use std::ffi::{c_char, c_void};

/// A launch's shape: `blocks` (x, y) of `threads` threads, `shared_bytes` of dynamic
/// shared memory each, and the order its threads run in between barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub blocks: (u32, u32),
    pub threads: u32,
    pub shared_bytes: u32,
    pub order: Order,
}

/// The order a block's threads run in between two barriers. A GPU promises none: a
/// kernel whose result depends on it (a missing barrier) gives a different result in
/// one of the two, so tests run kernels in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    FirstToLast,
    LastToFirst,
}

impl Order {
    pub const BOTH: [Order; 2] = [Order::FirstToLast, Order::LastToFirst];
}

unsafe extern "C" {
    fn emu_launch(
        grid_x: u32,
        grid_y: u32,
        block_x: u32,
        shared_bytes: usize,
        reverse: i32,
        body: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

extern "C" fn call<F: Fn()>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `&F` that `launch` passed, alive for the whole launch.
    let body = unsafe { &*(ctx as *const F) };
    body();
}

/// Runs `kernel` (a call of one of [`kernels`]) as every thread of `grid`. One grid runs
/// at a time in the process (the kernels' `__shared__` variables are statics).
///
/// # Safety
/// `kernel` must call a kernel with pointers to buffers large enough for every access
/// the kernel makes under `grid`, as on a GPU.
pub unsafe fn launch<F: Fn()>(grid: Grid, kernel: F) -> Result<(), String> {
    let mut error = vec![0u8; 512];
    // SAFETY: `call::<F>` reads `ctx` as `&F`; the error buffer's length is passed.
    let status = unsafe {
        emu_launch(
            grid.blocks.0,
            grid.blocks.1,
            grid.threads,
            grid.shared_bytes as usize,
            i32::from(grid.order == Order::LastToFirst),
            call::<F>,
            &kernel as *const F as *mut c_void,
            error.as_mut_ptr().cast(),
            error.len(),
        )
    };
    if status == 0 {
        return Ok(());
    }
    let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
    Err(String::from_utf8_lossy(&error[..end]).into_owned())
}

/// The kernels of `kernels.cu`, by their C names and signatures.
#[allow(clippy::too_many_arguments)]
pub mod kernels {
    use half::{bf16, f16};

    /// The rotation and cache write: `NAME_<cache type>_<product type>`.
    macro_rules! rotation {
        ($write:ident, $queries:ident, $t:ty, $i:ty) => {
            unsafe extern "C" {
                pub fn $write(
                    cache: *mut $t,
                    qkv: *const $i,
                    trig: *const f32,
                    slots: *const u32,
                    tokens: u32,
                    width: u32,
                    q_width: u32,
                    kv_width: u32,
                    head_dim: u32,
                    half: u32,
                    interleaved: u32,
                    values_at: u64,
                );
                pub fn $queries(
                    out: *mut f32,
                    qkv: *const $i,
                    trig: *const f32,
                    tokens: u32,
                    width: u32,
                    q_width: u32,
                    head_dim: u32,
                    half: u32,
                    interleaved: u32,
                );
            }
        };
    }
    rotation!(paged_write_kv_f16_f32, rotate_queries_f16_f32, f16, f32);
    rotation!(paged_write_kv_f16_f16, rotate_queries_f16_f16, f16, f16);
    rotation!(paged_write_kv_f16_bf16, rotate_queries_f16_bf16, f16, bf16);
    rotation!(paged_write_kv_bf16_f32, rotate_queries_bf16_f32, bf16, f32);
    rotation!(paged_write_kv_bf16_f16, rotate_queries_bf16_f16, bf16, f16);
    rotation!(
        paged_write_kv_bf16_bf16,
        rotate_queries_bf16_bf16,
        bf16,
        bf16
    );
    rotation!(paged_write_kv_f32_f32, rotate_queries_f32_f32, f32, f32);
    rotation!(paged_write_kv_f32_f16, rotate_queries_f32_f16, f32, f16);
    rotation!(paged_write_kv_f32_bf16, rotate_queries_f32_bf16, f32, bf16);

    /// Attention over a cache of one type: `NAME_<cache type>`.
    macro_rules! attention {
        ($attend:ident, $tiles:ident, $t:ty) => {
            unsafe extern "C" {
                pub fn $attend(
                    out: *mut f32,
                    q: *const f32,
                    keys: *const $t,
                    values: *const $t,
                    tables: *const u32,
                    max_blocks: u32,
                    tokens: *const u32,
                    order: *const u32,
                    heads: u32,
                    kv_heads: u32,
                    head_dim: u32,
                    block_size: u32,
                    scale: f32,
                    chunks: u32,
                    chunk_len: u32,
                    partial: *mut f32,
                );
                pub fn $tiles(
                    out: *mut f32,
                    q: *const f32,
                    keys: *const $t,
                    values: *const $t,
                    tables: *const u32,
                    max_blocks: u32,
                    tokens: *const u32,
                    tiles: *const u32,
                    heads: u32,
                    kv_heads: u32,
                    head_dim: u32,
                    block_size: u32,
                    positions: u32,
                    scale: f32,
                );
            }
        };
    }
    attention!(paged_attend_f16, paged_attend_tiles_f16, f16);
    attention!(paged_attend_bf16, paged_attend_tiles_bf16, bf16);
    attention!(paged_attend_f32, paged_attend_tiles_f32, f32);

    /// What reads a product's output: `NAME_<product type>`.
    macro_rules! from_product {
        ($add_norm:ident, $swiglu:ident, $i:ty) => {
            unsafe extern "C" {
                pub fn $add_norm(
                    out: *mut f32,
                    x: *const f32,
                    y: *const $i,
                    weight: *const f32,
                    rows: u32,
                    width: u32,
                    eps: f32,
                );
                pub fn $swiglu(out: *mut f32, gate_up: *const $i, rows: u32, half: u32);
            }
        };
    }
    from_product!(add_rms_norm_f32, swiglu_f32, f32);
    from_product!(add_rms_norm_f16, swiglu_f16, f16);
    from_product!(add_rms_norm_bf16, swiglu_bf16, bf16);

    unsafe extern "C" {
        pub fn paged_attend_combine(
            out: *mut f32,
            partial: *const f32,
            order: *const u32,
            heads: u32,
            head_dim: u32,
            chunks: u32,
        );
        pub fn rms_norm_f32(out: *mut f32, x: *const f32, weight: *const f32, width: u32, eps: f32);
        pub fn draw_f32(
            out: *mut u32,
            logits: *const f32,
            settings: *const f64,
            vocab: u32,
            chunk: u32,
        );
        pub fn top_logprobs_f32(
            out: *mut f32,
            logits: *const f32,
            chosen: *const u32,
            vocab: u32,
            n: u32,
            chunk: u32,
        );
        pub fn penalise_f32(
            rows: *mut f32,
            entries: *const u32,
            settings: *const f32,
            n: u32,
            vocab: u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::kernels::swiglu_f32;

    unsafe extern "C" {
        fn emu_selftest_split_warp(out: *mut f32);
        fn emu_selftest_warp_sum(out: *mut f32, exited: u32);
        fn emu_selftest_missing_barrier(out: *mut f32);
    }

    fn grid(threads: u32) -> Grid {
        Grid {
            blocks: (2, 1),
            threads,
            shared_bytes: 0,
            order: Order::FirstToLast,
        }
    }

    #[test]
    fn shuffles_exchange_within_each_warp() {
        let mut out = vec![0f32; 64];
        let o = out.as_mut_ptr();
        // SAFETY: one float per thread of a 64-thread block.
        unsafe { launch(grid(64), || emu_selftest_warp_sum(o, 0)) }.unwrap();
        // Each warp's lanes all hold the sum of the warp's thread indices.
        assert!(out[..32].iter().all(|&x| x == (0..32).sum::<u32>() as f32));
        assert!(out[32..].iter().all(|&x| x == (32..64).sum::<u32>() as f32));
    }

    #[test]
    fn the_two_orders_tell_a_missing_barrier() {
        let seen = |order| {
            let mut out = vec![f32::NAN; 2];
            let o = out.as_mut_ptr();
            let grid = Grid { order, ..grid(64) };
            // SAFETY: one float per block.
            unsafe { launch(grid, || emu_selftest_missing_barrier(o)) }.unwrap();
            out
        };
        assert_eq!(seen(Order::FirstToLast), [1.0, 1.0]);
        assert_eq!(seen(Order::LastToFirst), [0.0, 0.0]);
    }

    #[test]
    fn broken_kernels_are_reported_not_hung() {
        let mut out = vec![0f32; 64];
        let o = out.as_mut_ptr();
        // SAFETY: one float per thread of a 64-thread block.
        let err = unsafe { launch(grid(64), || emu_selftest_split_warp(o)) }.unwrap_err();
        assert!(err.contains("deadlock"), "{err}");
        // SAFETY: as above.
        let err = unsafe { launch(grid(64), || emu_selftest_warp_sum(o, 3)) }.unwrap_err();
        assert!(err.contains("exited"), "{err}");
    }

    #[test]
    fn a_grid_runs_every_thread_once() {
        let (rows, half) = (3u32, 700u32);
        let gate_up: Vec<f32> = (0..rows * 2 * half)
            .map(|i| (i % 17) as f32 * 0.25 - 2.0)
            .collect();
        let mut out = vec![f32::NAN; (rows * half) as usize];
        let n = rows * half;
        let grid = Grid {
            blocks: (n.div_ceil(256), 1),
            threads: 256,
            shared_bytes: 0,
            order: Order::FirstToLast,
        };
        let (o, g) = (out.as_mut_ptr() as usize, gate_up.as_ptr() as usize);
        // SAFETY: `out` holds rows · half floats, `gate_up` twice that; the kernel
        // skips threads past the end.
        unsafe {
            launch(grid, || {
                swiglu_f32(o as *mut f32, g as *const f32, rows, half)
            })
        }
        .unwrap();
        for r in 0..rows as usize {
            for c in 0..half as usize {
                let g = gate_up[r * 2 * half as usize + c];
                let u = gate_up[r * 2 * half as usize + half as usize + c];
                assert_eq!(out[r * half as usize + c], g / (1.0 + (-g).exp()) * u);
            }
        }
    }

    #[test]
    fn too_much_shared_memory_is_refused() {
        let grid = Grid {
            blocks: (1, 1),
            threads: 32,
            shared_bytes: 64 * 1024,
            order: Order::FirstToLast,
        };
        // SAFETY: the launch is refused before any thread runs.
        let err = unsafe { launch(grid, || {}) }.unwrap_err();
        assert!(err.contains("shared memory"), "{err}");
    }
}
