//! [`Interleaved`]: a weight matrix rearranged once for the batched x86 kernels, sixteen
//! rows at a time, so that one integer instruction advances the dot products of many rows
//! (one per i32 lane) and no product has to pack weights before it multiplies.
//!
//! Layout: rows are taken in groups of [`GROUP_ROWS`] (the last one padded with zero rows,
//! scale 0); each (group, block) is one record of 64-byte lines:
//! - the weight integers as unsigned bytes `u = q + zero_point`, four per row per vector:
//!   for the 4-bit formats four lines, where line `g` holds bytes `4g..4g+4` of each row's
//!   sixteen nibble bytes (row `i` at bytes `4i..4i+4`), whose low nibbles are elements
//!   `4g..4g+4` and high nibbles elements `16+4g..16+4g+4`; for the other formats eight
//!   lines, line `g` holding elements `4g..4g+4` of each row;
//! - one line of scales: the sixteen rows' f16 `d` (bytes 0..32), then their f16 `m` (32..64,
//!   zero for formats without a minimum), exactly as stored in the blocks.
//!
//! A 512-bit kernel reads a line as one vector of sixteen rows; a 256-bit kernel reads its
//! low and high halves as two groups of eight. The nibble formats keep their size (Q4_1:
//! 320 bytes per sixteen rows and 32 weights, as in GGUF).

use rayon::prelude::*;

use crate::QuantFormat;
use crate::format::{BLOCK, decode_block};

/// Weight rows per group: one per i32 lane of a 512-bit vector.
pub(crate) const GROUP_ROWS: usize = 16;

/// One 64-byte line, aligned so that a 512-bit load never splits a cache line.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [u8; 64]);

/// A matrix in the interleaved layout (see the module documentation).
#[derive(Clone)]
pub(crate) struct Interleaved {
    lines: Vec<Line>,
}

/// Lines of weight bytes per record.
pub(crate) const fn weight_lines(format: QuantFormat) -> usize {
    if format.is_nibbles() { 4 } else { 8 }
}

/// Lines per (group, block) record: the weight lines, then the scale line.
pub(crate) const fn record_lines(format: QuantFormat) -> usize {
    weight_lines(format) + 1
}

impl Interleaved {
    /// Rearrange `rows x cols` weights stored as GGUF blocks (`bytes`, sizes checked by
    /// the caller), on the current rayon pool.
    pub(crate) fn new(format: QuantFormat, rows: usize, cols: usize, bytes: &[u8]) -> Self {
        let nb = cols / BLOCK;
        let row_bytes = nb * format.block_bytes();
        let group_lines = nb * record_lines(format);
        let mut lines = vec![Line([0; 64]); rows.div_ceil(GROUP_ROWS) * group_lines];
        if group_lines == 0 {
            return Self { lines };
        }
        lines
            .par_chunks_mut(group_lines)
            .zip(bytes.par_chunks(GROUP_ROWS * row_bytes))
            .for_each(|(group, rows)| {
                for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
                    let blocks = row.chunks_exact(format.block_bytes());
                    for (record, block) in group.chunks_exact_mut(record_lines(format)).zip(blocks)
                    {
                        put_row(format, block, i, record);
                    }
                }
            });
        Self { lines }
    }

    /// The records of groups `from..`, each `nb` records long.
    pub(crate) fn groups_from(&self, format: QuantFormat, nb: usize, from: usize) -> &[Line] {
        &self.lines[from * nb * record_lines(format)..]
    }

    /// The groups of `parts` one after the other: the matrix of their rows, one under
    /// the other, when every part but the last fills whole groups.
    pub(crate) fn concat(parts: &[&Interleaved]) -> Self {
        Self {
            lines: parts.iter().flat_map(|p| p.lines.iter().copied()).collect(),
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.lines.as_slice())
    }

    /// The GGUF bytes of the `rows x cols` matrix this was built from, exactly.
    pub(crate) fn to_gguf(&self, format: QuantFormat, rows: usize, cols: usize) -> Vec<u8> {
        let nb = cols / BLOCK;
        let mut bytes = vec![0; rows * nb * format.block_bytes()];
        if nb == 0 {
            return bytes;
        }
        bytes
            .par_chunks_mut(nb * format.block_bytes())
            .enumerate()
            .for_each(|(r, row)| {
                for (b, block) in row.chunks_exact_mut(format.block_bytes()).enumerate() {
                    get_row(format, self.record(format, nb, r, b), r % GROUP_ROWS, block);
                }
            });
        bytes
    }

    /// Row `r`'s block `b`, as GGUF stores it, into `block`.
    pub(crate) fn block(
        &self,
        format: QuantFormat,
        nb: usize,
        r: usize,
        b: usize,
        block: &mut [u8],
    ) {
        get_row(format, self.record(format, nb, r, b), r % GROUP_ROWS, block);
    }

    /// The record of row `r`'s group and block `b`.
    fn record(&self, format: QuantFormat, nb: usize, r: usize, b: usize) -> &[Line] {
        let at = (r / GROUP_ROWS * nb + b) * record_lines(format);
        &self.lines[at..at + record_lines(format)]
    }
}

