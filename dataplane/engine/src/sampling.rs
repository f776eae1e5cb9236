//! Choosing the next token from logits: greedy at temperature 0 (deterministic), otherwise
//! temperature-scaled softmax restricted by top-k and top-p, drawn from a per-sequence seeded RNG.

use llguidance::toktrie::SimpleVob;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token every time.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Seed for the sequence's RNG; the same seed and prompt give the same text.
    pub seed: u64,
    /// How many of the most likely tokens to report beside each chosen one (0: none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, top_logprobs: 0 }
    }
}

/// The most alternatives reported per token (OpenAI's `top_logprobs` allows up to 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One sequence's sampler.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// The tokens the next draw may choose from (a grammar's mask); `None` allows all.
    mask: Option<SimpleVob>,
}

/// The chosen token and its log-probability under the unrestricted distribution, with the most
/// likely tokens when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A token of a text scored by the model: its log-probability given what precedes it, and the
/// `top` most likely tokens at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The log of the softmax's normaliser: `logits[i] - log_z` is token `i`'s log-probability.
fn log_normaliser(logits: &[f32]) -> f32 {
    log_normaliser_with(logits, argmax(logits).1)
}

/// [`log_normaliser`], given the largest logit.
fn log_normaliser_with(logits: &[f32], max: f32) -> f32 {
    max + crate::vmath::sum_exp(logits, max).ln()
}

/// The `k` most likely tokens and their log-probabilities (`log_z` from [`log_normaliser`]),
/// most likely first; ties go to the lower token id.
fn top_k(logits: &[f32], log_z: f32, k: usize) -> Vec<(u32, f32)> {
    let k = k.min(MAX_TOP_LOGPROBS).min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in logits.iter().enumerate() {
        if (top.len() == k && v <= top[k - 1].1) || v.is_nan() {
            continue;
        }
        let at = top.partition_point(|&(_, w)| w >= v);
        top.insert(at, (i as u32, v));
        top.truncate(k);
    }
    top.into_iter().map(|(i, v)| (i, v - log_z)).collect()
}

/// Scores `token` under `logits` (the model's distribution at its place), with the `top` most
/// likely tokens.
pub fn score(logits: &[f32], token: u32, top: usize) -> TokenScore {
    let log_z = log_normaliser(logits);
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&v| v - log_z);
    TokenScore { token, logprob, top: top_k(logits, log_z, top) }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng, mask: None }
    }

    /// Restricts the next draw to the tokens `mask` allows.
    pub fn restrict_next(&mut self, mask: SimpleVob) {
        self.mask = Some(mask);
    }

    /// Draws the next token. The reported log-probability is under the model's own distribution,
    /// before any mask (as vLLM reports it by default).
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let raw = logits;
        let (raw_argmax, raw_max) = argmax(raw);
        let log_z = log_normaliser_with(raw, raw_max);
        let top = top_k(raw, log_z, self.params.top_logprobs);
        let chosen = |i: usize| Sampled { token: i as u32, logprob: raw[i] - log_z, top };
        let masked;
        let (logits, best, max) = match self.mask.take() {
            None => (logits, raw_argmax, raw_max),
            Some(mask) => {
                masked = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| if mask.is_allowed(i as u32) { l } else { f32::NEG_INFINITY })
                    .collect::<Vec<f32>>();
                let (at, max) = argmax(&masked);
                (&masked[..], at, max)
            }
        };
        if self.params.temperature <= 0.0 || max == f32::NEG_INFINITY {
            return chosen(best);
        }
        // Tokens with no weight (masked out, or too unlikely to register) are never drawn.
        let mut candidates: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i, ((v - max) / self.params.temperature).exp()))
            .filter(|c| c.1 > 0.0)
            .collect();
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = candidates
                .iter()
                .position(|c| {
                    cumulative += c.1 / total;
                    cumulative >= self.params.top_p
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for &(i, weight) in &candidates {
            draw -= weight;
            if draw <= 0.0 {
                return chosen(i);
            }
        }
        chosen(candidates[candidates.len() - 1].0)
    }
}

/// The first position of the largest value and that value (NaNs are passed over; `(0, -inf)` when
/// there is nothing else). Written as fixed-width lane loops, which the compiler vectorises: a
/// whole vocabulary per sampled token otherwise costs a one-value-a-cycle dependency chain.
fn argmax(x: &[f32]) -> (usize, f32) {
    const LANES: usize = 16;
    let larger = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = larger(*m, v);
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
    let chunk = x.chunks(LANES).position(|c| c.iter().fold(false, |found, &v| found | (v == max))).unwrap_or(0);
    let at = x[chunk * LANES..].iter().position(|&v| v == max).map_or(0, |i| chunk * LANES + i);
    (at, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        let out = s.sample(&[0.1, 2.0, -1.0, 1.9]);
        assert_eq!(out.token, 1);
        assert!(out.logprob < 0.0 && out.logprob > -1.0);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 / 3.0).collect();
        let params = SamplingParams { temperature: 1.0, top_p: 0.9, seed: 42, ..Default::default() };
        let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
        let run_a: Vec<u32> = (0..20).map(|_| a.sample(&logits).token).collect();
        let run_b: Vec<u32> = (0..20).map(|_| b.sample(&logits).token).collect();
        assert_eq!(run_a, run_b);
        assert!(run_a.iter().any(|&t| t != run_a[0]), "sampling at temperature 1 varies");
        let mut greedy = Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() });
        let best = Sampler::new(SamplingParams::default()).sample(&logits).token;
        assert!((0..10).all(|_| greedy.sample(&logits).token == best));
    }

    #[test]
    fn argmax_finds_the_first_largest_value_anywhere() {
        for n in [1, 15, 16, 17, 100, 49_152] {
            for at in [0, n / 3, n - 1] {
                let mut x: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 / 100.0 - 2.0).collect();
                x[at] = 3.0;
                if n > 1 {
                    x[n - 1 - (at == n - 1) as usize] = f32::NAN;
                }
                assert_eq!(argmax(&x), (at, 3.0), "n {n}, at {at}");
                if at + 1 < n && !x[at + 1].is_nan() {
                    x[at + 1] = 3.0;
                    assert_eq!(argmax(&x).0, at, "the first of equals");
                }
            }
        }
        assert_eq!(argmax(&[]), (0, f32::NEG_INFINITY));
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), (0, f32::NEG_INFINITY));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~88% of the mass; top_p 0.5 must always pick it.
        let logits = [5.0, 3.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: 1, ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits).token == 0));
    }

    #[test]
    fn scores_are_log_softmax_and_the_top_tokens_come_most_likely_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f32 = logits.iter().map(|v| v.exp()).sum::<f32>().ln();
        let s = score(&logits, 2, 3);
        assert!((s.logprob - (2.0 - z)).abs() < 1e-5, "{s:?}");
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "ties go to the lower id");
        assert!((s.top[0].1 - (3.0 - z)).abs() < 1e-5);
        assert!(score(&logits, 0, 0).top.is_empty());
        assert_eq!(score(&logits, 0, 100).top.len(), 5);
        assert_eq!(score(&logits, 9, 1).logprob, f32::NEG_INFINITY, "a token outside the vocabulary");
        // The sampler reports the same alternatives beside the token it draws.
        let mut s = Sampler::new(SamplingParams { top_logprobs: 2, ..Default::default() });
        let drawn = s.sample(&logits);
        assert_eq!((drawn.token, drawn.top.iter().map(|t| t.0).collect::<Vec<_>>()), (1, vec![1, 3]));
    }
}
