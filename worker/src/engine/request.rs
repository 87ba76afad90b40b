//! What a caller asks of the engine and what it gets back, as plain data.

use crate::sampling::{SamplingParams, TokenLogprob};
use crate::tokenizer::ChatMessage;

/// The prompt, in one of the three forms callers use.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Raw text, tokenized as given (BOS only where the model's metadata asks).
    Text(String),
    /// Chat messages, rendered with the model's chat template and its generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids, as they are.
    Ids(Vec<u32>),
}

/// When generation ends.
#[derive(Clone, Debug, Default)]
pub struct Stopping {
    /// At most this many generated tokens; `None` = until the context is full.
    pub max_tokens: Option<usize>,
    /// Stop strings, not included in the output.
    pub stop: Vec<String>,
    /// Token ids that end generation besides the model's own end tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-generation tokens.
    pub ignore_eos: bool,
}

#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub stopping: Stopping,
    /// Report each generated token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability and this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// Higher runs first when requests wait for room; equal priorities are
    /// served first come, first served.
    pub priority: i32,
    /// Most prompt tokens accepted (a server's limit, below the context's).
    pub max_prompt_tokens: Option<usize>,
    /// The LoRA adapter to run with (by the name it was loaded under); `None`:
    /// the base model.
    pub adapter: Option<String>,
}

impl GenerationRequest {
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            stopping: Stopping::default(),
            logprobs: None,
            prompt_logprobs: None,
            priority: 0,
            max_prompt_tokens: None,
            adapter: None,
        }
    }
}

/// A token's log-probability and the best alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct LogprobEntry {
    pub token: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// One generated token, streamed as soon as it is sampled.
#[derive(Clone, Debug)]
pub struct TokenEvent {
    pub id: u32,
    /// Whole UTF-8 characters only; held back while it may start a stop string.
    pub text_delta: String,
    pub logprob: Option<LogprobEntry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The model's context (or the engine's limit) is full.
    Context,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::Context => "length",
        }
    }
}

/// The end of a request.
#[derive(Clone, Debug)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    /// The whole output text (the concatenation of every delta and `text_tail`).
    pub text: String,
    /// Text released only at the end (it was held back as a possible stop string).
    pub text_tail: String,
    /// One entry per prompt token; `None` for the first.
    pub prompt_logprobs: Option<Vec<Option<LogprobEntry>>>,
    pub matched_stop: Option<String>,
}
