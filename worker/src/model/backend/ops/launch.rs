//! How each kernel of `kernels.cu` is launched: one place for the GPU (`cuda.rs`) and
//! for the tests that run the kernels' source on the host (`emulated.rs`).

use super::TILE_TOKENS;

/// Threads per block of the attention and RMSNorm kernels (`THREADS` in `kernels.cu`).
pub const THREADS: u32 = 128;
/// The widest head the attention kernel takes (`THREADS * PER_THREAD`).
pub const MAX_HEAD_DIM: usize = 512;

/// Threads per block of the tiled attention kernel (`TILE_THREADS`), and the widest
/// head it takes (its outputs per thread).
const TILE_THREADS: u32 = 256;
pub const MAX_TILED_HEAD_DIM: usize = 256;
/// Dynamic shared memory a block may have without opting in, less the kernels' static.
const SHARED_BYTES: usize = 47 * 1024;
/// Threads per block of the draw kernels (`DRAW_THREADS` in `kernels.cu`).
pub const DRAW_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels (cudarc's `for_num_elems`).
const ELEMENTWISE_THREADS: u32 = 1024;

/// A launch: `blocks` (x, y) of `threads` threads with `shared_bytes` of dynamic
/// shared memory each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub blocks: (u32, u32),
    pub threads: u32,
    pub shared_bytes: u32,
}

impl Launch {
    /// One thread per element of `n`.
    pub fn elementwise(n: u32) -> Self {
        Self {
            blocks: (n.div_ceil(ELEMENTWISE_THREADS), 1),
            threads: ELEMENTWISE_THREADS,
            shared_bytes: 0,
        }
    }

    /// Attention: a block per (token, head), the query and a tile's weights shared.
    pub fn attend(tokens: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            blocks: (tokens as u32, heads as u32),
            threads: THREADS,
            shared_bytes: (head_dim as u32 + THREADS) * 4,
        }
    }

    /// Tiled attention: a block per (run of tokens, head), and the positions a tile of
    /// the cache holds (at most 32, as many as shared memory fits: queries, keys and
    /// values of the tile, and weights, in f32). `None` where heads are wider than the
    /// kernel takes.
    pub fn attend_tiles(tiles: usize, heads: usize, head_dim: usize) -> Option<(Self, u32)> {
        if head_dim > MAX_TILED_HEAD_DIM {
            return None;
        }
        let bytes = |p: usize| (TILE_TOKENS * head_dim + 2 * p * head_dim + TILE_TOKENS * p) * 4;
        let positions = [32, 16, 8, 4]
            .into_iter()
            .find(|&p| bytes(p) <= SHARED_BYTES)?;
        let launch = Self {
            blocks: (tiles as u32, heads as u32),
            threads: TILE_THREADS,
            shared_bytes: bytes(positions) as u32,
        };
        Some((launch, positions as u32))
    }

    /// A block per row (RMSNorm).
    pub fn per_row(rows: usize) -> Self {
        Self {
            blocks: (rows as u32, 1),
            threads: THREADS,
            shared_bytes: 0,
        }
    }

    /// The draw kernels: a block per row, each thread owning `chunk` ids (whole 32-bit
    /// words of the kept-token bitmap, which lives in dynamic shared memory). Returns
    /// the launch and `chunk`.
    pub fn draw(rows: usize, vocab: usize) -> (Self, u32) {
        let chunk = (vocab as u32).div_ceil(DRAW_THREADS).div_ceil(32) * 32;
        let launch = Self {
            blocks: (rows as u32, 1),
            threads: DRAW_THREADS,
            shared_bytes: chunk * DRAW_THREADS / 8,
        };
        (launch, chunk)
    }
}
