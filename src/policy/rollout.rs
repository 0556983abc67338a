//! The rollout engine: batched, KV-cached sampling of a group of completions
//! where every generated step's next input is chosen per row.
//!
//! At step t of each sequence: the backbone gives h_t and p_t = softmax(z_t / T);
//! the token y_t ~ p_t is sampled (it is the text, the reward and the loss);
//! the step's mode decides the next input (`latent::Rules`: TARPO's router,
//! or another method's rule), forced hard once the answer marker is complete
//! or the sequence ends. Every step's record is kept for replay, losses and
//! analysis. Without a router or latent mode this is plain generation.
//!
//! The random stream: per row and step one sampling draw and one mode uniform,
//! whatever the mode, so it does not depend on which rows are forced (Coconut's
//! thoughts sample nothing and draw nothing).
use super::hrpo::HrpoGate;
use super::latent::{Latent, Rules, StepView};
use super::records::{LatentRecord, Rollout, TokenRecord, HARD, LATENT, SOFT};
use super::router::Router;
use super::sampler::{Rng, Sampling};
use super::step_stats::token_stats;
use crate::model::{left_pad, KvCache, Llama, Tokenizer};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

thread_local! {
    static HOST_COPIES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static PREFILL_POSITIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Token positions the prefills of this thread have run through the model
/// (rows x length, padding included): a shared prefix counts once.
pub fn prefill_positions() -> u64 {
    PREFILL_POSITIONS.with(|c| c.get())
}

fn count_prefill(rows: usize, len: i64) {
    PREFILL_POSITIONS.with(|c| c.set(c.get() + rows as u64 * len as u64));
}

/// Device-to-host copies the decode loops of this thread have made: one per
/// token step for TARPO and plain sampling (each a synchronisation on a GPU),
/// a second at steps where Soft Thinking or HRPO record their inputs, one per
/// Coconut thought.
pub fn host_copies() -> u64 {
    HOST_COPIES.with(|c| c.get())
}

/// A decode step's tensor brought to the host (and counted).
fn to_host(t: &Tensor) -> Result<Tensor> {
    HOST_COPIES.with(|c| c.set(c.get() + 1));
    Ok(t.f_to_device(Device::Cpu)?)
}

/// What a token step reads on the host, from one copy: the sampled ids, the
/// per-row stats, and with a router its log-probs and the top-k mixtures.
struct StepHost {
    ids: Vec<i64>,
    stats: Vec<Vec<f32>>,
    soft_lp: Vec<Vec<f32>>,
    mix: Option<Mixtures>,
}

/// Per row, the soft input's top-k token ids and their weights.
type Mixtures = (Vec<Vec<i64>>, Vec<Vec<f32>>);

impl StepHost {
    fn fetch(
        next: &Tensor,
        stats: &[&Tensor],
        router: Option<(&Tensor, &Tensor, &Tensor)>,
    ) -> Result<StepHost> {
        // f64 holds the ids and the f32 values exactly.
        let col = |t: &Tensor| t.f_to_kind(Kind::Double);
        let mut cols = vec![col(next)?.f_unsqueeze(1)?];
        for s in stats {
            cols.push(col(s)?.f_unsqueeze(1)?);
        }
        let k = match router {
            Some((lp, ids, w)) => {
                cols.extend([col(lp)?, col(ids)?, col(w)?]);
                ids.size()[1] as usize
            }
            None => 0,
        };
        let rows = Vec::<Vec<f64>>::try_from(&to_host(&Tensor::f_cat(&cols, 1)?)?)?;
        let n = stats.len();
        let f32s = |r: &[f64]| r.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let b = rows.len();
        Ok(StepHost {
            ids: rows.iter().map(|r| r[0] as i64).collect(),
            stats: rows.iter().map(|r| f32s(&r[1..1 + n])).collect(),
            soft_lp: match router {
                Some(_) => rows.iter().map(|r| f32s(&r[1 + n..3 + n])).collect(),
                None => vec![vec![0.0, f32::NEG_INFINITY]; b],
            },
            // The mixtures come along only when a router may pick them.
            mix: router.map(|_| {
                let at = 3 + n;
                (
                    rows.iter()
                        .map(|r| r[at..at + k].iter().map(|&x| x as i64).collect())
                        .collect(),
                    rows.iter().map(|r| f32s(&r[at + k..at + 2 * k])).collect(),
                )
            }),
        })
    }
}

#[derive(Debug, Clone)]
pub struct RolloutOptions {
    /// Tokens of text per completion at most (Coconut's thoughts come on top).
    pub max_new: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Generation stops for a sequence after one of these tokens.
    pub eos: Vec<i64>,
    /// Size of the soft mixture (top-k of p_t, renormalised).
    pub mix_k: i64,
    /// Once this text is complete in a completion, its later steps are hard.
    pub answer_marker: Option<String>,
    /// Prompts longer than this keep their last `max_prompt` tokens.
    pub max_prompt: Option<usize>,
    /// Keep every step's next-input embeddings (tests and analysis).
    pub keep_inputs: bool,
    /// Which method chooses the next inputs (default: TARPO's router).
    pub latent: Latent,
    /// Per row, a (position, mode) that replaces the rule's choice there
    /// (counterfactual routing); positions the rollout forces hard stay hard.
    pub overrides: Vec<Option<(usize, i64)>>,
    /// On the user's interrupt, end here and return what was generated
    /// (streaming) instead of failing.
    pub stop_on_interrupt: bool,
}

impl RolloutOptions {
    pub fn new(max_new: usize, sampling: Sampling, seed: u64, eos: Vec<i64>) -> Self {
        RolloutOptions {
            max_new,
            sampling,
            seed,
            eos,
            mix_k: 10,
            answer_marker: None,
            max_prompt: None,
            keep_inputs: false,
            latent: Latent::Router,
            overrides: Vec::new(),
            stop_on_interrupt: false,
        }
    }
}

/// Sets libtorch's intra-op thread count until dropped.
pub struct IntraOpThreads(i32);

impl IntraOpThreads {
    pub fn set(n: i32) -> Self {
        let old = tch::get_num_threads();
        tch::set_num_threads(n);
        IntraOpThreads(old)
    }
}

impl Drop for IntraOpThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// Follows the generated text of each sequence just far enough to see when the
/// answer marker completes (no re-decoding of the whole text at every step).
struct MarkerWatch<'a> {
    tok: &'a Tokenizer,
    marker: String,
    tails: Vec<String>,
    seen: Vec<bool>,
}

