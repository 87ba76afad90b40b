//! One request in flight: its sampler, detokenizer and stop rules, fed one
//! next-token distribution at a time by the engine's steps.

use super::request::{FinishReason, Finished, GenerationRequest, LogprobEntry, TokenEvent};
use crate::model::{Pick, Picked};
use crate::sampling::{Penalties, Sampler, StopMatcher, logprobs_of};
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

/// What a step gave a sequence to pick its next token from.
#[derive(Clone, Debug)]
pub enum Next<'a> {
    /// The next-token logits.
    Row(&'a [f32]),
    /// A token picked where the logits are (see [`Active::pick_there`]).
    Picked(Picked),
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
    /// ([`Next::Picked`]), not the row.
    pub fn pick_there(&mut self) -> Pick {
        let sampling = self.sampler.params();
        let penalties = Penalties::of(sampling, &self.prompt, &self.generated);
        let draw = (!sampling.is_greedy()).then(|| self.sampler.draw_there());
        Pick {
            penalties,
            draw,
            logprobs: self.request.logprobs,
        }
    }

    /// Takes the logits rows of a prompt span starting at `start`: row `i`
    /// predicts the token at `start + i + 1`. Rows already scored (a span
    /// recomputed after preemption) are skipped.
    pub fn score_prompt(&mut self, start: usize, rows: &[Vec<f32>]) {
        let (Some(k), Some(scores)) = (self.request.prompt_logprobs, self.prompt_scores.as_mut())
        else {
            return;
        };
        for (i, row) in rows.iter().enumerate() {
            let pos = start + i + 1;
            if pos == scores.len() && pos < self.prompt.len() {
                let (token, top) = logprobs_of(row, self.prompt[pos], k);
                scores.push(Some(LogprobEntry { token, top }));
            }
        }
    }

    /// Samples from the next-token distribution (or takes the picked id) and
    /// applies the stop rules.
    pub fn advance(&mut self, next: Next<'_>, tokenizer: &Tokenizer) -> Advance {
        if self.generated.len() >= self.budget {
            return self.finish(None, self.budget_reason());
        }
        let stopping = &self.request.stopping;
        let (id, scores) = match next {
            Next::Row(row) => {
                let id = self.sampler.sample(row, &self.prompt, &self.generated);
                (id, self.request.logprobs.map(|k| logprobs_of(row, id, k)))
            }
            Next::Picked(picked) => (picked.id, picked.logprobs),
        };
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
