//! Model files: readers that hand out a tensor, or one rank's slice of it.
//!
//! `GgufFile` checks a GGUF file once when it is opened (magic, header, that
//! every tensor lies inside the file) and then serves tensors from a memory
//! map, copying only the bytes of the requested slice, so a rank never reads
//! the parts of a tensor it does not own. Quantised tensors stay quantised.

mod error;
mod gguf;
mod split;
mod weight;

pub use error::WeightsError;
pub use gguf::{GgufFile, TensorMeta};
pub use split::Split;
pub use weight::Weight;

#[cfg(test)]
mod tests;
