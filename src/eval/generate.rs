//! Autoregressive generation with a KV cache: greedy, or temperature / top-p sampling.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{CachedSeq, Llama, LoraWeights};

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with probability mass >= top_p.
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens: 128,
            seed: 0,
        }
    }
}

/// Pick the next token from one row of logits.
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    // The first maximum, as `torch.argmax` (HF's greedy search) takes it; `max_by` would
    // take the last.
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .reduce(|best, z| {
                if z.1.total_cmp(best.1).is_gt() {
                    z
                } else {
                    best
                }
            })
            .map(|(i, _)| i as u32)
            .unwrap_or(0)
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i as u32, (((z - max) / s.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0f64;
    let mut n = 0;
    for p in &probs {
        kept += p.1 / total;
        n += 1;
        if kept >= s.top_p as f64 {
            break;
        }
    }
    let mass: f64 = probs[..n].iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * mass;
    for p in &probs[..n] {
        u -= p.1;
        if u <= 0.0 {
            return p.0;
        }
    }
    probs[n - 1].0
}

/// Continue `prompt`, stopping at any of `stop` (not included) or `max_new_tokens`.
pub fn generate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    prompt: &[u32],
    s: &Sampling,
    stop: &[u32],
) -> Result<Vec<u32>> {
    let mut out = generate_batch(
        be,
        model,
        lora,
        &[prompt],
        s,
        &[s.seed],
        stop,
        |_| false,
        |_| (),
    )?;
    Ok(out.pop().unwrap_or_default())
}

/// Prompts a caller hands [`generate_batch`] at a time (exact match, self-generated data):
/// enough rows to turn decoding from one weight read per token into one per step, few
/// enough that their caches (prompt + new positions each) stay small.
pub const GENERATION_BATCH: usize = 32;

/// Continue every prompt as [`generate`] does, prompt `i` sampling with its own generator
/// seeded `seeds[i]`. The prompts run together (one forward over all their prompt tokens,
/// then one per new token over the unfinished rows), so the weights are read once per step
/// for all rows rather than once per row. A row also ends once `ended` holds for what it
/// has generated (a stop string, say); `done(i)` is called as row `i` finishes.
#[allow(clippy::too_many_arguments)]
pub fn generate_batch<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&LoraWeights<B::Buf>>,
    prompts: &[&[u32]],
    s: &Sampling,
    seeds: &[u64],
    stop: &[u32],
    ended: impl Fn(&[u32]) -> bool,
    mut done: impl FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    if seeds.len() != prompts.len() {
        return Err(Error::usage(format!(
            "{} seeds for {} prompts",
            seeds.len(),
            prompts.len()
        )));
    }
    // The cache is sized for the whole continuation, and RoPE beyond the model's positions
    // is extrapolation it never saw.
    let positions = model.cfg.max_position_embeddings;
    for p in prompts {
        if p.is_empty() {
            return Err(Error::usage("empty prompt"));
        }
        if p.len().saturating_add(s.max_new_tokens) > positions {
            return Err(Error::usage(format!(
                "a {}-token prompt plus --max-new-tokens {} exceeds the model's {positions} positions (max_position_embeddings)",
                p.len(),
                s.max_new_tokens
            )));
        }
    }
    let mut out = vec![Vec::new(); prompts.len()];
    if s.max_new_tokens == 0 {
        (0..prompts.len()).for_each(&mut done);
        return Ok(out);
    }
    let mut caches = prompts
        .iter()
        .map(|p| model.new_cache(be, p.len() + s.max_new_tokens))
        .collect::<Result<Vec<_>>>()?;
    let mut rngs: Vec<ChaCha8Rng> = seeds
        .iter()
        .map(|&x| ChaCha8Rng::seed_from_u64(x))
        .collect();
    // What each unfinished row feeds next: its prompt, then its last token.
    let mut feed: Vec<Option<Vec<u32>>> = prompts.iter().map(|p| Some(p.to_vec())).collect();
    let vocab = model.cfg.vocab_size;
    while feed.iter().any(Option::is_some) {
        let rows: Vec<usize> = (0..feed.len()).filter(|&i| feed[i].is_some()).collect();
        let mut seqs: Vec<CachedSeq<'_, B>> = caches
            .iter_mut()
            .zip(&feed)
            .filter_map(|(cache, f)| f.as_deref().map(|ids| CachedSeq { ids, cache }))
            .collect();
        let logits = be.to_host(&model.next_logits(be, lora, &mut seqs)?)?;
        drop(seqs);
        for (j, &i) in rows.iter().enumerate() {
            let next = pick(&logits[j * vocab..(j + 1) * vocab], s, &mut rngs[i]);
            let finished = stop.contains(&next) || {
                out[i].push(next);
                out[i].len() == s.max_new_tokens || ended(&out[i])
            };
            feed[i] = (!finished).then(|| vec![next]);
            if finished {
                done(i);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draw frequencies match softmax(z / T), renormalised over the nucleus, to within
    /// 5 binomial standard deviations (a fixed seed: deterministic, but a wrong rule
    /// misses by far more: the smallest probability here is ~0.04).
    #[test]
    fn sampling_follows_the_tempered_nucleus() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        for (temperature, top_p, nucleus) in [
            (1.0f32, 1.0f32, vec![0usize, 1, 2, 3, 4]),
            (0.7, 1.0, vec![0, 1, 2, 3, 4]),
            // T = 1: p = .076 .207 .563 .028 .126; sorted .563 + .207 = .770 < 0.8, so
            // the nucleus also takes .126 (tokens 2, 1, 4).
            (1.0, 0.8, vec![2, 1, 4]),
        ] {
            let w: Vec<f64> = logits
                .iter()
                .map(|&z| (z as f64 / temperature as f64).exp())
                .collect();
            let mass: f64 = nucleus.iter().map(|&i| w[i]).sum();
            let s = Sampling {
                temperature,
                top_p,
                max_new_tokens: 1,
                seed: 0,
            };
            let mut rng = ChaCha8Rng::seed_from_u64(42);
            let n = 200_000;
            let mut count = [0usize; 5];
            for _ in 0..n {
                count[pick(&logits, &s, &mut rng) as usize] += 1;
            }
            for (i, &c) in count.iter().enumerate() {
                let p = if nucleus.contains(&i) {
                    w[i] / mass
                } else {
                    0.0
                };
                let f = c as f64 / n as f64;
                let sd = (p * (1.0 - p) / n as f64).sqrt();
                assert!(
                    (f - p).abs() <= 5.0 * sd + 1e-12,
                    "T {temperature} top-p {top_p}: token {i} drawn {f:.4}, expected {p:.4}"
                );
            }
        }
    }
}
