//! How each kernel of `kernels.cu` is launched: one place for the GPU (`cuda.rs`) and
//! for the tests that run the kernels' source on the host (`emulated.rs`).

use super::TILE_TOKENS;

/// Threads per block of the attention and RMSNorm kernels (`THREADS` in `kernels.cu`).
pub const THREADS: u32 = 128;
/// Warps per block of the attention kernel (`WARPS`).
const WARPS: u32 = THREADS / 32;
/// The widest head the attention kernel takes (`32 * PER_LANE`).
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

    /// Attention: a block per (token, head, chunk of positions), the query and each
    /// warp's accumulators (for the merge: a row of `head_dim`, or up to 32 lanes of
    /// 16-byte reads of f16 in rows of groups of positions: 256 floats) in shared
    /// memory.
    pub fn attend(tokens: usize, heads: usize, head_dim: usize, chunks: u32) -> Self {
        let per_warp = head_dim.max(256) as u32;
        Self {
            blocks: (tokens as u32 * chunks, heads as u32),
            threads: THREADS,
            shared_bytes: (head_dim as u32 + WARPS * per_warp) * 4,
        }
    }

    /// The merge of attention's chunks: a block per (token, head).
    pub fn attend_combine(tokens: usize, heads: usize) -> Self {
        Self {
            blocks: (tokens as u32, heads as u32),
            threads: THREADS,
            shared_bytes: 0,
        }
    }

    /// How the per-token attention kernel splits each token's positions: `(chunks,
    /// positions a chunk)`. One chunk (the whole sequence) unless the (token, head)
    /// pairs are too few to keep a GPU's multiprocessors busy (an H100 has 132): then
    /// enough chunks, of at least 512 positions, for about 512 blocks. `longest` is
    /// the most positions a token sees.
    pub fn attend_chunks(tokens: usize, heads: usize, longest: usize) -> (u32, u32) {
        const BLOCKS: usize = 512;
        const MIN_CHUNK: usize = 512;
        let pairs = (tokens * heads).max(1);
        let chunks = BLOCKS.div_ceil(pairs).min(longest / MIN_CHUNK).max(1);
        if chunks == 1 {
            return (1, u32::MAX);
        }
        // Whole rounds of the block's warps (32 positions each) a chunk.
        let chunk = longest.div_ceil(chunks).div_ceil(THREADS as usize) * THREADS as usize;
        (longest.div_ceil(chunk) as u32, chunk as u32)
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

#[cfg(test)]
mod tests {
    use super::Launch;

    #[test]
    fn long_sequences_of_few_tokens_are_split_into_chunks() {
        // Short or many: one chunk.
        assert_eq!(Launch::attend_chunks(1, 32, 1000), (1, u32::MAX));
        assert_eq!(Launch::attend_chunks(64, 32, 8192), (1, u32::MAX));
        // One token of 32 heads over 4k positions: 8 chunks of 512, 256 blocks; over
        // 32k, 16 chunks of 2048, 512 blocks.
        assert_eq!(Launch::attend_chunks(1, 32, 4096), (8, 512));
        assert_eq!(Launch::attend_chunks(1, 32, 32768), (16, 2048));
        // Chunks are whole rounds of 128 positions and cover the sequence.
        let (chunks, len) = Launch::attend_chunks(2, 8, 5000);
        assert!(chunks > 1 && len % 128 == 0, "{chunks} x {len}");
        assert!(chunks as usize * len as usize >= 5000);
        assert!((chunks as usize - 1) * (len as usize) < 5000);
    }
}
