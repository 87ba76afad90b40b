//! Streaming detokenisation: ids in, whole UTF-8 characters out.
//!
//! A byte-level token may carry only part of a character (Korean syllables and
//! emoji are often split over two or three tokens), so the bytes of each token
//! are buffered until they form complete characters. The engine keeps one
//! [`IncrementalDetokenizer`] per sequence and passes the shared tokenizer in.

use super::Tokenizer;

/// Per-sequence decoding state: the bytes of an unfinished character.
///
/// Control tokens (`<|im_end|>`, BOS) produce no text. For ids that are valid
/// the concatenated output equals `tokenizer.decode(ids, true)`, except that a
/// SentencePiece model's leading space is kept: the stream is a continuation.
#[derive(Debug, Default)]
pub struct IncrementalDetokenizer {
    pending: Vec<u8>,
}

impl IncrementalDetokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (possibly empty).
    /// Ids outside the vocabulary add nothing.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if tokenizer.is_special(id) {
            return String::new();
        }
        let Some(bytes) = tokenizer.piece(id) else {
            tracing::debug!(id, "detokenizer skipped an id outside the vocabulary");
            return String::new();
        };
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    /// Flushes what is left at the end of a sequence; an unfinished character
    /// becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Emits every complete character, replaces invalid sequences with U+FFFD
    /// (as a whole-text lossy decode would), and keeps an incomplete tail.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` was just checked by `from_utf8`.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        self.pending.drain(..self.pending.len() - keep);
        out
    }
}
