//! A chat template (from a model's metadata) compiled and rendered over messages
//! (from a request). The input is the template, then NUL-separated role and
//! content pairs, e.g. `{{ messages[0].content }}\0user\0hi`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardserve_worker::tokenizer::{ChatMessage, ChatTemplate};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default();
    let parts: Vec<&str> = parts.collect();
    let messages: Vec<ChatMessage> = parts
        .chunks(2)
        .map(|pair| ChatMessage::new(pair[0], pair.get(1).copied().unwrap_or_default()))
        .collect();
    let Ok(template) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) else {
        return;
    };
    let _ = template.render(&messages, true);
});
