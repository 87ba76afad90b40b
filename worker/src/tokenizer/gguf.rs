//! Rebuilds a model's tokenizer from GGUF metadata (`tokenizer.ggml.*`).
//!
//! `gpt2` vocabularies become a byte-level BPE from the tokens and merges, with
//! the pre-tokenizer regex that `tokenizer.ggml.pre` names; `llama`
//! (SentencePiece) vocabularies become a BPE whose merges are derived from the
//! token scores, with byte fallback. Control tokens are special added tokens
//! (parsed only when asked); user-defined tokens are always matched whole.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::chat::ChatTemplate;
use super::pieces::{PieceStyle, PieceTable, piece_bytes};
use super::{Parts, TokenizerError, eog_ids};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const MERGES: &str = "tokenizer.ggml.merges";
const SCORES: &str = "tokenizer.ggml.scores";
const BOS: &str = "tokenizer.ggml.bos_token_id";
const EOS: &str = "tokenizer.ggml.eos_token_id";
const EOT: &str = "tokenizer.ggml.eot_token_id";
const EOM: &str = "tokenizer.ggml.eom_token_id";
const UNK: &str = "tokenizer.ggml.unknown_token_id";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Llama 3: case-insensitive contractions, digits in groups of up to three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2: as Llama 3, but every digit alone.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How `tokenizer.ggml.pre` says to split text before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreSplit {
    /// GPT-2's split (contractions, letters, digits, punctuation, spaces),
    /// which the `tokenizers` ByteLevel pre-tokenizer applies itself.
    Gpt2,
    /// GPT-2 after isolating every digit (SmolLM, StarCoder, ...).
    Gpt2Digits,
    Llama3,
    Qwen2,
}

impl PreSplit {
    fn from_name(pre: Option<&str>) -> Result<Self, TokenizerError> {
        Ok(match pre {
            None | Some("default" | "gpt2" | "gpt-2") => Self::Gpt2,
            Some(
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
                | "minerva",
            ) => Self::Gpt2Digits,
            Some("llama3" | "llama-bpe" | "llama-v3" | "falcon3") => Self::Llama3,
            Some("qwen2" | "deepseek-r1-qwen") => Self::Qwen2,
            Some(other) => {
                return Err(TokenizerError::UnsupportedPre {
                    pre: other.to_owned(),
                });
            }
        })
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let byte_level = |use_regex| ByteLevel::new(false, false, use_regex).into();
        let regex_split = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            Split::new(
                SplitPattern::Regex(regex.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| TokenizerError::Build {
                key: PRE,
                message: e.to_string(),
            })
        };
        let steps = match self {
            Self::Gpt2 => vec![byte_level(true)],
            Self::Gpt2Digits => vec![Digits::new(true).into(), byte_level(true)],
            Self::Llama3 => vec![regex_split(LLAMA3_REGEX)?, byte_level(false)],
            Self::Qwen2 => vec![regex_split(QWEN2_REGEX)?, byte_level(false)],
        };
        Ok(tokenizers::pre_tokenizers::sequence::Sequence::new(steps).into())
    }
}

pub(super) fn parts(metadata: &HashMap<String, Value>) -> Result<Parts, TokenizerError> {
    let meta = Meta(metadata);
    let model = meta
        .string(MODEL)?
        .ok_or(TokenizerError::MissingKey { key: MODEL })?;
    let tokens = meta
        .strings(TOKENS)?
        .ok_or(TokenizerError::MissingKey { key: TOKENS })?;
    let n = tokens.len();
    let types = match meta.ints(TOKEN_TYPE)? {
        Some(types) if types.len() != n => {
            return Err(TokenizerError::LengthMismatch {
                key: TOKEN_TYPE,
                len: types.len(),
                expected: n,
            });
        }
        Some(types) => types,
        None => vec![TYPE_NORMAL; n],
    };
    let bos = meta.token_id(BOS, n)?;
    let eos = meta.token_id(EOS, n)?;

    let (mut hf, style, default_add_bos) = match model {
        "gpt2" => byte_level_bpe(&meta, &tokens)?,
        "llama" => sentencepiece_bpe(&meta, &tokens, &types)?,
        other => {
            return Err(TokenizerError::Unsupported {
                model: other.to_owned(),
            });
        }
    };
    add_added_tokens(&mut hf, &tokens, &types)?;

    let mut pieces = PieceTable::with_len(n);
    for (id, (text, ty)) in (0u32..).zip(tokens.iter().zip(&types)) {
        let special = matches!(*ty, TYPE_CONTROL | TYPE_UNKNOWN);
        pieces.set(id, piece_bytes(style, text), special);
    }

    let adds_bos = meta.bool(ADD_BOS)?.unwrap_or(default_add_bos);
    if adds_bos && bos.is_none() {
        return Err(TokenizerError::MissingBos { key: ADD_BOS });
    }
    let declared = [eos, meta.token_id(EOT, n)?, meta.token_id(EOM, n)?];
    let eog_ids = eog_ids(&declared, |text| hf.token_to_id(text));
    let token_text = |id: Option<u32>| id.map(|id| tokens[id as usize].as_str());
    let chat_template = meta
        .string(CHAT_TEMPLATE)?
        .map(|source| ChatTemplate::new(source, token_text(bos), token_text(eos)))
        .transpose()?;

    Ok(Parts {
        hf,
        pieces,
        bos_id: bos,
        adds_bos,
        eog_ids,
        chat_template,
    })
}

