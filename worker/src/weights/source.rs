use std::path::Path;

use candle_core::Device;

use super::{GgufFile, Safetensors, Split, Weight, WeightsError};

/// Anything the model can load its tensors from, by the canonical (GGUF)
/// tensor names: a GGUF file, or a checkpoint that translates the names.
pub trait TensorSource: Send + Sync {
    /// The file or directory, for messages.
    fn path(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    /// `[rows, cols]` of a matrix, `[len]` of a vector.
    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, WeightsError>;
    /// Loads `split` of tensor `name`, reading only the slice's bytes.
    fn load(&self, name: &str, split: &Split, device: &Device) -> Result<Weight, WeightsError>;
    /// What the weights are stored as, for `ModelInfo` (`gguf:Q4_1`, `safetensors:BF16`).
    fn format(&self) -> String;
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        GgufFile::path(self)
    }

    fn contains(&self, name: &str) -> bool {
        GgufFile::contains(self, name)
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        Ok(self.tensor_meta(name)?.dims)
    }

    fn load(&self, name: &str, split: &Split, device: &Device) -> Result<Weight, WeightsError> {
        GgufFile::load(self, name, split, device)
    }

    fn format(&self) -> String {
        self.tensor_meta("blk.0.ffn_down.weight")
            .map(|m| format!("gguf:{:?}", m.dtype))
            .unwrap_or_else(|_| "gguf".into())
    }
}

/// Raw safetensors names (a checkpoint maps the canonical names onto these).
impl TensorSource for Safetensors {
    fn path(&self) -> &Path {
        self.dir()
    }

    fn contains(&self, name: &str) -> bool {
        Safetensors::contains(self, name)
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        Ok(self.tensor_info(name)?.1)
    }

    fn load(&self, name: &str, split: &Split, device: &Device) -> Result<Weight, WeightsError> {
        Safetensors::load(self, name, split, device)
    }

    fn format(&self) -> String {
        let mut names: Vec<&str> = self.tensor_names().collect();
        names.sort();
        // The type of the first matrix: norms are often kept in F32.
        names
            .iter()
            .filter_map(|n| self.tensor_info(n).ok())
            .find(|(_, dims)| dims.len() == 2)
            .map(|(dtype, _)| format!("safetensors:{}", dtype.as_str().to_uppercase()))
            .unwrap_or_else(|| "safetensors".into())
    }
}
