//! The raw bytes behind each token id, precomputed once per vocabulary.
//!
//! Streaming detokenisation works on bytes, not strings: one token may end in
//! the middle of a UTF-8 character. The table is built at load time from the
//! token texts and how the vocabulary spells bytes in them.

use std::sync::LazyLock;

/// How a vocabulary spells the bytes of its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// GPT-2 byte-level BPE: every byte is one printable character (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece: `▁` is a space and `<0xAB>` tokens are single raw bytes.
    SentencePiece,
}

/// One entry per token id (ids without a token hold `None`).
#[derive(Debug, Default)]
pub(crate) struct PieceTable {
    bytes: Vec<Option<Box<[u8]>>>,
    special: Vec<bool>,
}

impl PieceTable {
    pub(crate) fn with_len(len: usize) -> Self {
        Self {
            bytes: vec![None; len],
            special: vec![false; len],
        }
    }

    pub(crate) fn set(&mut self, id: u32, bytes: Vec<u8>, special: bool) {
        let id = id as usize;
        if id >= self.bytes.len() {
            self.bytes.resize(id + 1, None);
            self.special.resize(id + 1, false);
        }
        self.bytes[id] = Some(bytes.into_boxed_slice());
        self.special[id] = special;
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }

    pub(crate) fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }
}

/// The bytes a token's text stands for.
///
/// Characters a byte-level vocabulary does not map (text of added tokens
/// outside the byte alphabet) are kept as their own UTF-8, token by token,
/// the same way the `tokenizers` ByteLevel decoder treats them.
pub(crate) fn piece_bytes(style: PieceStyle, text: &str) -> Vec<u8> {
    match style {
        PieceStyle::ByteLevel => text
            .chars()
            .map(byte_level_byte)
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| text.as_bytes().to_vec()),
        PieceStyle::SentencePiece => match sentencepiece_byte(text) {
            Some(b) => vec![b],
            None => text.replace('\u{2581}', " ").into_bytes(),
        },
    }
}

/// `<0xAB>` → 0xAB, the byte-fallback spelling of SentencePiece vocabularies.
fn sentencepiece_byte(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Bytes GPT-2 maps to themselves; the other 68 bytes become U+0100 + their
/// rank among the unmapped ones, so that every byte is printable.
fn maps_to_itself(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The reverse of the GPT-2 byte → character map, indexed by `char - 0x100`.
static SHIFTED_BYTES: LazyLock<Vec<u8>> =
    LazyLock::new(|| (0..=255u8).filter(|b| !maps_to_itself(*b)).collect());

fn byte_level_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 0x100 {
        let b = code as u8;
        return maps_to_itself(b).then_some(b);
    }
    let rank = usize::try_from(code - 0x100).ok()?;
    SHIFTED_BYTES.get(rank).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_covers_every_byte_once() {
        let mut seen = [false; 256];
        for code in 0x21..0x200u32 {
            if let Some(b) = char::from_u32(code).and_then(byte_level_byte) {
                assert!(!seen[b as usize], "byte {b:#x} mapped twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
    }

    #[test]
    fn byte_level_pieces_decode_bytes_and_keep_foreign_text() {
        assert_eq!(piece_bytes(PieceStyle::ByteLevel, "Ġhello"), b" hello");
        assert_eq!(piece_bytes(PieceStyle::ByteLevel, "ìķ"), [0xEC, 0x95]);
        assert_eq!(
            piece_bytes(PieceStyle::ByteLevel, "<|im_end|>"),
            b"<|im_end|>"
        );
        // A space is not in the byte alphabet: the token is kept as written.
        assert_eq!(piece_bytes(PieceStyle::ByteLevel, "a b"), b"a b");
    }

    #[test]
    fn sentencepiece_pieces_map_spaces_and_byte_tokens() {
        assert_eq!(piece_bytes(PieceStyle::SentencePiece, "▁Hello"), b" Hello");
        assert_eq!(piece_bytes(PieceStyle::SentencePiece, "<0x0A>"), b"\n");
        assert_eq!(piece_bytes(PieceStyle::SentencePiece, "<0xF0>"), [0xF0]);
        assert_eq!(piece_bytes(PieceStyle::SentencePiece, "<0x0>"), b"<0x0>");
    }
}
