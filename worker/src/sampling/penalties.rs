//! The repetition, presence and frequency penalties of one sequence's next token, in a
//! form a backend applies where the logits are: the ids they touch, not the history.

use std::collections::BTreeMap;

use super::params::SamplingParams;

/// What the penalties do to one row of logits: the repetition penalty (HF/CTRL:
/// divide positive, multiply negative logits) on every token seen in the prompt or
/// the output, then the presence and frequency penalties (OpenAI) subtracted from
/// every token generated (once, and per occurrence).
#[derive(Clone, Debug, PartialEq)]
pub struct Penalties {
    /// 1: off.
    pub repetition: f32,
    pub presence: f32,
    pub frequency: f32,
    /// Every token id seen, ascending, with how many times it was generated.
    pub seen: Vec<(u32, u32)>,
}

impl Penalties {
    /// The penalties of `params` after `prompt` and `generated`; `None` when it has
    /// none.
    pub fn of(params: &SamplingParams, prompt: &[u32], generated: &[u32]) -> Option<Self> {
        if !params.has_penalties() {
            return None;
        }
        let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
        if params.repetition_penalty != 1.0 {
            for &id in prompt {
                seen.entry(id).or_default();
            }
        }
        for &id in generated {
            *seen.entry(id).or_default() += 1;
        }
        Some(Self {
            repetition: params.repetition_penalty,
            presence: params.presence_penalty,
            frequency: params.frequency_penalty,
            seen: seen.into_iter().collect(),
        })
    }

    /// The penalised value of a logit of a token seen, generated `count` times.
    pub fn penalise(&self, logit: f32, count: u32) -> f32 {
        let mut l = logit;
        if self.repetition != 1.0 {
            l = if l > 0.0 {
                l / self.repetition
            } else {
                l * self.repetition
            };
        }
        if count > 0 && (self.presence != 0.0 || self.frequency != 0.0) {
            l -= self.presence + self.frequency * count as f32;
        }
        l
    }

    /// Applies them to `logits` in place. Ids outside the row are ignored.
    pub fn apply(&self, logits: &mut [f32]) {
        for &(id, count) in &self.seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = self.penalise(*l, count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_seen_and_times_generated() {
        let params = SamplingParams {
            repetition_penalty: 1.2,
            frequency_penalty: 0.5,
            ..SamplingParams::default()
        };
        let p = Penalties::of(&params, &[9, 3, 9], &[4, 3, 4, 4]).unwrap();
        assert_eq!(p.seen, [(3, 1), (4, 3), (9, 0)]);
        // Without a repetition penalty the prompt's tokens change nothing.
        let params = SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::default()
        };
        let p = Penalties::of(&params, &[9, 3], &[4]).unwrap();
        assert_eq!(p.seen, [(4, 1)]);
        assert_eq!(Penalties::of(&SamplingParams::default(), &[1], &[2]), None);
    }

    #[test]
    fn repetition_then_presence_and_frequency() {
        let p = Penalties {
            repetition: 2.0,
            presence: 0.5,
            frequency: 0.25,
            seen: vec![(0, 0), (1, 2), (2, 1), (9, 1)],
        };
        let mut logits = [3.0, -1.0, 4.0, 7.0];
        p.apply(&mut logits);
        // 3 / 2; -1 · 2 - 0.5 - 0.5; 4 / 2 - 0.5 - 0.25; 7 unseen; id 9 outside.
        assert_eq!(logits, [1.5, -3.0, 1.25, 7.0]);
    }
}
