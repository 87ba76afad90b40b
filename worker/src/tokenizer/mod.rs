//! Text in and out of the model: tokenizer, chat template, streaming detokeniser.
//!
//! [`Tokenizer`] is built once per model, either from GGUF metadata
//! ([`Tokenizer::from_gguf`]: byte-level BPE or SentencePiece, rebuilt from the
//! vocabulary, merges/scores and token types) or from a Hugging Face
//! `tokenizer.json` ([`Tokenizer::from_tokenizer_json`]). It encodes prompts,
//! decodes ids, knows the BOS policy and the end-of-generation ids, and owns the
//! model's [`ChatTemplate`]. The engine feeds generated ids one at a time to an
//! [`IncrementalDetokenizer`], which never emits half a UTF-8 character.

mod chat;
mod error;
mod gguf;
mod hf;
mod pieces;
mod stream;

#[cfg(test)]
mod golden_tests;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::TokenizerError;
pub use stream::IncrementalDetokenizer;

use pieces::PieceTable;

/// Token texts that end a turn in the chat formats models use; any of them in
/// the vocabulary is an end-of-generation id, besides the declared EOS/EOT/EOM.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// A model's tokenizer: encoding, decoding, BOS policy, end-of-generation ids
/// and chat template. Immutable after loading; share it behind an `Arc`.
pub struct Tokenizer {
    /// Splits special-token text (`<|im_start|>`) into the special id.
    parse_special: tokenizers::Tokenizer,
    /// The same tokenizer, reading special-token text as ordinary text.
    plain: tokenizers::Tokenizer,
    pieces: PieceTable,
    bos_id: Option<u32>,
    adds_bos: bool,
    eog_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

/// What the GGUF and `tokenizer.json` loaders hand to [`Tokenizer::assemble`].
struct Parts {
    hf: tokenizers::Tokenizer,
    pieces: PieceTable,
    bos_id: Option<u32>,
    adds_bos: bool,
    eog_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata
    /// (`tokenizer.ggml.*` and `tokenizer.chat_template`).
    pub fn from_gguf(metadata: &HashMap<String, gguf_file::Value>) -> Result<Self, TokenizerError> {
        gguf::parts(metadata).map(Self::assemble)
    }

    /// Loads a Hugging Face `tokenizer.json`; `config` is the parsed
    /// `tokenizer_config.json` next to it (BOS/EOS tokens, `add_bos_token`,
    /// `chat_template`), when there is one.
    pub fn from_tokenizer_json(
        path: &Path,
        config: Option<&serde_json::Value>,
    ) -> Result<Self, TokenizerError> {
        hf::parts(path, config).map(Self::assemble)
    }

    fn assemble(parts: Parts) -> Self {
        let mut plain = parts.hf.clone();
        plain.set_encode_special_tokens(true);
        Self {
            parse_special: parts.hf,
            plain,
            pieces: parts.pieces,
            bos_id: parts.bos_id,
            adds_bos: parts.adds_bos,
            eog_ids: parts.eog_ids,
            chat_template: parts.chat_template,
        }
    }

    /// Token ids of `text`.
    ///
    /// `add_bos` prepends BOS only when the model asks for one ([`Self::adds_bos`]).
    /// With `parse_special`, special-token text such as `<|im_start|>` becomes
    /// its special id; without, it is tokenized like any other text.
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let hf = if parse_special {
            &self.parse_special
        } else {
            &self.plain
        };
        let encoding = hf
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let Some(bos) = self.bos_id.filter(|_| add_bos && self.adds_bos) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of `ids`; invalid UTF-8 becomes U+FFFD. `skip_special` leaves
    /// out control tokens (BOS, `<|im_end|>`, ...).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.pieces.bytes(id).is_none()) {
            return Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size(),
            });
        }
        self.parse_special
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The raw bytes one token stands for (byte-level decoded; may be part of
    /// a UTF-8 character). `None` for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.pieces.bytes(id).map(<[u8]>::to_vec)
    }

    /// Whether `id` is a control token (left out by `skip_special`).
    pub fn is_special(&self, id: u32) -> bool {
        self.pieces.is_special(id)
    }

    /// Number of token ids (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether prompts start with BOS (GGUF `tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
    }

    /// Ids that end generation: EOS, EOT/EOM and turn-end tokens such as
    /// `<|im_end|>`, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog_ids
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Borrowed bytes of one token, for the streaming detokeniser.
    fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.bytes(id)
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("adds_bos", &self.adds_bos)
            .field("eog_ids", &self.eog_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// End-of-generation ids: the declared ones plus every token spelled like a
/// turn end, sorted and without duplicates.
fn eog_ids(declared: &[Option<u32>], token_id: impl Fn(&str) -> Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = declared
        .iter()
        .flatten()
        .copied()
        .chain(EOG_TEXTS.iter().filter_map(|text| token_id(text)))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
