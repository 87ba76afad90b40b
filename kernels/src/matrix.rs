//! [`QuantMatrix`]: a block-quantised weight matrix, validated once, held in the layout its
//! kernels read (GGUF blocks, or interleaved rows on x86).

use std::sync::OnceLock;

use crate::format::{BLOCK, dequantize_block};
use crate::interleaved::{GROUP_ROWS, Interleaved};
use crate::{KernelError, QuantFormat, SimdLevel, dot, matmul, simd_level};

/// A `rows x cols` weight matrix (`rows` output features, `cols` input features) in a ggml
/// block format: row-major, each row `cols / 32` blocks, bytes exactly as a GGUF file
/// stores them.
///
/// The weights are held in one or both of two layouts, each built from the other when
/// first needed: the GGUF blocks, and on x86 a copy interleaved sixteen rows at a time for
/// the packed kernels (the size of the GGUF bytes for the 4-bit formats), which the
/// products of the AVX2 and AVX-512 levels use. [`QuantMatrix::prepare`] keeps only the
/// layout this CPU's products need.
#[derive(Clone)]
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// At least one of the two is set.
    gguf: OnceLock<Vec<u8>>,
    interleaved: OnceLock<Interleaved>,
}

impl PartialEq for QuantMatrix {
    fn eq(&self, other: &Self) -> bool {
        (self.format, self.rows, self.cols, self.bytes())
            == (other.format, other.rows, other.cols, other.bytes())
    }
}

impl Eq for QuantMatrix {}

