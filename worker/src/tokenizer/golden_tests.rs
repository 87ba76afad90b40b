//! The demo model's tokenizer against llama.cpp's reference outputs
//! (`shared/golden/`, see its README). These tests need the demo model and
//! fail, saying so, when it is missing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use serde_json::{Value as Json, json};

use super::{ChatMessage, IncrementalDetokenizer, Tokenizer};

const DEMO_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn demo_model_path() -> PathBuf {
    let cache = std::env::var_os("SHARDSERVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/shardserve")
        });
    cache.join(DEMO_FILE)
}

fn demo_metadata() -> &'static HashMap<String, gguf_file::Value> {
    static METADATA: OnceLock<HashMap<String, gguf_file::Value>> = OnceLock::new();
    METADATA.get_or_init(|| {
        let path = demo_model_path();
        let file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "demo model missing at {} ({e}); run `make fetch-demo`",
                path.display()
            )
        });
        let content = gguf_file::Content::read(&mut std::io::BufReader::new(file))
            .unwrap_or_else(|e| panic!("demo model at {} is not GGUF: {e}", path.display()));
        content.metadata
    })
}

fn demo() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf(demo_metadata()).expect("demo tokenizer loads"))
}

fn golden(name: &str) -> Vec<Json> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/golden")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file missing at {}: {e}", path.display()));
    text.lines()
        .map(|line| serde_json::from_str(line).expect("golden line is JSON"))
        .collect()
}

fn ids(value: &Json) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("ids are a list of integers")
}

fn str_of<'a>(value: &'a Json, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("golden `{field}` is a string"))
}

/// One line of the tokenizer golden file (not the meta line).
struct Case {
    id: String,
    text: String,
    ids: Vec<u32>,
    ids_no_parse_special: Option<Vec<u32>>,
}

fn tokenizer_cases() -> Vec<Case> {
    golden("smollm2-tokenizer.jsonl")
        .into_iter()
        .filter(|case| case["kind"] != "meta")
        .map(|case| Case {
            id: str_of(&case, "id").to_owned(),
            text: str_of(&case, "text").to_owned(),
            ids: ids(&case["ids"]),
            ids_no_parse_special: case.get("ids_no_parse_special").map(ids),
        })
        .collect()
}

