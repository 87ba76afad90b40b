//! Model files: readers that hand out a tensor, or one rank's slice of it.
//!
//! `GgufFile` checks a GGUF file once when it is opened (magic, header, that
//! every tensor lies inside the file) and then serves tensors from a memory
//! map, copying only the bytes of the requested slice, so a rank never reads
//! the parts of a tensor it does not own. Quantised tensors stay quantised.
//! `Safetensors` does the same for the safetensors files of a Hugging Face
//! directory (F32, F16, BF16). The model reads either through `TensorSource`.

mod alignment;
mod bytes;
mod error;
mod gguf;
mod safetensors;
mod source;
mod split;
mod weight;

pub use error::WeightsError;
pub use gguf::{GgufFile, TensorMeta};
pub use safetensors::Safetensors;
pub use source::TensorSource;
pub use split::Split;
pub use weight::Weight;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fuzz;