/// The vocabulary as the BPE model wants it; a text listed twice keeps its
/// last id, as llama.cpp does.
fn vocab(tokens: &[String]) -> Vocab {
    (0u32..)
        .zip(tokens)
        .map(|(id, t)| (t.clone(), id))
        .collect()
}

fn build_error(key: &'static str) -> impl Fn(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Build {
        key,
        message: e.to_string(),
    }
}

type Built = (tokenizers::Tokenizer, PieceStyle, bool);

fn byte_level_bpe(meta: &Meta<'_>, tokens: &[String]) -> Result<Built, TokenizerError> {
    let split = PreSplit::from_name(meta.string(PRE)?)?;
    let merges = meta
        .strings(MERGES)?
        .ok_or(TokenizerError::MissingKey { key: MERGES })?
        .iter()
        .enumerate()
        .map(|(index, merge)| split_merge(index, merge))
        .collect::<Result<Merges, _>>()?;
    // Llama 3 looks a whole word up before merging (`ignore_merges`).
    let llama3 = split == PreSplit::Llama3;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab(tokens), merges)
        .ignore_merges(llama3)
        .build()
        .map_err(build_error(MERGES))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(split.pre_tokenizer()?));
    hf.with_decoder(Some(ByteLevel::new(false, false, true)));
    Ok((hf, PieceStyle::ByteLevel, llama3))
}

/// `"Ġ t"` → `("Ġ", "t")`. The space is searched from the second character on,
/// so that a merge whose left side is itself a space still splits right.
fn split_merge(index: usize, merge: &str) -> Result<(String, String), TokenizerError> {
    let bad = || TokenizerError::BadMerge {
        index,
        merge: merge.to_owned(),
    };
    let first_len = merge.chars().next().ok_or_else(bad)?.len_utf8();
    let at = merge[first_len..].find(' ').ok_or_else(bad)? + first_len;
    let (left, right) = (&merge[..at], &merge[at + 1..]);
    if right.is_empty() {
        return Err(bad());
    }
    Ok((left.to_owned(), right.to_owned()))
}

fn sentencepiece_bpe(
    meta: &Meta<'_>,
    tokens: &[String],
    types: &[i64],
) -> Result<Built, TokenizerError> {
    let scores = meta
        .floats(SCORES)?
        .ok_or(TokenizerError::MissingKey { key: SCORES })?;
    if scores.len() != tokens.len() {
        return Err(TokenizerError::LengthMismatch {
            key: SCORES,
            len: scores.len(),
            expected: tokens.len(),
        });
    }
    let vocab = vocab(tokens);
    let merges = merges_from_scores(tokens, types, &scores, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = meta.token_id(UNK, tokens.len())? {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(build_error(SCORES))?;

    let add_space_prefix = meta.bool(ADD_SPACE_PREFIX)?.unwrap_or(true);
    let space = Replace::new(" ", "\u{2581}").map_err(build_error(ADD_SPACE_PREFIX))?;
    let mut normalizers: Vec<NormalizerWrapper> = vec![space.into()];
    let unspace = Replace::new("\u{2581}", " ").map_err(build_error(ADD_SPACE_PREFIX))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        unspace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        // The prefix goes on every stretch of text between special tokens,
        // and decoding takes the first one off again.
        normalizers.insert(0, Prepend::new("\u{2581}".to_owned()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)))
        .map_err(build_error(ADD_SPACE_PREFIX))?;
    hf.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(
        decoders,
    )));
    Ok((hf, PieceStyle::SentencePiece, true))
}

