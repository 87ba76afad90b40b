//! GGUF/ggml block layouts: sizes, field offsets and the scalar dequantiser that defines
//! what each stored byte means. Every kernel agrees with [`dequantize_block`].

use half::f16;

/// Weights per block, the same for every supported format.
pub(crate) const BLOCK: usize = 32;

/// A ggml block-quantised weight format, 32 weights per block, stored little-endian.
///
/// | format | block bytes | layout | weight `e` |
/// | --- | --- | --- | --- |
/// | `Q4_0` | 18 | `d: f16, qs: [u8; 16]` | `(q - 8) * d` |
/// | `Q4_1` | 20 | `d: f16, m: f16, qs: [u8; 16]` | `q * d + m` |
/// | `Q5_0` | 22 | `d: f16, qh: u32, qs: [u8; 16]` | `(q - 16) * d` |
/// | `Q5_1` | 24 | `d: f16, m: f16, qh: u32, qs: [u8; 16]` | `q * d + m` |
/// | `Q8_0` | 34 | `d: f16, qs: [i8; 32]` | `q * d` |
///
/// 4-bit `q` of weight `e < 16` is the low nibble of `qs[e]`, of `e >= 16` the high nibble of
/// `qs[e - 16]`; the 5-bit formats add bit `e` of `qh` as bit 4.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl QuantFormat {
    /// Every supported format, for tests and benchmarks that sweep them.
    pub const ALL: [QuantFormat; 5] = [Self::Q4_0, Self::Q4_1, Self::Q5_0, Self::Q5_1, Self::Q8_0];

    /// Weights per block.
    pub const fn block_len(self) -> usize {
        BLOCK
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }

    /// Whether blocks carry a minimum `m` (`value = q * d + m`).
    pub const fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// What the kernels add to a stored integer `q` to make it the unsigned byte they
    /// multiply (`u = q + zero_point`, so that `Σ q·a = Σ u·a - zero_point·Σa`).
    pub(crate) const fn zero_point(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            Self::Q5_0 => 16,
            Self::Q8_0 => 128,
            Self::Q4_1 | Self::Q5_1 => 0,
        }
    }

    /// Whether every `u` fits in a nibble (the 4-bit formats).
    pub(crate) const fn is_nibbles(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1)
    }

    /// The ggml name, as GGUF tools print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The f16 stored at `off` in a block, widened.
pub(crate) fn f16_at(block: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([block[off], block[off + 1]]).to_f32()
}

/// The 32 high bits of a 5-bit block stored at `off`.
pub(crate) fn u32_at(block: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([block[off], block[off + 1], block[off + 2], block[off + 3]])
}

/// The stored integer of weight `e` (0..32) of a 4- or 5-bit block: nibble plus high bit.
pub(crate) fn small_quant(qs: &[u8], qh: u32, e: usize) -> i32 {
    let nibble = if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    };
    i32::from(nibble) | (((qh >> e) & 1) << 4) as i32
}

/// The block's integers and its affine map `value = q * d + m`: `(q[32], d, m)`.
/// Zero points (`-8`, `-16`) are folded into `q` so the map is uniform across formats.
pub(crate) fn decode_block(format: QuantFormat, b: &[u8]) -> ([i32; BLOCK], f32, f32) {
    let mut q = [0i32; BLOCK];
    let d = f16_at(b, 0);
    let m = match format {
        QuantFormat::Q4_0 => {
            q.iter_mut()
                .enumerate()
                .for_each(|(e, q)| *q = small_quant(&b[2..18], 0, e) - 8);
            0.0
        }
        QuantFormat::Q4_1 => {
            q.iter_mut()
                .enumerate()
                .for_each(|(e, q)| *q = small_quant(&b[4..20], 0, e));
            f16_at(b, 2)
        }
        QuantFormat::Q5_0 => {
            let qh = u32_at(b, 2);
            q.iter_mut()
                .enumerate()
                .for_each(|(e, q)| *q = small_quant(&b[6..22], qh, e) - 16);
            0.0
        }
        QuantFormat::Q5_1 => {
            let qh = u32_at(b, 4);
            q.iter_mut()
                .enumerate()
                .for_each(|(e, q)| *q = small_quant(&b[8..24], qh, e));
            f16_at(b, 2)
        }
        QuantFormat::Q8_0 => {
            q.iter_mut()
                .zip(&b[2..34])
                .for_each(|(q, &v)| *q = i32::from(v as i8));
            0.0
        }
    };
    (q, d, m)
}

/// Dequantise one block (`format.block_bytes()` bytes) into 32 floats.
pub(crate) fn dequantize_block(format: QuantFormat, block: &[u8], out: &mut [f32]) {
    let (q, d, m) = decode_block(format, block);
    for (o, q) in out.iter_mut().zip(q) {
        *o = q as f32 * d + m;
    }
}
