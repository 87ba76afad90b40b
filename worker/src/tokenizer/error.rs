use std::path::PathBuf;

/// Everything that can go wrong while building a tokenizer or using it.
///
/// Messages name the metadata key, file or value at fault so that a user can
/// tell which part of their model is the problem.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata has no `{key}`; the file carries no usable tokenizer")]
    MissingKey { key: &'static str },

    #[error("GGUF metadata `{key}` should be {expected}, found {found}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
        found: String,
    },

    #[error("GGUF metadata `{key}` has {len} entries but `tokenizer.ggml.tokens` has {expected}")]
    LengthMismatch {
        key: &'static str,
        len: usize,
        expected: usize,
    },

    #[error(
        "tokenizer model `{model}` (tokenizer.ggml.model) is not supported; \
         supported: `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE)"
    )]
    Unsupported { model: String },

    #[error(
        "pre-tokenizer `{pre}` (tokenizer.ggml.pre) is not supported; supported: \
         gpt2/default, smollm/starcoder/refact/command-r/codeshell/exaone/minerva, \
         llama3/llama-bpe/llama-v3/falcon3, qwen2/deepseek-r1-qwen"
    )]
    UnsupportedPre { pre: String },

    #[error("GGUF metadata `{key}` = {id} is not a token id (the vocabulary has {vocab_size})")]
    IdOutOfRange {
        key: &'static str,
        id: u64,
        vocab_size: usize,
    },

    #[error(
        "merge #{index} `{merge}` (tokenizer.ggml.merges) is not two tokens separated by a space"
    )]
    BadMerge { index: usize, merge: String },

    #[error("cannot build the tokenizer from `{key}`: {message}")]
    Build { key: &'static str, message: String },

    #[error("cannot load {}: {message}", path.display())]
    TokenizerJson { path: PathBuf, message: String },

    #[error("tokenizer_config.json `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },

    #[error("the model adds a BOS token (`{key}`) but defines none")]
    MissingBos { key: &'static str },

    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownId { id: u32, vocab_size: usize },

    #[error("cannot encode text: {0}")]
    Encode(String),

    #[error("cannot decode ids: {0}")]
    Decode(String),

    #[error("chat template does not compile: {0}")]
    ChatTemplate(String),

    #[error("chat template failed to render: {0}")]
    Render(String),
}
