//! Greedy picks and log-probabilities straight from the raw logits.
//!
//! NaN logits count as `-inf` everywhere, so a broken row never panics.

use serde::{Deserialize, Serialize};

/// One token and its natural-log probability.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// The logit with NaN read as `-inf`.
pub(super) fn clean(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit
    }
}

/// Greedy pick: the highest logit, ties broken by the lowest id. A row with no
/// usable logit (empty, or all NaN/`-inf`) gives id 0.
pub fn argmax(logits: &[f32]) -> u32 {
    // The maximum in independent lanes, which the compiler turns into SIMD (`f32::max`
    // passes over NaN), then its first position: a running (id, max) pair would be a
    // serial chain of compares over the whole vocabulary.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &l) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(l);
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// What a row's probabilities are normalised by.
enum Normaliser {
    /// `log(sum(exp(logits)))`, accumulated in f64 around the maximum.
    Finite(f64),
    /// Some logits are +inf: those share all the mass between them.
    Infinite(usize),
    /// No usable logit at all: read the row as uniform.
    Uniform(usize),
}

impl Normaliser {
    fn of(logits: &[f32]) -> Self {
        let max = logits
            .iter()
            .map(|&l| clean(l))
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Self::Uniform(logits.len());
        }
        if max == f32::INFINITY {
            return Self::Infinite(logits.iter().filter(|&&l| l == max).count());
        }
        let max = f64::from(max);
        let sum: f64 = logits
            .iter()
            .map(|&l| (f64::from(clean(l)) - max).exp())
            .sum();
        Self::Finite(max + sum.ln())
    }

    fn logprob(&self, logit: f32) -> f32 {
        let logit = clean(logit);
        match *self {
            Self::Finite(lse) => (f64::from(logit) - lse) as f32,
            Self::Infinite(count) if logit == f32::INFINITY => -(count as f32).ln(),
            Self::Infinite(_) => f32::NEG_INFINITY,
            Self::Uniform(len) => -(len as f32).ln(),
        }
    }
}

/// Natural-log softmax over the whole vocabulary of the raw logits (no
/// penalties or temperature), accumulated in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let norm = Normaliser::of(logits);
    logits.iter().map(|&l| norm.logprob(l)).collect()
}

/// The log-probability of `chosen` and the `k` most likely tokens (descending,
/// ties broken by the lower id), from the raw logits. One pass over the row
/// with a sorted buffer of at most `k` entries, so a 150k vocabulary costs
/// about one comparison per logit. A `chosen` id outside the row gets `-inf`.
pub fn logprobs_of(logits: &[f32], chosen: u32, k: usize) -> (TokenLogprob, Vec<TokenLogprob>) {
    let norm = Normaliser::of(logits);
    let chosen_logprob = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&l| norm.logprob(l));

    let k = k.min(logits.len());
    // Best first; ids arrive in ascending order, so an equal logit never
    // displaces an entry already kept (the lower id wins the tie).
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (id, &logit) in logits.iter().enumerate() {
        let logit = clean(logit);
        if best.len() == k && best.last().is_none_or(|&(_, worst)| logit <= worst) {
            continue;
        }
        let at = best.partition_point(|&(_, kept)| kept >= logit);
        best.insert(at, (id as u32, logit));
        best.truncate(k);
    }
    let top = best
        .into_iter()
        .map(|(id, logit)| TokenLogprob {
            id,
            logprob: norm.logprob(logit),
        })
        .collect();
    (
        TokenLogprob {
            id: chosen,
            logprob: chosen_logprob,
        },
        top,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_breaks_ties_by_lowest_id_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.7]), 3);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[0.0, f32::INFINITY, 1.0]), 1);
    }

    #[test]
    fn argmax_is_the_first_largest_at_every_length() {
        // Lengths around the 16 lanes, NaN and -inf sprinkled in, many ties.
        for len in [1, 15, 16, 17, 31, 33, 100, 49_152] {
            for salt in 0..4u32 {
                let row: Vec<f32> = (0..len as u32)
                    .map(
                        |i| match i.wrapping_mul(2_654_435_761).wrapping_add(salt) % 97 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            v => (v % 23) as f32 - 11.0,
                        },
                    )
                    .collect();
                let max = row
                    .iter()
                    .copied()
                    .filter(|l| !l.is_nan())
                    .fold(f32::NEG_INFINITY, f32::max);
                let first = row
                    .iter()
                    .position(|&l| l == max && max > f32::NEG_INFINITY);
                assert_eq!(
                    argmax(&row),
                    first.unwrap_or(0) as u32,
                    "len {len} salt {salt}"
                );
            }
        }
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let logits: Vec<f32> = (0..50_000)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 10.0)
            .collect();
        let total: f64 = log_softmax(&logits)
            .iter()
            .map(|&lp| f64::from(lp).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-4, "sum = {total}");
    }

    #[test]
    fn log_softmax_is_stable_for_huge_logits() {
        let lp = log_softmax(&[1000.0, 1000.0, f32::NEG_INFINITY, f32::NAN]);
        assert!((lp[0] - (0.5f32).ln()).abs() < 1e-6);
        assert!((lp[1] - (0.5f32).ln()).abs() < 1e-6);
        assert_eq!(lp[2], f32::NEG_INFINITY);
        assert_eq!(lp[3], f32::NEG_INFINITY);
    }

    #[test]
    fn log_softmax_of_unusable_row_is_uniform() {
        let lp = log_softmax(&[f32::NAN, f32::NEG_INFINITY]);
        assert_eq!(lp, vec![-(2f32).ln(); 2]);
        let lp = log_softmax(&[f32::INFINITY, 1.0, f32::INFINITY]);
        assert_eq!(lp, vec![-(2f32).ln(), f32::NEG_INFINITY, -(2f32).ln()]);
    }

    #[test]
    fn logprobs_of_top_ordering_and_value() {
        let logits = [0.5, 2.0, -1.0, 2.0, f32::NAN, 1.0, 3.0];
        let full = log_softmax(&logits);
        let (chosen, top) = logprobs_of(&logits, 5, 4);
        assert_eq!(chosen.id, 5);
        assert!((chosen.logprob - full[5]).abs() < 1e-6);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![6, 1, 3, 5]);
        for t in &top {
            assert!((t.logprob - full[t.id as usize]).abs() < 1e-6);
        }
    }

    #[test]
    fn logprobs_of_matches_a_full_sort() {
        let logits: Vec<f32> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) % 10_007) as f32 / 1000.0)
            .collect();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let (_, top) = logprobs_of(&logits, 0, 20);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, order[..20]);
    }

    #[test]
    fn logprobs_of_handles_small_k_and_bad_ids() {
        let (chosen, top) = logprobs_of(&[1.0, 2.0], 9, 0);
        assert_eq!(chosen.logprob, f32::NEG_INFINITY);
        assert!(top.is_empty());
        let (_, top) = logprobs_of(&[1.0, 2.0], 0, 20);
        assert_eq!(top.len(), 2);
        let (_, top) = logprobs_of(&[], 0, 5);
        assert!(top.is_empty());
    }
}