impl MarkerWatch<'_> {
    fn push(&mut self, row: usize, token: i64) -> Result<bool> {
        if !self.seen[row] {
            let tail = &mut self.tails[row];
            tail.push_str(&self.tok.decode(&[token], false)?);
            self.seen[row] = tail.contains(&self.marker);
            let keep = self.marker.len() * 4;
            if tail.len() > keep {
                let cut = tail
                    .char_indices()
                    .map(|(i, _)| i)
                    .find(|&i| i >= tail.len() - keep)
                    .unwrap_or(0);
                tail.drain(..cut);
            }
        }
        Ok(self.seen[row])
    }
}

/// Prefills `prompts` (left-padded) into a new cache with room for `extra`
/// more slots, each distinct prompt once (a group repeats its prompt) with its
/// cache rows copied to every prompt that shares it. Returns the (B, H)
/// final-normed hidden state at each prompt's last position, and the cache.
pub(crate) fn prefill(net: &Llama, prompts: &[Vec<i64>], extra: i64) -> Result<(Tensor, KvCache)> {
    let (states, cache) = prefill_loops(net, prompts, extra)?;
    Ok((net.exit_state(states)?.f_squeeze_dim(1)?, cache))
}

/// `prefill` keeping every loop's state, (B, 1, H) each. Under autograd the
/// gradients of every row sharing a prompt meet in its one forward.
pub(crate) fn prefill_loops(
    net: &Llama,
    prompts: &[Vec<i64>],
    extra: i64,
) -> Result<(Vec<Tensor>, KvCache)> {
    let device = net.embed_tokens.device();
    let (distinct, of_row) = distinct_rows(prompts);
    // A prefix every distinct prompt shares (a chat template's system
    // prompt) runs once, its keys and values copied to every row; each row
    // then runs only its own part, left-padded.
    let p = shared_prefix(&distinct);
    let rest: Vec<Vec<i64>> = distinct.iter().map(|d| d[p..].to_vec()).collect();
    let (ids, valid) = left_pad(&rest, device)?;
    let l = ids.size()[1];
    let mut cache = if p > 0 {
        let mut one = net.new_cache(1, p as i64 + l + extra)?;
        let prefix = Tensor::from_slice(&distinct[0][..p])
            .f_to_device(device)?
            .f_unsqueeze(0)?;
        let step = one.step(&Tensor::f_ones([1, p as i64], (Kind::Bool, device))?)?;
        net.forward_loops(&net.embed(&prefix)?, &step, Some(&one))?;
        count_prefill(1, p as i64);
        let rows = Tensor::f_zeros([distinct.len() as i64], (Kind::Int64, device))?;
        one.select_rows(&rows)?
    } else {
        net.new_cache(distinct.len() as i64, l + extra)?
    };
    let step = cache.step(&valid)?;
    let states = net.forward_loops(&net.embed(&ids)?, &step, Some(&cache))?;
    count_prefill(distinct.len(), l);
    let last = (states.iter().map(|h| h.f_narrow(1, l - 1, 1))).collect::<Result<Vec<_>, _>>()?;
    // Under autograd the cache is always copied: the prompt's attention saved
    // its keys for the backward, and later steps write into the same buffer.
    if distinct.len() == prompts.len() && !last[0].requires_grad() {
        return Ok((last, cache));
    }
    let rows = Tensor::from_slice(&of_row).f_to_device(device)?;
    let last = (last.iter().map(|h| h.f_index_select(0, &rows))).collect::<Result<_, _>>()?;
    Ok((last, cache.select_rows(&rows)?))
}