/// Write row `i` (0..16) of one GGUF block into its record.
fn put_row(format: QuantFormat, block: &[u8], i: usize, record: &mut [Line]) {
    let (q, ..) = decode_block(format, block);
    let u = q.map(|q| u8::try_from(q + format.zero_point()).expect("u = q + zero point is a byte"));
    let (weights, scales) = record.split_at_mut(weight_lines(format));
    if format.is_nibbles() {
        for (g, line) in weights.iter_mut().enumerate() {
            for j in 0..4 {
                let e = 4 * g + j;
                line.0[4 * i + j] = u[e] | u[e + 16] << 4;
            }
        }
    } else {
        for (g, line) in weights.iter_mut().enumerate() {
            line.0[4 * i..4 * i + 4].copy_from_slice(&u[4 * g..4 * g + 4]);
        }
    }
    let scales = &mut scales[0].0;
    scales[2 * i..2 * i + 2].copy_from_slice(&block[..2]);
    if format.has_min() {
        scales[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&block[2..4]);
    }
}

/// Read row `i` (0..16) of a record back into its GGUF block (the inverse of [`put_row`]).
fn get_row(format: QuantFormat, record: &[Line], i: usize, block: &mut [u8]) {
    let (weights, scales) = record.split_at(weight_lines(format));
    let mut u = [0u8; BLOCK];
    if format.is_nibbles() {
        for (g, line) in weights.iter().enumerate() {
            for j in 0..4 {
                let byte = line.0[4 * i + j];
                u[4 * g + j] = byte & 0x0F;
                u[4 * g + j + 16] = byte >> 4;
            }
        }
    } else {
        for (g, line) in weights.iter().enumerate() {
            u[4 * g..4 * g + 4].copy_from_slice(&line.0[4 * i..4 * i + 4]);
        }
    }
    let scales = &scales[0].0;
    block[..2].copy_from_slice(&scales[2 * i..2 * i + 2]);
    if format.has_min() {
        block[2..4].copy_from_slice(&scales[32 + 2 * i..32 + 2 * i + 2]);
    }
    encode_block(format, &u, block);
}

/// Store the unsigned integers `u` of a block in `format`'s layout (the scales, already in
/// place, are left alone).
fn encode_block(format: QuantFormat, u: &[u8; BLOCK], block: &mut [u8]) {
    let nibbles = |qs: &mut [u8]| {
        for (j, q) in qs.iter_mut().enumerate() {
            *q = u[j] & 0x0F | (u[j + 16] & 0x0F) << 4;
        }
    };
    let high_bits = || (0..BLOCK).fold(0u32, |qh, e| qh | u32::from(u[e] >> 4) << e);
    match format {
        QuantFormat::Q4_0 => nibbles(&mut block[2..18]),
        QuantFormat::Q4_1 => nibbles(&mut block[4..20]),
        QuantFormat::Q5_0 => {
            block[2..6].copy_from_slice(&high_bits().to_le_bytes());
            nibbles(&mut block[6..22]);
        }
        QuantFormat::Q5_1 => {
            block[4..8].copy_from_slice(&high_bits().to_le_bytes());
            nibbles(&mut block[8..24]);
        }
        QuantFormat::Q8_0 => {
            for (q, &u) in block[2..34].iter_mut().zip(u) {
                *q = u ^ 0x80;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_bytes_survive_the_round_trip() {
        // Rows not a multiple of sixteen (a padded last group), several blocks per row,
        // every byte value in every position (zero point, high bits, minimums).
        let mut state = 0x9e37_79b9_u32;
        for format in QuantFormat::ALL {
            for (rows, cols) in [(1, 32), (16, 64), (37, 96), (5, 0)] {
                let bytes: Vec<u8> = (0..rows * cols / BLOCK * format.block_bytes())
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        state as u8
                    })
                    .collect();
                let il = Interleaved::new(format, rows, cols, &bytes);
                assert_eq!(
                    il.to_gguf(format, rows, cols),
                    bytes,
                    "{format} {rows}x{cols}"
                );
                let nb = cols / BLOCK;
                for r in 0..rows {
                    for b in 0..nb {
                        let mut block = vec![0; format.block_bytes()];
                        il.block(format, nb, r, b, &mut block);
                        let at = (r * nb + b) * format.block_bytes();
                        assert_eq!(block, &bytes[at..at + format.block_bytes()]);
                    }
                }
            }
        }
    }

    #[test]
    fn sixteen_rows_of_q4_keep_their_gguf_size() {
        let il = Interleaved::new(QuantFormat::Q4_1, 16, 64, &[0; 16 * 2 * 20]);
        assert_eq!(il.bytes(), 16 * 2 * 20);
    }
}
