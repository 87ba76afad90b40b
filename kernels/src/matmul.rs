//! The matmul driver: quantise the activations once, split the weight rows into tasks on
//! the current rayon pool, let each task run a kernel panel over all activation rows,
//! and let each task write its weight rows' columns of `y` in place.

use rayon::prelude::*;

use crate::dot::{Outputs, Panel, uses_interleaved};
use crate::interleaved::GROUP_ROWS;
use crate::quantize::quantize;
use crate::{QuantMatrix, SimdLevel};

/// Tasks per pool thread, so a slow thread does not hold up the rest.
const TASKS_PER_THREAD: usize = 4;
/// Smallest task, in block products (about 1 ns each with SIMD): a microsecond or two of
/// work, enough to outweigh rayon's scheduling and let small decode products use 2 threads.
const MIN_TASK_BLOCKS: usize = 1024;
/// Tasks are whole interleaved groups: they waste no lanes, and each task's records start
/// at a group.
const ROW_GROUP: usize = GROUP_ROWS;

/// A kernel entry point of [`crate::dot`]: f32 products ([`crate::dot::panel`]) or f64 sums
/// ([`crate::dot::panel_wide`]).
pub(crate) type PanelFn<T> = fn(SimdLevel, &Panel, &mut Outputs<T>);

pub(crate) fn matmul<T: Copy + Default + Send + Sync>(
    level: SimdLevel,
    w: &QuantMatrix,
    x: &[f32],
    m: usize,
    y: &mut [T],
    panel: PanelFn<T>,
) {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(
        x.len(),
        m * k,
        "x has {} values, not m={m} x cols={k}",
        x.len()
    );
    assert_eq!(
        y.len(),
        m * n,
        "y has {} values, not m={m} x rows={n}",
        y.len()
    );
    assert!(level.is_available(), "{level} is not available on this CPU");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(T::default());
        return;
    }
    let acts = quantize(level, x, m, k);
    let row_bytes = w.row_bytes();
    let interleaved = uses_interleaved(level).then(|| w.interleaved());
    // Only the layout the kernels read is touched (the other may not exist).
    let gguf = if interleaved.is_some() {
        &[][..]
    } else {
        w.bytes()
    };
    let rows = rows_per_task(n, m * acts.blocks());
    let run = |task: usize, out: &mut Outputs<T>| {
        let (r0, r1) = (task * rows, ((task + 1) * rows).min(n));
        let p = Panel {
            format: w.format(),
            rows: r1 - r0,
            weights: gguf.get(r0 * row_bytes..r1 * row_bytes).unwrap_or_default(),
            row_bytes,
            interleaved: interleaved
                .map(|il| il.groups_from(w.format(), acts.blocks(), r0 / GROUP_ROWS)),
            acts: &acts,
        };
        panel(level, &p, out);
    };
    // Each task writes its weight rows' columns of every row of y, in place.
    let y = SharedOutputs(y.as_mut_ptr());
    (0..n.div_ceil(rows)).into_par_iter().for_each(|task| {
        let cols = task * rows..((task + 1) * rows).min(n);
        // SAFETY: y holds m rows of n outputs and is borrowed for this whole call; each
        // task reaches only its own columns.
        let mut out = unsafe { Outputs::columns(y.get(), n, m, cols) };
        run(task, &mut out);
    });
}

/// The output matrix, shared by the tasks of one product (each writes its own columns).
struct SharedOutputs<T>(*mut T);

// SAFETY: the tasks write disjoint columns (see `matmul`).
unsafe impl<T: Send> Sync for SharedOutputs<T> {}

impl<T> SharedOutputs<T> {
    // A method, so closures capture the wrapper (Sync), not the raw pointer field.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Weight rows per task when each row costs `blocks_per_row` block products: rounded to
/// the nearest multiple of [`ROW_GROUP`] where `n` allows, else all `n` in one task.
fn rows_per_task(n: usize, blocks_per_row: usize) -> usize {
    let even = n.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD);
    let min = MIN_TASK_BLOCKS.div_ceil(blocks_per_row);
    let rows = (even.max(min) + ROW_GROUP / 2) / ROW_GROUP * ROW_GROUP;
    rows.max(ROW_GROUP).min(n)
}
