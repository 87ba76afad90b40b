use std::path::PathBuf;

/// Why a model file or one of its tensors cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("model file {path} cannot be read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file: it starts with bytes {magic:02x?}, not \"GGUF\"")]
    NotGguf { path: PathBuf, magic: Vec<u8> },
    #[error("{path}: the GGUF header is malformed: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error(
        "{path} is truncated: tensor '{tensor}' needs bytes {start}..{end} but the file has {file_len} bytes"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("{path} is not a usable safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error(
        "{dir} holds no weights: expected model.safetensors, model.safetensors.index.json or *.safetensors"
    )]
    NoSafetensors { dir: PathBuf },
    #[error("{path}: tensor '{tensor}' has type {dtype}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path} has no tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: metadata key '{key}' is {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("tensor '{tensor}': {reason}")]
    BadSplit { tensor: String, reason: String },
    #[error("tensor '{tensor}' has type {dtype:?}, which this engine cannot use as {usage}")]
    Unsupported {
        tensor: String,
        dtype: candle_core::quantized::GgmlDType,
        usage: &'static str,
    },
    #[error("tensor '{tensor}': {source}")]
    Candle {
        tensor: String,
        #[source]
        source: candle_core::Error,
    },
}
