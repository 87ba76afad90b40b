//! Loads a Hugging Face `tokenizer.json` plus its `tokenizer_config.json`.
//!
//! The pipeline (normalizer, pre-tokenizer, model, decoder, added tokens) comes
//! from `tokenizer.json` as is. The BOS/EOS tokens, the BOS policy and the chat
//! template come from the config; without a config the BOS policy is read off
//! the post-processor (what it puts in front of an empty text).

use std::path::Path;

use serde_json::Value as Json;
use tokenizers::DecoderWrapper;

use super::chat::ChatTemplate;
use super::pieces::{PieceStyle, PieceTable, piece_bytes};
use super::{Parts, TokenizerError, eog_ids};

/// Where newer Hugging Face repositories keep the chat template.
const TEMPLATE_FILE: &str = "chat_template.jinja";

pub(super) fn parts(path: &Path, config: Option<&Json>) -> Result<Parts, TokenizerError> {
    let json_error = |message: String| TokenizerError::TokenizerJson {
        path: path.to_owned(),
        message,
    };
    let mut hf = tokenizers::Tokenizer::from_file(path).map_err(|e| json_error(e.to_string()))?;
    hf.with_truncation(None)
        .map_err(|e| json_error(e.to_string()))?;
    hf.with_padding(None);

    let pieces = piece_table(&hf)?;
    let token_id = |field: &'static str, text: Option<String>| -> Result<_, TokenizerError> {
        text.map(|text| {
            hf.token_to_id(&text).ok_or_else(|| TokenizerError::Config {
                field,
                message: format!("token {text:?} is not in the vocabulary"),
            })
        })
        .transpose()
    };
    let bos_text = token_field(config, "bos_token")?;
    let eos_text = token_field(config, "eos_token")?;
    let bos_id = token_id("bos_token", bos_text.clone())?;
    let eos_id = token_id("eos_token", eos_text.clone())?;

    // What the post-processor puts in front of an empty text is its BOS.
    let leading = hf
        .encode_fast("", true)
        .map_err(|e| json_error(e.to_string()))?
        .get_ids()
        .first()
        .copied()
        .filter(|id| pieces.is_special(*id));
    let bos_id = bos_id.or(leading);
    let adds_bos = match config.and_then(|c| c.get("add_bos_token")) {
        None | Some(Json::Null) => bos_id.is_some() && leading == bos_id,
        Some(Json::Bool(b)) => *b,
        Some(other) => {
            return Err(TokenizerError::Config {
                field: "add_bos_token",
                message: format!("expected a bool, found {other}"),
            });
        }
    };
    if adds_bos && bos_id.is_none() {
        return Err(TokenizerError::MissingBos {
            key: "add_bos_token",
        });
    }

    let eog_ids = eog_ids(&[eos_id], |text| hf.token_to_id(text));
    let bos_text = bos_text.or_else(|| bos_id.and_then(|id| hf.id_to_token(id)));
    let chat_template = template_source(path, config)?
        .map(|source| ChatTemplate::new(&source, bos_text.as_deref(), eos_text.as_deref()))
        .transpose()?;

    Ok(Parts {
        hf,
        pieces,
        bos_id,
        adds_bos,
        eog_ids,
        chat_template,
    })
}

fn piece_table(hf: &tokenizers::Tokenizer) -> Result<PieceTable, TokenizerError> {
    let vocab = hf.get_vocab(true);
    let len = vocab.values().max().map_or(0, |max| *max as usize + 1);
    let added = hf.get_added_tokens_decoder();
    let style = piece_style(hf.get_decoder());
    let mut pieces = PieceTable::with_len(len);
    for (text, id) in vocab {
        let special = added.get(&id).is_some_and(|t| t.special);
        let bytes = match style {
            Some(style) => piece_bytes(style, &text),
            // Another decoder (WordPiece, ...): trust it token by token.
            None => hf
                .decode(&[id], false)
                .map_err(|e| TokenizerError::Decode(e.to_string()))?
                .into_bytes(),
        };
        pieces.set(id, bytes, special);
    }
    Ok(pieces)
}

/// How the decoder turns tokens into bytes, looked up in its serialized form
/// (decoders nest inside `Sequence`s).
fn piece_style(decoder: Option<&DecoderWrapper>) -> Option<PieceStyle> {
    fn types(json: &Json, out: &mut Vec<String>) {
        match json {
            Json::Object(map) => {
                if let Some(Json::String(t)) = map.get("type") {
                    out.push(t.clone());
                }
                map.values().for_each(|v| types(v, out));
            }
            Json::Array(items) => items.iter().for_each(|v| types(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    types(&serde_json::to_value(decoder?).ok()?, &mut found);
    if found.iter().any(|t| t == "ByteLevel") {
        Some(PieceStyle::ByteLevel)
    } else if found
        .iter()
        .any(|t| t == "ByteFallback" || t == "Metaspace")
    {
        Some(PieceStyle::SentencePiece)
    } else {
        None
    }
}

/// `"bos_token": "<s>"` or `{"content": "<s>", ...}`; absent or null is none.
fn token_field(
    config: Option<&Json>,
    field: &'static str,
) -> Result<Option<String>, TokenizerError> {
    match config.and_then(|c| c.get(field)) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(map)) => match map.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::Config {
                field,
                message: "an object without a string `content`".into(),
            }),
        },
        Some(other) => Err(TokenizerError::Config {
            field,
            message: format!("expected a string or an object, found {other}"),
        }),
    }
}

/// The config's `chat_template` (a string, or a list of named templates of
/// which `default` or else the first is taken), else `chat_template.jinja`
/// next to `tokenizer.json`.
fn template_source(path: &Path, config: Option<&Json>) -> Result<Option<String>, TokenizerError> {
    let bad = |message: String| TokenizerError::Config {
        field: "chat_template",
        message,
    };
    match config.and_then(|c| c.get("chat_template")) {
        Some(Json::String(s)) => return Ok(Some(s.clone())),
        Some(Json::Array(named)) => {
            let template_of = |entry: &Json| entry.get("template")?.as_str().map(str::to_owned);
            let default = named
                .iter()
                .find(|e| e.get("name").and_then(Json::as_str) == Some("default"));
            return default
                .or(named.first())
                .and_then(template_of)
                .map(Some)
                .ok_or_else(|| bad("a list without a usable `template`".into()));
        }
        None | Some(Json::Null) => {}
        Some(other) => return Err(bad(format!("expected a string or a list, found {other}"))),
    }
    let file = path.with_file_name(TEMPLATE_FILE);
    match std::fs::read_to_string(&file) {
        Ok(source) => Ok(Some(source)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(bad(format!("cannot read {}: {e}", file.display()))),
    }
}
