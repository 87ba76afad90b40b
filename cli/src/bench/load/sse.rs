//! The server-sent events of an OpenAI `/v1/completions` stream, as pure
//! functions: bytes, however the network cuts them, into events
//! (`SseDecoder`), and one event's data into what it carries (`parse_chunk`).

use serde_json::Value;

/// Longest excerpt of a server's text kept in an error message.
const EXCERPT: usize = 300;

/// One event of the stream.
#[derive(Debug, PartialEq)]
pub(super) enum SseEvent {
    /// The payload of a `data:` line.
    Data(String),
    /// An error the server sent in the stream (`event: error` or llama.cpp's `error:` line).
    Error(String),
}

/// Splits a byte stream into events. OpenAI-style servers put one JSON
/// document on each `data:` line, so each such line is an event (even when a
/// server leaves out the blank lines between them).
#[derive(Debug, Default)]
pub(super) struct SseDecoder {
    pending: Vec<u8>,
    /// `event: error` was seen: the data lines until the next blank line are an error.
    error_event: bool,
}

impl SseDecoder {
    /// The events completed by `bytes`.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            if let Some(event) = self.line(line.trim_end_matches(['\n', '\r'])) {
                events.push(event);
            }
        }
        events
    }

    /// The event of a last line that had no line end, once the stream is over.
    pub(super) fn finish(&mut self) -> Option<SseEvent> {
        let rest = std::mem::take(&mut self.pending);
        let line = String::from_utf8_lossy(&rest);
        self.line(line.trim_end_matches('\r'))
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            self.error_event = false;
            return None;
        }
        // A line starting with ':' is a comment (keep-alive).
        let (field, value) = line.split_once(':')?;
        let value = value.strip_prefix(' ').unwrap_or(value).to_string();
        match field {
            "data" if self.error_event => Some(SseEvent::Error(value)),
            "data" => Some(SseEvent::Data(value)),
            "event" => {
                self.error_event = value == "error";
                None
            }
            "error" => Some(SseEvent::Error(value)),
            _ => None,
        }
    }
}

/// Token counts a server reports (`usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// What one event's data carries.
#[derive(Debug, PartialEq)]
pub(super) enum Chunk {
    /// A completion chunk: whether it holds generated text, whether it ends
    /// the choice (`finish_reason`), and the usage when it reports it.
    Part {
        text: bool,
        finished: bool,
        usage: Option<Usage>,
    },
    /// `[DONE]`: the stream is complete.
    Done,
}

/// One `data:` payload of a completions stream; an error the server sent in
/// the stream, or data that is not JSON, is an `Err` with its message.
pub(super) fn parse_chunk(data: &str) -> Result<Chunk, String> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Chunk::Done);
    }
    let event: Value = serde_json::from_str(data)
        .map_err(|e| format!("malformed stream event ({e}): {}", excerpt(data)))?;
    if let Some(error) = event.get("error").filter(|e| !e.is_null()) {
        return Err(format!("error in the stream: {}", error_message(error)));
    }
    let choice = &event["choices"][0];
    let usage = event.get("usage").and_then(|u| {
        Some(Usage {
            prompt_tokens: u.get("prompt_tokens")?.as_u64()?,
            completion_tokens: u.get("completion_tokens")?.as_u64()?,
        })
    });
    Ok(Chunk::Part {
        text: choice["text"].as_str().is_some_and(|t| !t.is_empty()),
        finished: choice["finish_reason"].is_string(),
        usage,
    })
}

/// The message of an OpenAI error body (`{"error": {"message": ...}}`) or of
/// an error event; the raw text when it has another shape.
pub(super) fn error_text(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v.get("error") {
            Some(e) => error_message(e),
            None => error_message(&v),
        },
        Err(_) => excerpt(body.trim()),
    }
}

fn error_message(error: &Value) -> String {
    match error.get("message").and_then(Value::as_str) {
        Some(m) => excerpt(m),
        None => match error.as_str() {
            Some(s) => excerpt(s),
            None => excerpt(&error.to_string()),
        },
    }
}

pub(super) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent::Data(s.to_string())
    }

    #[test]
    fn events_survive_any_cut_of_the_bytes() {
        let stream = b": keep-alive\r\ndata: {\"a\":1}\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut decoder = SseDecoder::default();
            let mut events = decoder.feed(&stream[..cut]);
            events.extend(decoder.feed(&stream[cut..]));
            events.extend(decoder.finish());
            assert_eq!(
                events,
                vec![data("{\"a\":1}"), data("[DONE]")],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn data_lines_without_blank_lines_and_a_last_line_without_end() {
        let mut decoder = SseDecoder::default();
        let events = decoder.feed(b"data: 1\ndata:2\ndata: [DONE]");
        assert_eq!(events, vec![data("1"), data("2")]);
        assert_eq!(decoder.finish(), Some(data("[DONE]")));
        assert_eq!(decoder.finish(), None);
    }

    #[test]
    fn error_events_are_told_apart() {
        let mut decoder = SseDecoder::default();
        let events = decoder.feed(
            b"event: error\ndata: {\"message\":\"boom\"}\n\ndata: 3\n\nerror: {\"code\":500}\n",
        );
        assert_eq!(
            events,
            vec![
                SseEvent::Error("{\"message\":\"boom\"}".into()),
                data("3"),
                SseEvent::Error("{\"code\":500}".into()),
            ]
        );
        assert_eq!(error_text("{\"message\":\"boom\"}"), "boom");
    }

    #[test]
    fn completion_chunks_say_text_finish_and_usage() {
        // The shapes our router, vLLM and llama-server send.
        let text = r#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" Paris","logprobs":null,"finish_reason":null}],"usage":null}"#;
        assert_eq!(
            parse_chunk(text),
            Ok(Chunk::Part {
                text: true,
                finished: false,
                usage: None
            })
        );
        let last = r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#;
        assert_eq!(
            parse_chunk(last),
            Ok(Chunk::Part {
                text: false,
                finished: true,
                usage: None
            })
        );
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":33,"completion_tokens":8,"total_tokens":41}}"#;
        assert_eq!(
            parse_chunk(usage),
            Ok(Chunk::Part {
                text: false,
                finished: false,
                usage: Some(Usage {
                    prompt_tokens: 33,
                    completion_tokens: 8
                })
            })
        );
        assert_eq!(parse_chunk(" [DONE]"), Ok(Chunk::Done));
    }

    #[test]
    fn stream_errors_and_garbage_are_errors_with_the_text() {
        let err = parse_chunk(r#"{"error":{"message":"backend unavailable","code":503}}"#);
        assert_eq!(err, Err("error in the stream: backend unavailable".into()));
        let err = parse_chunk("not json").unwrap_err();
        assert!(
            err.contains("malformed stream event") && err.contains("not json"),
            "{err}"
        );
        assert_eq!(error_text("plain text\n"), "plain text");
        assert_eq!(error_text(r#"{"detail":"nope"}"#), r#"{"detail":"nope"}"#);
        assert_eq!(excerpt(&"é".repeat(400)).chars().count(), EXCERPT + 1);
    }
}
