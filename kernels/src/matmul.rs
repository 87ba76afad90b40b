//! The matmul driver: quantise the activations once, split the weight rows into tasks on
//! the current rayon pool, let each task run a kernel panel over all activation rows,
//! and gather the tasks' column blocks into `y`.

use rayon::prelude::*;

use crate::dot::{Panel, uses_interleaved};
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
pub(crate) type PanelFn<T> = fn(SimdLevel, &Panel, &mut [T]);

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
    let interleaved = uses_interleaved(level, w.format()).then(|| w.interleaved());
    // Only the layout the kernels read is touched (the other may not exist).
    let gguf = if interleaved.is_some() {
        &[][..]
    } else {
        w.bytes()
    };
    let rows = rows_per_task(n, m * acts.blocks());
    let run = |task: usize, out: &mut [T]| {
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
    if m == 1 {
        y.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(task, out)| run(task, out));
        return;
    }
    // Each task fills an activation-major buffer for its weight rows (a column block of y);
    // the rows of y then gather their pieces with contiguous copies.
    let parts: Vec<Vec<T>> = (0..n.div_ceil(rows))
        .into_par_iter()
        .map(|task| {
            let mut out = vec![T::default(); m * rows.min(n - task * rows)];
            run(task, &mut out);
            out
        })
        .collect();
    y.par_chunks_mut(n).enumerate().for_each(|(a, y)| {
        let mut r0 = 0;
        for part in &parts {
            let len = part.len() / m;
            y[r0..r0 + len].copy_from_slice(&part[a * len..(a + 1) * len]);
            r0 += len;
        }
    });
}

/// Weight rows per task when each row costs `blocks_per_row` block products: rounded to
/// the nearest multiple of [`ROW_GROUP`] where `n` allows, else all `n` in one task.
fn rows_per_task(n: usize, blocks_per_row: usize) -> usize {
    let even = n.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD);
    let min = MIN_TASK_BLOCKS.div_ceil(blocks_per_row);
    let rows = (even.max(min) + ROW_GROUP / 2) / ROW_GROUP * ROW_GROUP;
    rows.max(ROW_GROUP).min(n)
}