fn check_golden_ids(tok: &Tokenizer) {
    let mut failures = Vec::new();
    for Case {
        id,
        text,
        ids: expected,
        ids_no_parse_special: expected_plain,
    } in tokenizer_cases()
    {
        let got = tok.encode(&text, true, true).unwrap();
        if got != expected {
            failures.push(format!(
                "{id} (parse_special): got {got:?}, want {expected:?}"
            ));
        }
        if let Some(expected_plain) = expected_plain {
            let got = tok.encode(&text, true, false).unwrap();
            if got != expected_plain {
                failures.push(format!(
                    "{id} (no parse_special): got {got:?}, want {expected_plain:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check_golden_chats(tok: &Tokenizer) {
    let template = tok
        .chat_template()
        .expect("the demo model has a chat template");
    for case in golden("smollm2-q4_1-chat.jsonl") {
        let id = str_of(&case, "id");
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let prompt = template.render(&messages, true).unwrap();
        assert_eq!(
            prompt,
            str_of(&case, "chat_prompt"),
            "{id}: rendered prompt"
        );
        let got = tok.encode(&prompt, false, true).unwrap();
        assert_eq!(got, ids(&case["chat_prompt_ids"]), "{id}: chat prompt ids");
        let got = tok
            .encode(str_of(&case, "prompt_text"), false, true)
            .unwrap();
        assert_eq!(got, ids(&case["prompt_ids"]), "{id}: raw prompt ids");
    }
}

#[test]
fn golden_texts_tokenize_like_llama_cpp() {
    check_golden_ids(demo());
}

#[test]
fn golden_chat_prompts_render_and_tokenize_exactly() {
    check_golden_chats(demo());
}

#[test]
fn demo_metadata_matches_golden_meta() {
    let meta = golden("smollm2-tokenizer.jsonl")
        .into_iter()
        .find(|case| case["kind"] == "meta")
        .expect("golden meta line");
    let tok = demo();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.adds_bos(), meta["add_bos_token"].as_bool().unwrap());
    assert_eq!(tok.eog_ids(), ids(&meta["eog_ids"]));
    assert_eq!(
        tok.encode("Hi", true, true).unwrap(),
        [26843],
        "no BOS is added"
    );
}

#[test]
fn demo_vocab_loads_in_under_a_second() {
    let metadata = demo_metadata();
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(metadata).unwrap();
    let took = start.elapsed();
    eprintln!("from_gguf on the 49152-token vocabulary took {took:?}");
    assert_eq!(tok.vocab_size(), 49152);
    assert!(took < Duration::from_secs(1), "loading took {took:?}");
}

#[test]
fn decode_round_trips_golden_texts() {
    let tok = demo();
    for Case { id, text, .. } in tokenizer_cases() {
        for parse_special in [true, false] {
            let ids = tok.encode(&text, false, parse_special).unwrap();
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                text,
                "{id} parse_special={parse_special}"
            );
        }
    }
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>\n", false, true)
        .unwrap();
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "user\nHi\n",
        "skip_special drops control tokens"
    );
    assert_eq!(tok.token_bytes(ids[1]), Some(b"user".to_vec()));
    assert!(
        tok.decode(&[49152], false).is_err(),
        "ids past the vocabulary are refused"
    );
}

/// Streams `ids` token by token and returns the pieces (the last from `finish`).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut detok = IncrementalDetokenizer::new();
    let mut pieces: Vec<String> = ids.iter().map(|id| detok.push(tok, *id)).collect();
    pieces.push(detok.finish());
    pieces
}

#[test]
fn streaming_korean_and_emoji_yields_whole_characters() {
    let tok = demo();
    for Case { id, text, ids, .. } in tokenizer_cases() {
        if !["edge_korean", "edge_emoji_zwj", "ko_intro", "ja_emoji"].contains(&id.as_str()) {
            continue;
        }
        let pieces = stream(tok, &ids);
        assert!(
            pieces.iter().any(String::is_empty),
            "{id}: some token ends mid-character, so some push yields nothing"
        );
        assert!(
            !pieces.concat().contains('\u{FFFD}'),
            "{id}: no replacement characters"
        );
        assert_eq!(pieces.concat(), text, "{id}: the stream spells the text");
        assert_eq!(
            pieces.last().unwrap(),
            "",
            "{id}: nothing is left for finish"
        );
    }
}

#[test]
fn streaming_skips_control_tokens_and_flushes_leftovers() {
    let tok = demo();
    let ids = tok
        .encode("<|im_start|>assistant\n한<|im_end|>", false, true)
        .unwrap();
    assert_eq!(stream(tok, &ids).concat(), "assistant\n한");
    // "한" is several tokens; stop after the first and finish() flushes U+FFFD.
    let han = tok.encode("한", false, true).unwrap();
    assert!(han.len() > 1);
    let mut detok = IncrementalDetokenizer::new();
    assert_eq!(detok.push(tok, han[0]), "");
    assert_eq!(detok.finish(), "\u{FFFD}");
    assert_eq!(detok.push(tok, 26843), "Hi", "finish resets the state");
}

/// xorshift64*: deterministic randomness for property-style tests.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

#[test]
fn streaming_any_slice_of_golden_ids_equals_decode() {
    let tok = demo();
    let mut sequences: Vec<Vec<u32>> = tokenizer_cases().into_iter().map(|c| c.ids).collect();
    sequences.extend(
        golden("smollm2-q4_1-chat.jsonl")
            .iter()
            .map(|case| [ids(&case["chat_prompt_ids"]), ids(&case["greedy_ids"])].concat()),
    );
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    for ids in &sequences {
        for _ in 0..64 {
            // Slices start and end anywhere, also inside a character.
            let start = rng.below(ids.len() + 1);
            let end = start + rng.below(ids.len() - start + 1);
            let slice = &ids[start..end];
            let pieces = stream(tok, slice);
            let want = tok.decode(slice, true).unwrap();
            assert_eq!(pieces.concat(), want, "slice {start}..{end} of {ids:?}");
        }
    }
}

#[test]
fn tokenizer_json_of_the_demo_vocabulary_matches_golden() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    demo().parse_special.save(&path, false).unwrap();
    let template = match demo_metadata().get("tokenizer.chat_template") {
        Some(gguf_file::Value::String(s)) => s.clone(),
        other => panic!("demo chat template is a string, found {other:?}"),
    };
    let config = json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": template,
    });
    let tok = Tokenizer::from_tokenizer_json(&path, Some(&config)).unwrap();
    assert_eq!(tok.bos_id(), Some(1));
    assert!(!tok.adds_bos());
    assert_eq!(tok.eog_ids(), [0, 2]);
    assert_eq!(tok.vocab_size(), 49152);
    check_golden_ids(&tok);
    check_golden_chats(&tok);
    let ids = tok.encode("안녕 😊", false, true).unwrap();
    assert_eq!(stream(&tok, &ids).concat(), "안녕 😊");

    // Without a config: no BOS policy (no post-processor) and no template.
    let bare = Tokenizer::from_tokenizer_json(&path, None).unwrap();
    assert!(!bare.adds_bos());
    assert!(bare.chat_template().is_none());

    let bad = json!({"bos_token": "<not-a-token>"});
    let err = Tokenizer::from_tokenizer_json(&path, Some(&bad)).unwrap_err();
    assert!(err.to_string().contains("<not-a-token>"), "{err}");
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let path = PathBuf::from("/nonexistent/tokenizer.json");
    let err = Tokenizer::from_tokenizer_json(&path, None).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );
}