/// SentencePiece merges the adjacent pair whose union is the best-scoring
/// token; as BPE merges that is every split of a token into two tokens,
/// ranked by the token's score.
fn merges_from_scores(tokens: &[String], types: &[i64], scores: &[f32], vocab: &Vocab) -> Merges {
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        if types[id] != TYPE_NORMAL {
            continue;
        }
        for (at, _) in text.char_indices().skip(1) {
            if vocab.contains_key(&text[..at]) && vocab.contains_key(&text[at..]) {
                ranked.push((scores[id], id, at));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .map(|(_, id, at)| {
            let text = &tokens[id];
            (text[..at].to_owned(), text[at..].to_owned())
        })
        .collect()
}

/// Control (and unknown) tokens become special added tokens: matched in text
/// only with `parse_special`, left out by `skip_special`. User-defined tokens
/// are always matched whole, as llama.cpp does.
fn add_added_tokens(
    hf: &mut tokenizers::Tokenizer,
    tokens: &[String],
    types: &[i64],
) -> Result<(), TokenizerError> {
    let of_type = |wanted: &[i64], special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|(_, ty)| wanted.contains(ty))
            .map(|(text, _)| AddedToken::from(text.clone(), special).normalized(false))
            .collect()
    };
    hf.add_special_tokens(of_type(&[TYPE_CONTROL, TYPE_UNKNOWN], true))
        .map_err(build_error(TOKEN_TYPE))?;
    hf.add_tokens(of_type(&[TYPE_USER_DEFINED], false))
        .map_err(build_error(TOKEN_TYPE))?;
    Ok(())
}

/// Typed reads of GGUF metadata, with errors that name the key.
struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn wrong(key: &'static str, expected: &'static str, found: &Value) -> TokenizerError {
        TokenizerError::WrongType {
            key,
            expected,
            found: describe(found),
        }
    }

    fn string(&self, key: &'static str) -> Result<Option<&str>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Self::wrong(key, "a string", other)),
        }
    }

    fn bool(&self, key: &'static str) -> Result<Option<bool>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Self::wrong(key, "a bool", other)),
        }
    }

    fn array(&self, key: &'static str) -> Result<Option<&[Value]>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(Self::wrong(key, "an array", other)),
        }
    }

    fn strings(&self, key: &'static str) -> Result<Option<Vec<String>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(Self::wrong(key, "an array of strings", other)),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn ints(&self, key: &'static str) -> Result<Option<Vec<i64>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| int(v).ok_or_else(|| Self::wrong(key, "an array of integers", v)))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn floats(&self, key: &'static str) -> Result<Option<Vec<f32>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => Err(Self::wrong(key, "an array of floats", other)),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// A token id; negative or all-ones values mean "none", as some converters
    /// write them.
    fn token_id(
        &self,
        key: &'static str,
        vocab_size: usize,
    ) -> Result<Option<u32>, TokenizerError> {
        let Some(value) = self.0.get(key) else {
            return Ok(None);
        };
        let id = int(value).ok_or_else(|| Self::wrong(key, "an integer token id", value))?;
        if id < 0 || id == i64::from(u32::MAX) {
            return Ok(None);
        }
        match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
            _ => Err(TokenizerError::IdOutOfRange {
                key,
                id: id as u64,
                vocab_size,
            }),
        }
    }
}

fn int(value: &Value) -> Option<i64> {
    Some(match *value {
        Value::U8(v) => v.into(),
        Value::I8(v) => v.into(),
        Value::U16(v) => v.into(),
        Value::I16(v) => v.into(),
        Value::U32(v) => v.into(),
        Value::I32(v) => v.into(),
        Value::U64(v) => i64::try_from(v).ok()?,
        Value::I64(v) => v,
        _ => return None,
    })
}