/// Tokens at the start of every prompt worth running once for all: the
/// longest common prefix of at least 2 prompts when it is 8 tokens or more,
/// leaving each prompt at least one token of its own (0: none).
fn shared_prefix(prompts: &[Vec<i64>]) -> usize {
    let Some((first, others)) = prompts.split_first() else {
        return 0;
    };
    if others.is_empty() {
        return 0;
    }
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
    let common = (others.iter())
        .map(|p| p.iter().zip(first).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(0)
        .min(shortest.saturating_sub(1));
    if common >= 8 {
        common
    } else {
        0
    }
}

/// The distinct prompts (first-seen order) and, per prompt, its index among them.
fn distinct_rows(prompts: &[Vec<i64>]) -> (Vec<Vec<i64>>, Vec<i64>) {
    let mut seen: std::collections::HashMap<&[i64], i64> = std::collections::HashMap::new();
    let mut distinct = Vec::new();
    let of_row = prompts
        .iter()
        .map(|p| {
            *seen.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(p.clone());
                distinct.len() as i64 - 1
            })
        })
        .collect();
    (distinct, of_row)
}

/// Samples up to `max_new` tokens for each prompt. With a router, each token's
/// next input is hard or soft as the router samples; without one, all hard.
/// Other methods' latent modes (`opts.latent`) go through here too, except
/// HRPO, which needs its gate (`rollout_with`).
pub fn rollout(
    net: &Llama,
    router: Option<&Router>,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<i64>],
    opts: &RolloutOptions,
) -> Result<Rollout> {
    rollout_with(net, router, None, tok, prompts, opts)
}

/// Checks the options and the prompts; returns the prompts left-truncated to
/// `max_prompt`.
fn checked_prompts(
    net: &Llama,
    prompts: &[Vec<i64>],
    opts: &RolloutOptions,
) -> Result<Vec<Vec<i64>>> {
    opts.sampling.validate()?;
    let vocab = net.cfg.vocab_size;
    if opts.max_new == 0 {
        bail!("max_new must be >= 1 (new tokens per completion)");
    }
    if opts.mix_k < 1 || opts.mix_k > vocab {
        bail!("mix_k must be in 1..={vocab}, got {}", opts.mix_k);
    }
    if opts.max_prompt == Some(0) {
        bail!("max_prompt must be >= 1 token");
    }
    for (i, p) in prompts.iter().enumerate() {
        if let Some(t) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            bail!("prompt {i}: token id {t} is outside the vocabulary (0..{vocab})");
        }
    }
    let keep = opts.max_prompt.unwrap_or(usize::MAX);
    Ok(prompts
        .iter()
        .map(|p| p[p.len().saturating_sub(keep)..].to_vec())
        .collect())
}

/// `rollout` with the HRPO gate, which `Latent::Hrpo` needs (and the other
/// modes refuse).
pub fn rollout_with(
    net: &Llama,
    router: Option<&Router>,
    gate: Option<&HrpoGate>,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<i64>],
    opts: &RolloutOptions,
) -> Result<Rollout> {
    rollout_observed(net, router, gate, tok, prompts, opts, &mut |_| Ok(()))
}

