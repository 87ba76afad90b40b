//! One sequence's token picker: penalties, temperature, filters, draw.
//!
//! A draw is defined once, by [`draw`], so that a backend which picks tokens where
//! the logits are (a GPU) picks the same ones: the sequence's RNG gives one
//! uniform number per sampled token ([`Sampler::next`]), and the token is
//! a function of the row, the settings and that number.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::logprobs::{argmax, clean};
use super::params::SamplingParams;
use super::penalties::Penalties;

/// A token still in the running, with its (penalised) logit and later its
/// unnormalised probability.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
    weight: f64,
}

/// What picks one sampled token from a row of logits: the filters of a
/// sequence's [`SamplingParams`] and the uniform number its RNG gave for this
/// token. [`draw`] says what it means.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// In `[0, 1)`.
    pub uniform: f64,
}

/// What picks the next tokens of one sequence. Owns the sequence's RNG, so the same
/// seed and the same logits give the same tokens (for one build of `rand`), on the
/// host or where the logits are.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the thread RNG when unset.
    /// Expects validated params; out-of-range values never panic but give
    /// unspecified picks.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// What picks the next token ([`pick`]) after `prompt` and `generated`: its
    /// penalties, and its draw (`None`: greedy), which takes the next uniform
    /// number of the RNG.
    pub fn next(&mut self, prompt: &[u32], generated: &[u32]) -> (Option<Penalties>, Option<Draw>) {
        let penalties = Penalties::of(&self.params, prompt, generated);
        let draw = (!self.params.is_greedy()).then(|| Draw {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            min_p: self.params.min_p,
            uniform: self.rng.random::<f64>(),
        });
        (penalties, draw)
    }
}

/// Picks a token from `logits`: `penalties` applied first (see [`Penalties`]), then
/// the best id (`draw` `None`: argmax, ties to the lowest id) or one drawn ([`draw`]).
pub fn pick(logits: &[f32], penalties: Option<&Penalties>, draw: &Option<Draw>) -> u32 {
    let Some(penalties) = penalties else {
        return match draw {
            None => argmax(logits),
            Some(d) => self::draw(logits, d),
        };
    };
    let mut penalised: Vec<f32> = logits.iter().map(|&l| clean(l)).collect();
    penalties.apply(&mut penalised);
    pick(&penalised, None, draw)
}

/// Draws one token from `logits` (natural, NaN read as `-inf`):
///
/// 1. the candidates are the tokens with a finite chance, ordered by logit,
///    highest first, then by id (+inf counts as the largest float);
/// 2. top-k keeps the first `top_k` of them (0: all);
/// 3. each gets the weight `exp((logit - max) / temperature)` (in f64);
/// 4. top-p keeps the shortest prefix whose weight reaches `top_p` of the kept
///    weight (at least one); min-p keeps those of weight ≥ `min_p`;
/// 5. the kept tokens, in id order, share `[0, total)` by weight, and the token
///    whose share holds `uniform · total` is drawn.
///
/// A row with no candidate gives its argmax (id 0). Backends that pick tokens
/// on a device implement the same steps (`model::backend`'s draw op).
pub fn draw(logits: &[f32], draw: &Draw) -> u32 {
    let cleaned: Vec<f32> = logits.iter().map(|&l| clean(l)).collect();
    let mut candidates = Vec::new();
    collect_candidates(&mut candidates, &cleaned, draw.top_k);
    filter_candidates(&mut candidates, draw);
    share_holding(&candidates, draw.uniform).unwrap_or_else(|| argmax(&cleaned))
}

/// Every token with a finite chance, in id order, cut to the top k.
fn collect_candidates(candidates: &mut Vec<Candidate>, logits: &[f32], k: usize) {
    candidates.clear();
    candidates.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, l)| **l > f32::NEG_INFINITY)
            .map(|(id, &l)| Candidate {
                id: id as u32,
                // +inf would turn the softmax into NaN; the largest float
                // keeps it the clear winner.
                logit: l.min(f32::MAX),
                weight: 0.0,
            }),
    );
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, by_logit_desc);
        candidates.truncate(k);
    }
}

/// Temperature, then top-p and min-p on the resulting probabilities; the kept
/// candidates end in id order.
fn filter_candidates(candidates: &mut Vec<Candidate>, draw: &Draw) {
    let Some(max) = candidates.iter().map(|c| c.logit).reduce(f32::max) else {
        return;
    };
    let temperature = f64::from(draw.temperature);
    for c in candidates.iter_mut() {
        c.weight = ((f64::from(c.logit) - f64::from(max)) / temperature).exp();
    }

    let top_p = f64::from(draw.top_p);
    if top_p < 1.0 {
        let keep = nucleus_len(candidates, top_p);
        candidates.truncate(keep);
    }

    let min_p = f64::from(draw.min_p);
    if min_p > 0.0 {
        // The most likely candidate has weight exp(0) = 1, and min-p is
        // relative to it, so renormalising after top-p changes nothing.
        candidates.retain(|c| c.weight >= min_p);
    }
    // Top-k and top-p reorder; the draw walks ids in order.
    if !candidates.is_sorted_by_key(|c| c.id) {
        candidates.sort_unstable_by_key(|c| c.id);
    }
}