/// Each tokenizer key of the demo model's metadata, damaged (a wrong type, an
/// out-of-range id, an empty or halved array, a different tokenizer model) or missing:
/// the tokenizer is refused with an error, or it builds and then encodes, decodes and
/// renders a chat. Never a panic.
#[test]
fn damaged_tokenizer_metadata_is_refused_or_works_never_panics() {
    use gguf_file::Value;
    let good = demo_metadata();
    let mut keys: Vec<&String> = good
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    keys.sort();
    assert!(keys.len() >= 6, "demo tokenizer keys: {keys:?}");
    let damages = |value: &Value| -> Vec<Option<Value>> {
        let mut out = vec![
            None,
            Some(Value::U32(u32::MAX)),
            Some(Value::I32(-1)),
            Some(Value::String("llama".into())),
            Some(Value::Array(Vec::new())),
        ];
        if let Value::Array(items) = value {
            out.push(Some(Value::Array(items[..items.len() / 2].to_vec())));
            out.push(Some(Value::Array(vec![Value::Bool(true); items.len()])));
        }
        out
    };
    let mut refused = 0;
    for key in keys {
        for damage in damages(&good[key]) {
            let what = format!("{key} = {damage:?}");
            let what = &what[..what.len().min(120)];
            let mut meta = good.clone();
            match damage {
                Some(value) => meta.insert(key.clone(), value),
                None => meta.remove(key),
            };
            let outcome = std::panic::catch_unwind(|| -> Result<(), super::TokenizerError> {
                let tokenizer = Tokenizer::from_gguf(&meta)?;
                let ids = tokenizer.encode("Hello, 세계! <|im_start|>", true, true)?;
                tokenizer.decode(&ids, false)?;
                if let Some(template) = tokenizer.chat_template() {
                    let hi = ChatMessage {
                        role: "user".into(),
                        content: "hi".into(),
                    };
                    template.render(&[hi], true)?;
                }
                Ok(())
            });
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(_)) => refused += 1,
                Err(_) => panic!("{what}: panicked"),
            }
        }
    }
    assert!(refused > 0, "no damage was refused");
}

#[test]
fn the_demo_template_renders_ten_thousand_messages_within_its_fuel() {
    let template = demo()
        .chat_template()
        .expect("the demo model has a chat template");
    let messages: Vec<ChatMessage> = (0..10_000)
        .map(|i| ChatMessage {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("message number {i}"),
        })
        .collect();
    let text = template.render(&messages, true).unwrap();
    assert!(text.contains("message number 9999"));
}