/// Sees every row's records after each generated step (live output).
pub type Observer<'a> = &'a mut dyn FnMut(&[Vec<TokenRecord>]) -> Result<()>;

/// `rollout_with`, calling `on_step` after every token step.
pub fn rollout_observed(
    net: &Llama,
    router: Option<&Router>,
    gate: Option<&HrpoGate>,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<i64>],
    opts: &RolloutOptions,
    on_step: Observer,
) -> Result<Rollout> {
    let prompts = checked_prompts(net, prompts, opts)?;
    let _no_grad = tch::no_grad_guard();
    let b = prompts.len();
    let mut rules = Rules::new(opts.latent, router, gate, opts.sampling, net, b)?;
    let mut marker = match (&opts.answer_marker, tok) {
        (Some(m), Some(tok)) if !m.is_empty() => Some(MarkerWatch {
            tok,
            marker: m.clone(),
            tails: vec![String::new(); b],
            seen: vec![false; b],
        }),
        (Some(m), None) if !m.is_empty() => bail!("answer_marker {m:?} needs the tokenizer"),
        _ => None,
    };
    let device = net.embed_tokens.device();
    let mut rng = Rng::new(opts.seed);
    let thoughts = opts.latent.thoughts();
    let steps = thoughts + opts.max_new;
    let (mut h, mut cache) = prefill(net, &prompts, steps as i64)?; // (B, H)

    // Decode steps are small: their matmuls run on our own threads
    // (model::small_matmul), and libtorch's OpenMP workers, left spinning
    // between ops, would only compete with them for the cores.
    // Past MAX_ROWS rows a step's matmuls are real GEMMs for libtorch, which
    // then needs its threads (MKL beats the streaming kernel there).
    let _threads = (device == Device::Cpu && b as i64 <= crate::model::small_matmul::MAX_ROWS)
        .then(|| IntraOpThreads::set(1));
    let mut records: Vec<Vec<TokenRecord>> = vec![Vec::new(); b];
    let mut inputs = Vec::new();
    let mut done = vec![false; b];
    let one_new = Tensor::f_ones([b as i64, 1], (Kind::Bool, device))?;
    let bar = crate::ctl::Progress::new("rollout", steps as u64);
    for t in 0..steps {
        if opts.stop_on_interrupt && crate::ctl::is_interrupted() {
            break;
        }
        crate::ctl::check()?;
        crate::faults::point("rollout.step");
        bar.set(t as u64);
        let x = if t < thoughts {
            // Coconut: a continuous thought; h_t is the next input itself.
            thought_records(&h, &mut records)?;
            h.shallow_clone()
        } else {
            let last = t + 1 == steps;
            let ctx = Decode {
                net,
                router,
                opts,
                last,
            };
            let x = ctx.token_step(
                &h,
                &mut rules,
                &mut rng,
                &mut marker,
                &mut records,
                &mut done,
            )?;
            on_step(&records)?;
            if last || done.iter().all(|&d| d) {
                break;
            }
            x
        };
        if opts.keep_inputs {
            inputs.push(x.shallow_clone());
        }
        // Finished rows keep decoding (the batch shape stays fixed) but are ignored.
        let step = cache.step(&one_new)?;
        h = net
            .forward(&x.f_unsqueeze(1)?, &step, Some(&cache))?
            .f_squeeze_dim(1)?;
    }
    Ok(Rollout {
        prompts,
        records,
        inputs,
        // Log-probs and mixtures use softmax(z / T); greedy decoding scores at T = 1.
        temperature: opts.sampling.scale(),
        mix_k: opts.mix_k,
    })
}

/// One LATENT record per row: the hidden state is the next input.
fn thought_records(h: &Tensor, records: &mut [Vec<TokenRecord>]) -> Result<()> {
    let rows = Vec::<Vec<f32>>::try_from(&to_host(&h.f_to_kind(Kind::Float)?)?)?;
    for (recs, v) in records.iter_mut().zip(rows) {
        recs.push(TokenRecord {
            token: -1,
            mode: LATENT,
            forced: true,
            logp: 0.0,
            router_logp: 0.0,
            p_soft: 0.0,
            entropy: 0.0,
            topk_entropy: 0.0,
            mix_ids: Vec::new(),
            mix_weights: Vec::new(),
            latent: LatentRecord::Input(v),
        });
    }
    Ok(())
}