/// The candidate (in the given order) whose share of the total weight holds
/// `uniform · total`.
fn share_holding(candidates: &[Candidate], uniform: f64) -> Option<u32> {
    let total: f64 = candidates.iter().map(|c| c.weight).sum();
    if !(total.is_finite() && total > 0.0) {
        return None;
    }
    let mut target = uniform * total;
    for c in candidates {
        if target < c.weight {
            return Some(c.id);
        }
        target -= c.weight;
    }
    // Rounding left a sliver past the last weight: it belongs to the last.
    candidates.last().map(|c| c.id)
}

/// Sorts the most likely candidates to the front and returns how many form
/// the nucleus: the shortest prefix holding `top_p` of the mass (at least one).
/// The mass usually sits in a few tokens, so only a growing head of the
/// vocabulary is sorted rather than all of it.
fn nucleus_len(candidates: &mut [Candidate], top_p: f64) -> usize {
    let target = top_p * candidates.iter().map(|c| c.weight).sum::<f64>();
    let mut head = candidates.len().min(64);
    loop {
        if head < candidates.len() {
            candidates.select_nth_unstable_by(head - 1, by_logit_desc);
        }
        candidates[..head].sort_unstable_by(by_logit_desc);
        let mut cumulative = 0.0;
        let reached = candidates[..head].iter().position(|c| {
            cumulative += c.weight;
            cumulative >= target
        });
        match reached {
            Some(last) => return last + 1,
            // Rounding can leave the full sum a hair short of the target.
            None if head == candidates.len() => return head,
            None => head = candidates.len().min(head * 8),
        }
    }
}