/// A short description of a metadata value for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) if s.len() > 40 => format!("a string ({} bytes)", s.len()),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(items) => format!("an array of {} values", items.len()),
        Value::Bool(b) => format!("the bool {b}"),
        Value::F32(x) => format!("the float {x}"),
        Value::F64(x) => format!("the float {x}"),
        other => match int(other) {
            Some(i) => format!("the integer {i} ({:?})", other.value_type()),
            None => format!("{:?}", other.value_type()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    fn strings(items: &[&str]) -> Value {
        Value::Array(
            items
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        )
    }

    /// A tiny byte-level vocabulary: every byte-alphabet character, a few
    /// merges and two control tokens.
    fn tiny_gpt2() -> HashMap<String, Value> {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        tokens.extend(
            (0..=255u8).map(|b| String::from_utf8(piece_bytes_to_text(b)).expect("one character")),
        );
        let words = [
            "he", "ll", "hell", "hello", "Ġw", "Ġwo", "12", "123", "1234",
        ];
        tokens.extend(words.map(String::from));
        let mut types = vec![Value::I32(3); 2];
        types.extend(std::iter::repeat_n(Value::I32(1), tokens.len() - 2));
        HashMap::from([
            (MODEL.to_owned(), Value::String("gpt2".into())),
            (PRE.to_owned(), Value::String("smollm".into())),
            (
                TOKENS.to_owned(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (TOKEN_TYPE.to_owned(), Value::Array(types)),
            (
                MERGES.to_owned(),
                strings(&[
                    "h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "1 2", "12 3", "123 4",
                ]),
            ),
            (EOS.to_owned(), Value::U32(1)),
        ])
    }

    /// The byte-level character for byte `b`, as UTF-8.
    fn piece_bytes_to_text(b: u8) -> Vec<u8> {
        (0x21..0x200u32)
            .filter_map(char::from_u32)
            .find(|c| piece_bytes(PieceStyle::ByteLevel, &c.to_string()) == [b])
            .map(|c| c.to_string().into_bytes())
            .expect("every byte has a character")
    }

    fn error_of(metadata: &HashMap<String, Value>) -> String {
        Tokenizer::from_gguf(metadata)
            .expect_err("metadata should be refused")
            .to_string()
    }

    #[test]
    fn tiny_byte_level_vocabulary_encodes_and_decodes() {
        let tok = Tokenizer::from_gguf(&tiny_gpt2()).expect("tiny tokenizer builds");
        let hello = 2 + 256 + 3;
        let ids = tok.encode("hello wo<|im_end|>", true, true).unwrap();
        assert_eq!(ids[0], hello);
        assert_eq!(
            *ids.last().unwrap(),
            1,
            "special text parsed as the control token"
        );
        assert!(!tok.adds_bos(), "gpt2 vocabularies add no BOS unless told");
        assert_eq!(tok.eog_ids(), [0, 1]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello wo<|im_end|>");
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello wo");
        let plain = tok.encode("<|im_end|>", false, false).unwrap();
        assert!(
            !plain.contains(&1),
            "special text stays text without parse_special"
        );
    }

    #[test]
    fn missing_tokens_key_is_named() {
        let mut meta = tiny_gpt2();
        meta.remove(TOKENS);
        assert!(error_of(&meta).contains("tokenizer.ggml.tokens"));
    }

    #[test]
    fn unknown_model_type_is_unsupported() {
        let mut meta = tiny_gpt2();
        meta.insert(MODEL.to_owned(), Value::String("rwkv".into()));
        let err = Tokenizer::from_gguf(&meta).unwrap_err();
        assert!(matches!(&err, TokenizerError::Unsupported { model } if model == "rwkv"));
        assert!(err.to_string().contains("`rwkv`"));
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused_by_name() {
        let mut meta = tiny_gpt2();
        meta.insert(PRE.to_owned(), Value::String("mystery".into()));
        assert!(error_of(&meta).contains("`mystery`"));
    }

    #[test]
    fn pre_tokenizer_follows_tokenizer_ggml_pre() {
        let (one, two, three, four) = (2 + u32::from(b'1'), 2 + 50, 2 + 51, 2 + 52);
        let digits = |pre: &str| {
            let mut meta = tiny_gpt2();
            meta.insert(PRE.to_owned(), Value::String(pre.into()));
            meta.insert(BOS.to_owned(), Value::U32(0));
            let tok = Tokenizer::from_gguf(&meta).unwrap_or_else(|e| panic!("{pre}: {e}"));
            tok.encode("1234", false, true).unwrap()
        };
        let base = 2 + 256;
        assert_eq!(digits("gpt2"), [base + 8], "GPT-2 keeps a number whole");
        assert_eq!(
            digits("smollm"),
            [one, two, three, four],
            "SmolLM splits every digit"
        );
        assert_eq!(
            digits("llama-bpe"),
            [base + 7, four],
            "Llama 3 groups three digits"
        );
        assert_eq!(
            digits("qwen2"),
            [one, two, three, four],
            "Qwen 2 splits every digit"
        );
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Tokenizer>();
        shareable::<crate::tokenizer::IncrementalDetokenizer>();
    }

    #[test]
    fn wrong_value_types_name_key_and_value() {
        let mut meta = tiny_gpt2();
        meta.insert(MODEL.to_owned(), Value::U32(2));
        let msg = error_of(&meta);
        assert!(msg.contains(MODEL) && msg.contains("integer 2"), "{msg}");

        let mut meta = tiny_gpt2();
        meta.insert(ADD_BOS.to_owned(), Value::String("yes".into()));
        assert!(error_of(&meta).contains(ADD_BOS));
    }

    #[test]
    fn token_type_length_must_match() {
        let mut meta = tiny_gpt2();
        meta.insert(TOKEN_TYPE.to_owned(), Value::Array(vec![Value::I32(1); 3]));
        let msg = error_of(&meta);
        assert!(msg.contains(TOKEN_TYPE) && msg.contains('3'), "{msg}");
    }

    #[test]
    fn out_of_range_special_id_is_refused() {
        let mut meta = tiny_gpt2();
        meta.insert(EOS.to_owned(), Value::U32(100_000));
        let msg = error_of(&meta);
        assert!(msg.contains(EOS) && msg.contains("100000"), "{msg}");
    }

    #[test]
    fn bad_merges_are_refused() {
        let mut meta = tiny_gpt2();
        meta.insert(MERGES.to_owned(), strings(&["h e", "hello"]));
        let msg = error_of(&meta);
        assert!(msg.contains("#1") && msg.contains("`hello`"), "{msg}");

        let mut meta = tiny_gpt2();
        meta.insert(MERGES.to_owned(), strings(&["h q"]));
        assert!(error_of(&meta).contains(MERGES));
    }

    #[test]
    fn adding_bos_without_a_bos_id_is_refused() {
        let mut meta = tiny_gpt2();
        meta.insert(ADD_BOS.to_owned(), Value::Bool(true));
        assert!(error_of(&meta).contains(ADD_BOS));
    }

    #[test]
    fn merge_split_handles_space_tokens() {
        assert_eq!(split_merge(0, "Ġ t").unwrap(), ("Ġ".into(), "t".into()));
        assert_eq!(split_merge(0, "  x").unwrap(), (" ".into(), "x".into()));
        assert!(split_merge(0, "ab ").is_err());
        assert!(split_merge(0, "").is_err());
    }

    /// A tiny SentencePiece vocabulary: `▁hello` is reachable by merges,
    /// everything else falls back to byte tokens.
    fn tiny_llama() -> HashMap<String, Value> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let words = [
            "▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello", "w", "▁w",
        ];
        tokens.extend(words.map(String::from));
        let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
        types.extend(std::iter::repeat_n(Value::I32(6), 256));
        types.extend(std::iter::repeat_n(Value::I32(1), words.len()));
        let scores = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
        HashMap::from([
            (MODEL.to_owned(), Value::String("llama".into())),
            (
                TOKENS.to_owned(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (TOKEN_TYPE.to_owned(), Value::Array(types)),
            (SCORES.to_owned(), Value::Array(scores)),
            (BOS.to_owned(), Value::U32(1)),
            (EOS.to_owned(), Value::U32(2)),
            (UNK.to_owned(), Value::U32(0)),
        ])
    }

    #[test]
    fn sentencepiece_vocabulary_prefixes_space_and_falls_back_to_bytes() {
        let tok = Tokenizer::from_gguf(&tiny_llama()).expect("tiny llama tokenizer builds");
        let base = 3 + 256;
        let (hello_sp, w_sp) = (base + 9, base + 11);
        assert!(
            tok.adds_bos(),
            "SentencePiece vocabularies add BOS by default"
        );
        let ids = tok.encode("hello w!", true, true).unwrap();
        assert_eq!(ids, [1, hello_sp, w_sp, 3 + u32::from(b'!')]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello w!");
        // The space prefix returns after a special token, as in llama.cpp.
        let ids = tok.encode("hello</s>hello", false, true).unwrap();
        assert_eq!(ids, [hello_sp, 2, hello_sp]);
        let ids = tok.encode("é", false, true).unwrap();
        assert_eq!(ids, [base, 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(tok.token_bytes(3 + 0xC3), Some(vec![0xC3]));
        assert_eq!(tok.token_bytes(hello_sp), Some(b" hello".to_vec()));
    }

    #[test]
    fn sentencepiece_without_scores_is_refused() {
        let mut meta = tiny_llama();
        meta.remove(SCORES);
        assert!(error_of(&meta).contains(SCORES));
    }
}
