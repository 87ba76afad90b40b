//! One request in flight: its sampler, detokenizer and stop rules, fed one
//! picked token (and its prompt's scores) at a time by the engine's steps.

use super::request::{FinishReason, Finished, GenerationRequest, LogprobEntry, TokenEvent};
use crate::model::{Pick, Picked, Score, TokenScores};
use crate::sampling::{Sampler, StopMatcher};
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

/// What a next-token distribution led to.
pub enum Advance {
    /// A token to stream; the sequence goes on with it.
    Token(TokenEvent),
    /// The request ended, after streaming `last` when there is one.
    Finished {
        last: Option<TokenEvent>,
        finished: Finished,
    },
}

pub struct Active {
    pub request: GenerationRequest,
    pub prompt: Vec<u32>,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stops: StopMatcher,
    generated: Vec<u32>,
    text: String,
    /// Most tokens it may generate (its `max_tokens` and the context).
    budget: usize,
    /// Log-probabilities of the prompt's tokens, while asked for and until
    /// complete (`None` for the first token, which nothing predicts).
    prompt_scores: Option<Vec<Option<LogprobEntry>>>,
}

impl Active {
    pub fn new(request: GenerationRequest, prompt: Vec<u32>, max_seq_len: usize) -> Self {
        let budget =
            (max_seq_len - prompt.len()).min(request.stopping.max_tokens.unwrap_or(usize::MAX));
        Self {
            sampler: Sampler::new(request.sampling.clone()),
            detok: IncrementalDetokenizer::new(),
            stops: StopMatcher::new(request.stopping.stop.clone()),
            generated: Vec::new(),
            text: String::new(),
            budget,
            prompt_scores: request.prompt_logprobs.map(|_| vec![None]),
            request,
            prompt,
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated.len()
    }

    /// Whether the next prompt span must return every token's logits.
    pub fn wants_prompt_scores(&self) -> bool {
        self.prompt_scores
            .as_ref()
            .is_some_and(|s| s.len() < self.prompt.len())
    }

    /// How the step picks its next token where the logits are: the best id (greedy)
    /// or one drawn with the next number of its RNG, after its penalties, with the
    /// log-probabilities asked for. The step then hands back what it picked
    /// ([`Picked`]), not the row.
    pub fn pick_there(&mut self) -> Pick {
        let (penalties, draw) = self.sampler.next(&self.prompt, &self.generated);
        Pick {
            penalties,
            draw,
            logprobs: self.request.logprobs,
        }
    }

    /// How the step scores a prompt span of `len` tokens from `start` where the
    /// logits are: each row on the prompt token it predicts; the last row of a span
    /// that `completes` the prompt picks the first generated token
    /// ([`Active::pick_there`]).
    pub fn score_there(&mut self, start: usize, len: usize, completes: bool) -> Score {
        let end = (start + len + 1).min(self.prompt.len());
        let next = self.prompt[(start + 1).min(end)..end].to_vec();
        Score {
            next,
            k: self.request.prompt_logprobs.unwrap_or(0),
            pick: completes.then(|| self.pick_there()),
        }
    }

    /// Takes the scores of a prompt span starting at `start`: entry `i` is the
    /// token at `start + i + 1`'s. Those already taken (a span recomputed after
    /// preemption) are skipped.
    pub fn record_prompt_scores(&mut self, start: usize, entries: Vec<TokenScores>) {
        let Some(scores) = self.prompt_scores.as_mut() else {
            return;
        };
        for (i, (token, top)) in entries.into_iter().enumerate() {
            let pos = start + i + 1;
            if pos == scores.len() && pos < self.prompt.len() {
                scores.push(Some(LogprobEntry { token, top }));
            }
        }
    }

    /// Takes the token picked for it and applies the stop rules.
    pub fn advance(&mut self, picked: Picked, tokenizer: &Tokenizer) -> Advance {
        if self.generated.len() >= self.budget {
            return self.finish(None, self.budget_reason());
        }
        let stopping = &self.request.stopping;
        let (id, scores) = (picked.id, picked.logprobs);
        if (!stopping.ignore_eos && tokenizer.eog_ids().contains(&id))
            || stopping.stop_token_ids.contains(&id)
        {
            return self.finish(None, FinishReason::Stop);
        }
        let logprob = scores.map(|(token, top)| LogprobEntry { token, top });
        self.generated.push(id);
        let step = self.stops.push(&self.detok.push(tokenizer, id));
        self.text.push_str(&step.emit);
        let event = TokenEvent {
            id,
            text_delta: step.emit,
            logprob,
        };
        if let Some(stop) = step.matched {
            let mut advance = self.finish(Some(event), FinishReason::Stop);
            if let Advance::Finished { finished, .. } = &mut advance {
                finished.matched_stop = Some(stop);
            }
            return advance;
        }
        if self.generated.len() >= self.budget {
            return self.finish(Some(event), self.budget_reason());
        }
        Advance::Token(event)
    }

    fn budget_reason(&self) -> FinishReason {
        if self
            .request
            .stopping
            .max_tokens
            .is_some_and(|m| self.generated.len() >= m)
        {
            FinishReason::Length
        } else {
            FinishReason::Context
        }
    }

    fn finish(&mut self, last: Option<TokenEvent>, reason: FinishReason) -> Advance {
        let mut text_tail = String::new();
        if reason != FinishReason::Stop || !self.stops.is_stopped() {
            // Text held back (a partial character, a possible stop string)
            // is released at the end.
            let step = self.stops.push(&self.detok.finish());
            text_tail = step.emit + &self.stops.flush();
            self.text.push_str(&text_tail);
        }
        Advance::Finished {
            last,
            finished: Finished {
                reason,
                prompt_token_ids: std::mem::take(&mut self.prompt),
                token_ids: std::mem::take(&mut self.generated),
                text: std::mem::take(&mut self.text),
                text_tail,
                prompt_logprobs: self.prompt_scores.take(),
                matched_stop: None,
            },
        }
    }
}