/// Higher logit first, lower id first among equals.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random row of logits in [-8, 8).
    fn row(vocab: usize, salt: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(salt);
        (0..vocab)
            .map(|_| rng.random::<f32>() * 16.0 - 8.0)
            .collect()
    }

    /// The next token of `sampler`'s sequence, as the engine picks it.
    fn sample(sampler: &mut Sampler, logits: &[f32], prompt: &[u32], generated: &[u32]) -> u32 {
        let (penalties, draw) = sampler.next(prompt, generated);
        pick(logits, penalties.as_ref(), &draw)
    }

    fn sampled(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(params);
        (0..draws)
            .map(|_| sample(&mut sampler, logits, &[], &[]))
            .collect()
    }

    fn random(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// Natural logits for the given probabilities.
    fn from_probs(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn greedy_is_the_largest_logit() {
        for salt in 0..20 {
            let mut logits = row(1000, salt);
            logits[(salt as usize * 37) % 1000] = 9.0;
            let mut sampler = Sampler::new(SamplingParams::default());
            assert_eq!(
                sample(&mut sampler, &logits, &[], &[]) as usize,
                (salt as usize * 37) % 1000
            );
        }
    }

    #[test]
    fn greedy_is_argmax_of_penalised_logits() {
        let params = SamplingParams {
            repetition_penalty: 1.3,
            frequency_penalty: 0.5,
            presence_penalty: 0.2,
            ..SamplingParams::default()
        };
        let logits = row(500, 3);
        let prompt = [1, 2, 3, 400];
        let generated = [7, 7, 9, 499];
        let mut penalised = logits.clone();
        Penalties::of(&params, &prompt, &generated)
            .unwrap()
            .apply(&mut penalised);
        let mut sampler = Sampler::new(params);
        assert_eq!(
            sample(&mut sampler, &logits, &prompt, &generated),
            argmax(&penalised)
        );
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = row(2000, 1);
        assert_eq!(
            sampled(random(1.0, 42), &logits, 200),
            sampled(random(1.0, 42), &logits, 200)
        );
    }

    #[test]
    fn the_draw_walks_the_kept_tokens_in_id_order() {
        // Weights 1, 3, 1 (ids 0, 1, 2): [0, 0.2) is id 0's, [0.2, 0.8) id 1's.
        let logits = [0.0, 3f32.ln(), 0.0];
        let at = |uniform| {
            draw(
                &logits,
                &Draw {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.0,
                    uniform,
                },
            )
        };
        assert_eq!([at(0.1), at(0.3), at(0.7), at(0.9)], [0, 1, 1, 2]);
    }

    #[test]
    fn different_seeds_differ() {
        let logits = vec![0.0; 100];
        assert_ne!(
            sampled(random(1.0, 1), &logits, 50),
            sampled(random(1.0, 2), &logits, 50)
        );
    }

    #[test]
    fn top_k_1_is_greedy() {
        for salt in 0..20 {
            let logits = row(1000, salt);
            let params = SamplingParams {
                top_k: 1,
                ..random(1.5, salt)
            };
            let picks = sampled(params, &logits, 20);
            assert!(picks.iter().all(|&t| t == argmax(&logits)));
        }
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let logits = from_probs(&[0.1, 0.3, 0.05, 0.25, 0.3]);
        let params = SamplingParams {
            top_k: 3,
            ..random(1.0, 5)
        };
        let picks = sampled(params, &logits, 2000);
        assert!(picks.iter().all(|t| [1, 3, 4].contains(t)), "{picks:?}");
        assert!([1, 3, 4].iter().all(|t| picks.contains(t)));
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        let logits = from_probs(&[0.15, 0.5, 0.05, 0.3]);
        let params = SamplingParams {
            top_p: 0.75,
            ..random(1.0, 11)
        };
        let picks = sampled(params, &logits, 4000);
        assert!(picks.iter().all(|t| [1, 3].contains(t)), "{picks:?}");
        // Renormalised nucleus: 0.5 / 0.8 = 0.625 for token 1.
        let share = picks.iter().filter(|&&t| t == 1).count() as f64 / picks.len() as f64;
        assert!((share - 0.625).abs() < 0.03, "share of token 1 = {share}");
    }

    #[test]
    fn top_p_nucleus_can_span_most_of_the_vocabulary() {
        // A flat row: the nucleus is the first half by id (ties go to lower ids).
        let params = SamplingParams {
            top_p: 0.5,
            ..random(1.0, 9)
        };
        let picks = sampled(params, &vec![0.0; 1000], 2000);
        assert!(picks.iter().all(|&t| t < 500));
        assert!(picks.iter().any(|&t| t >= 400));
    }

    #[test]
    fn top_p_keeps_at_least_the_best_token() {
        let logits = from_probs(&[0.2, 0.6, 0.2]);
        let params = SamplingParams {
            top_p: 0.01,
            ..random(1.0, 3)
        };
        assert!(sampled(params, &logits, 200).iter().all(|&t| t == 1));
    }

    #[test]
    fn min_p_filter() {
        let logits = from_probs(&[0.15, 0.5, 0.05, 0.3]);
        let params = SamplingParams {
            min_p: 0.4, // threshold 0.2: keeps 0.5 and 0.3
            ..random(1.0, 13)
        };
        let picks = sampled(params, &logits, 4000);
        assert!(picks.iter().all(|t| [1, 3].contains(t)), "{picks:?}");
        assert!(picks.contains(&3));
    }

    #[test]
    fn temperature_sharpens_the_distribution() {
        let logits = from_probs(&[0.4, 0.6]);
        let share = |temperature| {
            let picks = sampled(random(temperature, 17), &logits, 4000);
            picks.iter().filter(|&&t| t == 1).count() as f64 / picks.len() as f64
        };
        assert!((share(1.0) - 0.6).abs() < 0.03);
        assert!(share(0.2) > 0.85);
    }

    #[test]
    fn repetition_penalty_changes_the_pick() {
        let logits = [2.0, 1.9, -0.5, -0.55];
        let params = SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        assert_eq!(sample(&mut sampler, &logits, &[], &[]), 0);
        // 2.0 / 1.2 < 1.9: a prompt token loses its lead.
        assert_eq!(sample(&mut sampler, &logits, &[0], &[]), 1);
        // Negative logits are multiplied: -0.5 * 1.2 < -0.55.
        assert_eq!(sample(&mut sampler, &logits[2..], &[], &[0]), 1);
    }

    #[test]
    fn presence_and_frequency_apply_to_generated_tokens_only() {
        let logits = [1.0, 0.8, 0.0];
        let params = SamplingParams {
            frequency_penalty: 0.15,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        assert_eq!(sample(&mut sampler, &logits, &[0, 0, 0, 0], &[]), 0);
        assert_eq!(sample(&mut sampler, &logits, &[], &[0]), 0);
        assert_eq!(sample(&mut sampler, &logits, &[], &[0, 0]), 1);

        let params = SamplingParams {
            presence_penalty: 0.3,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        assert_eq!(sample(&mut sampler, &logits, &[0], &[]), 0);
        assert_eq!(sample(&mut sampler, &logits, &[], &[0]), 1);
    }

    #[test]
    fn nan_logits_never_win_and_never_panic() {
        let logits = [f32::NAN, 0.1, f32::NAN, 0.3, f32::NEG_INFINITY];
        assert_eq!(sampled(SamplingParams::default(), &logits, 1), vec![3]);
        let picks = sampled(random(1.0, 1), &logits, 500);
        assert!(picks.iter().all(|t| [1, 3].contains(t)));
    }

    #[test]
    fn empty_candidate_set_falls_back_to_argmax() {
        let all_nan = [f32::NAN; 4];
        let params = SamplingParams {
            top_k: 2,
            top_p: 0.5,
            min_p: 0.5,
            ..random(0.7, 1)
        };
        assert_eq!(sampled(params.clone(), &all_nan, 3), vec![0; 3]);
        assert_eq!(sampled(params, &[], 1), vec![0]);
        let infinite = [0.0, f32::INFINITY, 1.0];
        assert_eq!(sampled(random(1.0, 1), &infinite, 20), vec![1; 20]);
    }

    #[test]
    fn out_of_vocab_history_is_ignored() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 1.0,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        assert_eq!(sample(&mut sampler, &[0.0, 1.0], &[99], &[1_000_000]), 1);
    }
}
