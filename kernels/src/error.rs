//! The crate's error type: what a caller can get wrong when handing weights over.

use crate::QuantFormat;

/// Why a [`crate::QuantMatrix`] could not be built from the given bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The row length does not split into whole blocks.
    #[error("{cols} columns is not a multiple of the {format} block length {block_len}")]
    RaggedColumns {
        format: QuantFormat,
        cols: usize,
        block_len: usize,
    },
    /// The byte buffer does not hold exactly `rows x cols` weights of the format.
    #[error(
        "a {format} matrix of {rows}x{cols} needs {expected} bytes ({blocks} blocks of {block_bytes}), got {actual}"
    )]
    ByteLength {
        format: QuantFormat,
        rows: usize,
        cols: usize,
        blocks: usize,
        block_bytes: usize,
        expected: usize,
        actual: usize,
    },
    /// [`crate::QuantMatrix::stack`] was given no matrix.
    #[error("no matrices to stack")]
    NothingToStack,
    /// Matrices stacked one under the other must share their format and width.
    #[error("cannot stack a {} matrix of {} columns under a {} one of {}", other.0, other.1, first.0, first.1)]
    StackMismatch {
        first: (QuantFormat, usize),
        other: (QuantFormat, usize),
    },
}
