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

unsafe extern "C" {
    fn emu_kernel(name: *const c_char) -> Option<unsafe extern "C" fn(*mut *mut c_void)>;
    fn emu_kernel_signature(name: *const c_char, out: *mut c_char, out_len: usize) -> i32;
    fn emu_kernel_names(out: *mut c_char, out_len: usize) -> i32;
}

/// Copies what `fill` writes (a C string of the length it returns) into a `String`.
fn c_string(fill: impl Fn(*mut c_char, usize) -> i32) -> Option<String> {
    let len = usize::try_from(fill(std::ptr::null_mut(), 0)).ok()?;
    let mut out = vec![0u8; len + 1];
    fill(out.as_mut_ptr().cast(), out.len());
    out.truncate(len);
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A kernel of `kernels.cu`, found by its name as a GPU's module lookup finds it, and
/// called as the driver calls it: with a pointer to each argument.
#[derive(Clone, Debug)]
pub struct Kernel {
    name: String,
    entry: unsafe extern "C" fn(*mut *mut c_void),
    signature: String,
}

impl Kernel {
    pub fn find(name: &str) -> Option<Kernel> {
        let c_name = std::ffi::CString::new(name).ok()?;
        // SAFETY: both read a NUL-terminated name; the signature's buffer length is
        // passed.
        let entry = unsafe { emu_kernel(c_name.as_ptr()) }?;
        let signature =
            c_string(|out, len| unsafe { emu_kernel_signature(c_name.as_ptr(), out, len) })?;
        Some(Kernel {
            name: name.to_string(),
            entry,
            signature,
        })
    }

    /// Its parameters' types as compiled, in order: `*f16` for a pointer to `__half`,
    /// `*bf16`, `*f32`, `*f64`, `*u32`, and `u32`, `u64`, `f32` for values.
    pub fn signature(&self) -> &str {
        &self.signature
    }

    /// Runs the kernel as every thread of `grid`, with `params[i]` pointing at its
    /// `i`-th argument (CUDA's `kernelParams`).
    ///
    /// # Safety
    /// Each of `params` must point at a value of its parameter's type (see
    /// [`Kernel::signature`]), and pointer arguments at buffers large enough for every
    /// access the kernel makes under `grid`, as on a GPU.
    pub unsafe fn launch(&self, grid: Grid, params: &[*mut c_void]) -> Result<(), String> {
        let arity = self.signature.split(',').filter(|s| !s.is_empty()).count();
        if params.len() != arity {
            return Err(format!(
                "{} takes {arity} arguments ({}), {} given",
                self.name,
                self.signature,
                params.len()
            ));
        }
        let entry = self.entry;
        let params = params.as_ptr() as *mut *mut c_void;
        // SAFETY: the caller's promise; the arity was checked.
        unsafe { launch(grid, || entry(params)) }
    }
}

/// Every kernel `kernels.cu` defines.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the buffer's length is passed.
    c_string(|out, len| unsafe { emu_kernel_names(out, len) })
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let swiglu = Kernel::find("swiglu_f32_f32").expect("kernels.cu defines swiglu_f32_f32");
        assert_eq!(swiglu.signature(), "*f32,*f32,u32,u32");
        let (mut o, mut g) = (out.as_mut_ptr(), gate_up.as_ptr());
        let (mut r, mut h) = (rows, half);
        let params: [*mut c_void; 4] = [
            (&raw mut o).cast(),
            (&raw mut g).cast(),
            (&raw mut r).cast(),
            (&raw mut h).cast(),
        ];
        // SAFETY: `out` holds rows · half floats, `gate_up` twice that; the kernel
        // skips threads past the end.
        unsafe { swiglu.launch(grid, &params) }.unwrap();
        // A wrong argument count is refused before any thread runs.
        let err = unsafe { swiglu.launch(grid, &params[..3]) }.unwrap_err();
        assert!(err.contains("takes 4 arguments"), "{err}");
        for r in 0..rows as usize {
            for c in 0..half as usize {
                let g = gate_up[r * 2 * half as usize + c];
                let u = gate_up[r * 2 * half as usize + half as usize + c];
                assert_eq!(out[r * half as usize + c], g / (1.0 + (-g).exp()) * u);
            }
        }
    }

    #[test]
    fn the_table_holds_every_kernel_by_name() {
        let names = kernel_names();
        for name in [
            "paged_rotate_write_bf16_f16",
            "paged_attend_combine_f32",
            "draw_f32",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        assert!(names.iter().all(|n| Kernel::find(n).is_some()));
        assert!(Kernel::find("no_such_kernel").is_none());
        assert_eq!(
            Kernel::find("paged_rotate_write_bf16_f16")
                .unwrap()
                .signature(),
            "*bf16,*f32,*f16,*f32,*u32,u32,u32,u32,u32,u32,u32,u32,u64"
        );
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