/// What a token step needs besides its state.
struct Decode<'a> {
    net: &'a Llama,
    router: Option<&'a Router>,
    opts: &'a RolloutOptions,
    /// The last step of the rollout (every row's token is its last).
    last: bool,
}

impl Decode<'_> {
    /// Samples every row's token from h (B, H), records it with its mode, and
    /// returns the (B, H) next inputs.
    #[allow(clippy::too_many_arguments)]
    fn token_step(
        &self,
        h: &Tensor,
        rules: &mut Rules,
        rng: &mut Rng,
        marker: &mut Option<MarkerWatch>,
        records: &mut [Vec<TokenRecord>],
        done: &mut [bool],
    ) -> Result<Tensor> {
        let (net, opts) = (self.net, self.opts);
        let b = records.len();
        let logits = net.logits(h)?.f_to_kind(Kind::Float)?; // (B, V)
        let st = token_stats(&logits, &opts.sampling, opts.mix_k, rng)?;
        let (next, mix_ids, mix_w) = (&st.next, &st.mix_ids, &st.mix_w);
        let router_lp = match self.router {
            Some(r) => Some(r.log_probs(h)?), // (B, 2)
            None => None,
        };
        // Mode uniforms are drawn for every row whatever happens, so the random
        // stream does not depend on which rows are forced (nor on the mode).
        let u_mode: Vec<f64> = (0..b).map(|_| rng.next_f64()).collect();

        let host = StepHost::fetch(
            next,
            &[&st.logp, &st.entropy, &st.mix_entropy],
            router_lp.as_ref().map(|lp| (lp, mix_ids, mix_w)),
        )?;
        let (next_ids, stats, soft_lp, mix_host) = (host.ids, host.stats, host.soft_lp, host.mix);
        let mut modes = vec![HARD; b];
        for i in 0..b {
            if done[i] {
                continue;
            }
            let tok_i = next_ids[i];
            let ends = opts.eos.contains(&tok_i) || self.last;
            let after_marker = match marker.as_mut() {
                Some(m) => m.push(i, tok_i)?,
                None => false,
            };
            let p_soft = soft_lp[i][1].exp();
            let chosen = rules.mode(i, ends || after_marker, u_mode[i], p_soft, stats[i][1]);
            // A counterfactual sets a free decision (a forced one stays).
            let (mode, forced) = match (chosen, opts.overrides.get(i)) {
                ((_, false), Some(&Some((at, m)))) if at == records[i].len() => (m, true),
                _ => chosen,
            };
            modes[i] = mode;
            let (ids_i, w_i) = match &mix_host {
                Some((ids, w)) if mode == SOFT => (ids[i].clone(), w[i].clone()),
                _ => (Vec::new(), Vec::new()),
            };
            records[i].push(TokenRecord {
                token: tok_i,
                mode,
                forced,
                logp: stats[i][0],
                router_logp: if self.router.is_some() {
                    soft_lp[i][mode as usize]
                } else {
                    0.0
                },
                p_soft: if self.router.is_some() { p_soft } else { 0.0 },
                entropy: stats[i][1],
                topk_entropy: stats[i][2],
                mix_ids: ids_i,
                mix_weights: w_i,
                latent: LatentRecord::None,
            });
            done[i] = opts.eos.contains(&tok_i);
        }
        let x_hard = net.embed(next)?; // (B, H)
        if self.last || !modes.contains(&SOFT) {
            return Ok(x_hard);
        }
        let view = StepView {
            logits: &logits,
            mix_ids,
            mix_w,
            x_hard: &x_hard,
        };
        let (soft, recorded) = rules.soft_input(net, &view)?;
        if let Some(rec) = recorded {
            let rows = Vec::<Vec<f32>>::try_from(&to_host(&rec.f_to_kind(Kind::Float)?)?)?;
            let hrpo = opts.latent == Latent::Hrpo;
            for (i, v) in rows.into_iter().enumerate() {
                if let (SOFT, Some(r)) = (modes[i], records[i].last_mut()) {
                    r.latent = if hrpo {
                        LatentRecord::Hrpo(v)
                    } else {
                        LatentRecord::Input(v)
                    };
                }
            }
        }
        let is_soft = Tensor::from_slice(&modes)
            .f_to_device(h.device())?
            .f_eq(SOFT)?
            .f_unsqueeze(-1)?;
        Ok(soft.f_where_self(&is_soft, &x_hard)?)
    }
}