impl QuantMatrix {
    /// Wrap GGUF tensor bytes, checking that `cols` splits into blocks and that `bytes`
    /// holds exactly `rows x cols` weights.
    pub fn new(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<Self, KernelError> {
        Self::check(format, rows, cols, bytes.len())?;
        Ok(Self {
            format,
            rows,
            cols,
            gguf: OnceLock::from(bytes),
            interleaved: OnceLock::new(),
        })
    }

    /// [`QuantMatrix::new`] already [prepared](QuantMatrix::prepare), reading `bytes` (a
    /// memory-mapped file, say) without keeping them: where this CPU's products use the
    /// interleaved layout it is built straight from them, with no copy of the GGUF bytes.
    pub fn prepared(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, KernelError> {
        Self::check(format, rows, cols, bytes.len())?;
        if !dot::uses_interleaved(simd_level()) {
            return Self::new(format, rows, cols, bytes.to_vec());
        }
        Ok(Self {
            format,
            rows,
            cols,
            gguf: OnceLock::new(),
            interleaved: OnceLock::from(Interleaved::new(format, rows, cols, bytes)),
        })
    }

    /// The matrices `parts` one under the other (same format and columns), in the layout
    /// they hold: interleaved records are joined as they are where every part but the last
    /// fills whole groups of sixteen rows, else through the GGUF bytes.
    pub fn stack(parts: &[&QuantMatrix]) -> Result<Self, KernelError> {
        let first = parts.first().ok_or(KernelError::NothingToStack)?;
        let (format, cols) = (first.format, first.cols);
        if let Some(other) = parts.iter().find(|m| (m.format, m.cols) != (format, cols)) {
            return Err(KernelError::StackMismatch {
                first: (format, cols),
                other: (other.format, other.cols),
            });
        }
        let rows = parts.iter().map(|m| m.rows).sum();
        let whole_groups = parts[..parts.len() - 1]
            .iter()
            .all(|m| m.rows.is_multiple_of(GROUP_ROWS));
        let records: Option<Vec<&Interleaved>> =
            parts.iter().map(|m| m.interleaved.get()).collect();
        if let Some(records) = records.filter(|_| whole_groups) {
            return Ok(Self {
                format,
                rows,
                cols,
                gguf: OnceLock::new(),
                interleaved: OnceLock::from(Interleaved::concat(&records)),
            });
        }
        let bytes = parts
            .iter()
            .flat_map(|m| m.bytes().iter().copied())
            .collect();
        let mut stacked = Self::new(format, rows, cols, bytes)?;
        if parts.iter().any(|m| m.gguf.get().is_none()) {
            stacked.prepare();
        }
        Ok(stacked)
    }

    /// Whether `len` bytes hold `rows x cols` weights of `format`.
    fn check(format: QuantFormat, rows: usize, cols: usize, len: usize) -> Result<(), KernelError> {
        let block_len = format.block_len();
        if !cols.is_multiple_of(block_len) {
            return Err(KernelError::RaggedColumns {
                format,
                cols,
                block_len,
            });
        }
        let blocks = rows * (cols / block_len);
        let expected = blocks * format.block_bytes();
        if len != expected {
            return Err(KernelError::ByteLength {
                format,
                rows,
                cols,
                blocks,
                block_bytes: format.block_bytes(),
                expected,
                actual: len,
            });
        }
        Ok(())
    }

    /// Arrange the weights for this CPU's kernels now (while a model loads) rather than in
    /// the first product, and keep only that layout: where the products use the
    /// interleaved copy, build it and drop the GGUF bytes (rebuilt should they be asked
    /// for again), so the weights are held once.
    pub fn prepare(&mut self) {
        if dot::uses_interleaved(simd_level()) {
            self.interleaved();
            self.gguf.take();
        }
    }

    /// Bytes held for this matrix, in whichever layouts it holds.
    pub fn memory_bytes(&self) -> usize {
        self.gguf.get().map_or(0, Vec::len) + self.interleaved.get().map_or(0, Interleaved::bytes)
    }

    /// The interleaved copy, built on first use.
    pub(crate) fn interleaved(&self) -> &Interleaved {
        self.interleaved
            .get_or_init(|| Interleaved::new(self.format, self.rows, self.cols, self.bytes()))
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// The blocks, as stored in the GGUF file (rebuilt from the interleaved copy if
    /// [`QuantMatrix::prepare`] dropped them).
    pub fn bytes(&self) -> &[u8] {
        self.gguf.get_or_init(|| {
            let il = self
                .interleaved
                .get()
                .expect("a matrix holds at least one layout");
            il.to_gguf(self.format, self.rows, self.cols)
        })
    }

    /// Bytes of one row.
    pub(crate) fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// `y = x · Wᵀ`: `x` is `m x cols` and `y` is `m x rows`, both row-major. Activations
    /// are quantised to 8 bits per 32-block first, as llama.cpp does. Runs on the current
    /// rayon pool with the fastest [`SimdLevel`] this CPU has.
    ///
    /// Each output is a function of its weight row and activation row alone, bit for bit on
    /// a given level: the same whatever `m`, wherever the row sits in `x`, however many
    /// threads the pool has. A row scored in a batch and the same row alone agree exactly.
    ///
    /// # Panics
    /// If `x` or `y` do not have `m * cols` and `m * rows` elements.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.matmul_with(simd_level(), x, m, y);
    }

    /// [`QuantMatrix::matmul`] on a chosen instruction set, to compare levels.
    ///
    /// # Panics
    /// As [`QuantMatrix::matmul`], and if this CPU cannot run `level`.
    pub fn matmul_with(&self, level: SimdLevel, x: &[f32], m: usize, y: &mut [f32]) {
        matmul::matmul(level, self, x, m, y, dot::panel);
    }

    /// [`QuantMatrix::matmul`] with each output left as an f64 sum of its blocks' terms,
    /// unrounded, for products split over the columns (a row-parallel layer's shards):
    /// the f64 sums of a row's column slices (cut at block boundaries) add up to the whole
    /// row's f64 sum up to f64 rounding, so once rounded to f32 a sharded product agrees
    /// with an unsharded one (to within one f32 rounding, and almost always exactly).
    ///
    /// Every block's term is formed identically on every instruction set (integer block
    /// sum times `f64(dw)·f64(da)`, then the minimum term), so the results are the same
    /// bits on every [`SimdLevel`], and, as with `matmul`, whatever `m` and the threads.
    ///
    /// # Panics
    /// As [`QuantMatrix::matmul`].
    pub fn matmul_wide(&self, x: &[f32], m: usize, y: &mut [f64]) {
        self.matmul_wide_with(simd_level(), x, m, y);
    }

    /// [`QuantMatrix::matmul_wide`] on a chosen instruction set.
    ///
    /// # Panics
    /// As [`QuantMatrix::matmul_with`].
    pub fn matmul_wide_with(&self, level: SimdLevel, x: &[f32], m: usize, y: &mut [f64]) {
        matmul::matmul(level, self, x, m, y, dot::panel_wide);
    }

    /// Dequantise row `r` into `out` (`cols` floats), e.g. to look up a token embedding.
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of a matrix with {} rows", self.rows);
        assert_eq!(
            out.len(),
            self.cols,
            "output length vs {} columns",
            self.cols
        );
        let bb = self.format.block_bytes();
        if let Some(gguf) = self.gguf.get() {
            let rb = self.row_bytes();
            for (block, out) in gguf[r * rb..(r + 1) * rb]
                .chunks_exact(bb)
                .zip(out.chunks_exact_mut(BLOCK))
            {
                dequantize_block(self.format, block, out);
            }
            return;
        }
        let il = self
            .interleaved
            .get()
            .expect("a matrix holds at least one layout");
        let mut block = [0u8; 34];
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            il.block(self.format, self.cols / BLOCK, r, b, &mut block[..bb]);
            dequantize_block(self.format, &block[..bb], out);
        }
    }
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}
