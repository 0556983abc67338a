//! The rollout engine: batched, KV-cached sampling of a group of completions
//! where every generated token's next input is chosen per token.
//!
//! At step t of each sequence: the backbone gives h_t and p_t = softmax(z_t / T);
//! the token y_t ~ p_t is always sampled (it is the text, the reward and the
//! loss); the router samples the mode m_t ~ pi_r(. | h_t), forced hard once the
//! answer marker is complete or the sequence ends; the next input is E[y_t]
//! (hard) or the renormalised top-k mixture of p_t (soft). Every token's record
//! is kept for replay, losses and analysis. Without a router this is plain
//! generation.
//!
//! `RolloutOptions::latent` swaps TARPO's router for another latent-reasoning
//! method's rule (`Latent`): Soft Thinking, Coconut, HRPO. The engine's other
//! rules stay: a token is always sampled and recorded, the random stream is the
//! same whatever the mode (one sampling draw and one mode uniform per row and
//! step), a sequence's last token and every token once the answer marker is
//! complete are hard.
use super::hrpo::HrpoGate;
use super::mix;
use super::router::{Router, HARD, SOFT};
use super::sampler::{sample, Rng, Sampling};
use crate::model::llama::linear;
use crate::model::{KvCache, Llama, Tokenizer};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub max_new: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Generation stops for a sequence after one of these tokens.
    pub eos: Vec<i64>,
    /// Size of the soft mixture (top-k of p_t, renormalised).
    pub mix_k: i64,
    /// Once this text is complete in a completion, its later steps are hard.
    pub answer_marker: Option<String>,
    /// Keep every step's next-input embeddings (tests and analysis).
    pub keep_inputs: bool,
    /// Which method chooses the next inputs (default: TARPO's router).
    pub latent: Latent,
}

/// How each step's next input is chosen. In every mode a token y_t is sampled
/// from p_t (the text), a sequence's last token is hard, and so is every token
/// once the answer marker is complete (when `answer_marker` is set). A latent
/// step is recorded as SOFT with `forced = true` (no router decision),
/// `p_soft = 0`, `router_logp = 0`, and its vector in `TokenRecord::latent`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Latent {
    /// TARPO: the router samples hard or soft per token; soft inputs are the
    /// renormalised top-`mix_k` mixture of p_t. Without a router, all hard.
    #[default]
    Router,
    /// Soft Thinking: every step's input is the full-vocabulary expectation
    /// p_t^T E, p_t = softmax(z_t / T). Cold stop `(threshold, patience)`:
    /// once the token entropy (`TokenRecord::entropy`, nats) has been below
    /// `threshold` at `patience` consecutive steps, that step and the rest of
    /// the sequence are hard (patience 2: low, low -> the second one is the
    /// first hard step).
    SoftThinking { cold_stop: Option<(f32, usize)> },
    /// Coconut: the first `latent_steps` generated steps of each sequence are
    /// latent (their next input is the final-normed hidden state h_t that
    /// predicted the token), then text. End the prompt with Coconut's begin
    /// marker if the model was trained with one; the tokens sampled during the
    /// latent span are recorded (and scored) but are not what the model read.
    Coconut { latent_steps: usize },
    /// HRPO: before the answer marker the next input is the gate's blend of
    /// E[y_t] and h_hat = p_t^T E / ||p_t||_2 (`hrpo::HrpoGate`), p_t the
    /// sampling distribution (temperature, top-k, and top-p when < 1; softmax(z)
    /// when greedy); after it, plain E[y_t]. Needs the gate (`rollout_with`).
    Hrpo,
}

impl Latent {
    fn name(&self) -> &'static str {
        match self {
            Latent::Router => "Router",
            Latent::SoftThinking { .. } => "SoftThinking",
            Latent::Coconut { .. } => "Coconut",
            Latent::Hrpo => "Hrpo",
        }
    }
}

/// The vector a latent step recorded (H floats), so replay rebuilds its input.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum LatentRecord {
    /// Not a latent step (hard, or a router mixture rebuilt from `mix_ids`).
    #[default]
    None,
    /// The next input itself (Soft Thinking's p_t^T E, Coconut's h_t), in the
    /// model dtype's values. Replay feeds it back as a constant: no gradient
    /// flows through it into earlier positions (as in the GRPO-style training
    /// of these methods, where the rollout's latent inputs are data).
    Input(Vec<f32>),
    /// HRPO's h_hat (fp32, a constant); replay recomputes the input
    /// gate(E[y_t], h_hat) with autograd, so the gate trains.
    Hrpo(Vec<f32>),
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
            keep_inputs: false,
            latent: Latent::Router,
        }
    }
}

/// What happened at one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub token: i64,
    /// HARD or SOFT: how this token is fed back as the next input.
    pub mode: i64,
    /// Not a router decision (after the answer marker, or the last token).
    pub forced: bool,
    /// log p_t(y_t) under softmax(z_t / T) (before top-k/top-p truncation).
    pub logp: f32,
    /// log pi_r(m_t | h_t); 0 without a router.
    pub router_logp: f32,
    pub p_soft: f32,
    /// Entropy of p_t.
    pub entropy: f32,
    /// Entropy of the top-k mixture weights.
    pub topk_entropy: f32,
    /// The router mixture (ids and renormalised weights); empty for hard
    /// tokens and for the latent steps of the other methods.
    pub mix_ids: Vec<i64>,
    pub mix_weights: Vec<f32>,
    /// A latent step's vector (Soft Thinking, Coconut, HRPO); None otherwise.
    pub latent: LatentRecord,
}

pub struct Rollout {
    pub prompts: Vec<Vec<i64>>,
    /// Per sequence, one record per generated token.
    pub records: Vec<Vec<TokenRecord>>,
    /// With `keep_inputs`: per step, the (B, H) next-input embeddings.
    pub inputs: Vec<Tensor>,
    pub temperature: f64,
    pub mix_k: i64,
}

impl Rollout {
    /// The given rows, in that order (kept inputs are dropped).
    pub fn select(&self, rows: &[usize]) -> Rollout {
        Rollout {
            prompts: rows.iter().map(|&i| self.prompts[i].clone()).collect(),
            records: rows.iter().map(|&i| self.records[i].clone()).collect(),
            inputs: Vec::new(),
            temperature: self.temperature,
            mix_k: self.mix_k,
        }
    }

    /// This rollout followed by `other` (same temperature and mixture size).
    pub fn concat(mut self, other: Rollout) -> Result<Rollout> {
        if self.mix_k != other.mix_k || self.temperature != other.temperature {
            bail!("cannot join rollouts made with different settings");
        }
        self.prompts.extend(other.prompts);
        self.records.extend(other.records);
        self.inputs.clear();
        Ok(self)
    }

    /// Fraction of generated tokens fed back soft (0 with no tokens).
    pub fn soft_ratio(&self) -> f64 {
        let recs = || self.records.iter().flatten();
        let soft = recs().filter(|r| r.mode == SOFT).count() as f64;
        soft / recs().count().max(1) as f64
    }

    pub fn tokens(&self) -> Vec<Vec<i64>> {
        self.records
            .iter()
            .map(|r| r.iter().map(|t| t.token).collect())
            .collect()
    }
}

/// Left-pads `prompts` into (B, L) ids and a (B, L) validity mask.
pub fn left_pad(prompts: &[Vec<i64>], device: Device) -> Result<(Tensor, Tensor)> {
    if prompts.is_empty() {
        bail!("no prompts given");
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty");
    }
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * l);
    let mut valid = Vec::with_capacity(prompts.len() * l);
    for p in prompts {
        let pad = l - p.len();
        ids.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().copied()));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let shape = [prompts.len() as i64, l as i64];
    Ok((
        Tensor::from_slice(&ids)
            .f_view(shape)?
            .f_to_device(device)?,
        Tensor::from_slice(&valid)
            .f_view(shape)?
            .f_to_device(device)?,
    ))
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
    let device = net.embed_tokens.device();
    let (distinct, of_row) = distinct_rows(prompts);
    let (ids, valid) = left_pad(&distinct, device)?;
    let l = ids.size()[1];
    let mut cache = net.new_cache(distinct.len() as i64, l + extra)?;
    let step = cache.step(&valid)?;
    let h = net.forward(&net.embed(&ids)?, &step, Some(&cache))?;
    let h = h.f_narrow(1, l - 1, 1)?.f_squeeze_dim(1)?;
    if distinct.len() == prompts.len() {
        return Ok((h, cache));
    }
    let rows = Tensor::from_slice(&of_row).f_to_device(device)?;
    Ok((h.f_index_select(0, &rows)?, cache.select_rows(&rows)?))
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

/// Checks that `opts.latent` gets what it needs and nothing it would ignore.
fn check_latent(
    opts: &RolloutOptions,
    router: Option<&Router>,
    gate: Option<&HrpoGate>,
    hidden: i64,
) -> Result<()> {
    let latent = opts.latent;
    if router.is_some() && latent != Latent::Router {
        bail!(
            "Latent::{} chooses its own modes: pass no router (routers are for Latent::Router)",
            latent.name()
        );
    }
    match (latent, gate) {
        (Latent::Hrpo, None) => {
            bail!("Latent::Hrpo needs the HRPO gate: call rollout_with(.., Some(&gate), ..)")
        }
        (Latent::Hrpo, Some(g)) if g.hidden() != hidden => bail!(
            "HRPO gate of hidden size {} for a model of hidden size {hidden}",
            g.hidden()
        ),
        (Latent::Hrpo, Some(_)) => {}
        (_, Some(_)) => bail!(
            "an HRPO gate was given but the latent mode is Latent::{}",
            latent.name()
        ),
        (_, None) => {}
    }
    if let Latent::SoftThinking {
        cold_stop: Some((threshold, patience)),
    } = latent
    {
        if threshold.is_nan() {
            bail!("Soft Thinking cold stop: the entropy threshold is NaN");
        }
        if patience == 0 {
            bail!("Soft Thinking cold stop: patience must be >= 1 step");
        }
    }
    Ok(())
}

/// x (B, V) @ E (V, H) given E^T (H, V) contiguous: (B, H) in E's dtype. Few
/// rows on the CPU take the same streaming kernel as the LM head.
fn expect_embedding(p: &Tensor, e_t: &Tensor) -> Result<Tensor> {
    linear(&p.f_to_kind(e_t.kind())?, e_t, None)
}

/// HRPO's h_hat = p^T E / ||p||_2 (B, H) fp32, p the sampling distribution of
/// `logits` (B, V): softmax(z / T) cut to the top-k and top-p as `sample` cuts
/// it (both off when greedy: then p = softmax(z)). h_hat does not change when
/// p is rescaled, so the cut distribution needs no renormalising.
fn hrpo_state(
    logits: &Tensor,
    s: &Sampling,
    temp: f64,
    e: &Tensor,
    e_t: Option<&Tensor>,
) -> Result<Tensor> {
    let v = logits.size()[1];
    let greedy = s.temperature == 0.0;
    let top_k = if !greedy && s.top_k > 0 && s.top_k < v {
        s.top_k
    } else {
        0
    };
    let top_p = if greedy { 1.0 } else { s.top_p };
    let scaled = logits.f_to_kind(Kind::Float)?.f_div_scalar(temp)?;
    let cut = |probs: Tensor| -> Result<Tensor> {
        if top_p < 1.0 {
            let before = probs.f_cumsum(-1, Kind::Float)?.f_sub(&probs)?;
            Ok(probs.f_mul(&before.f_lt(top_p)?.f_to_kind(Kind::Float)?)?)
        } else {
            Ok(probs)
        }
    };
    let (num, p) = if top_k > 0 {
        let (vals, ids) = scaled.f_topk(top_k, -1, true, true)?;
        let p = cut(vals.f_softmax(-1, Kind::Float)?)?;
        let rows = Tensor::f_embedding(e, &ids, -1, false, false)?.f_to_kind(Kind::Float)?;
        let num = rows
            .f_mul(&p.f_unsqueeze(-1)?)?
            .f_sum_dim_intlist(-2, false, Kind::Float)?;
        (num, p)
    } else {
        let Some(e_t) = e_t else {
            bail!("internal: HRPO's full-vocabulary state needs E^T");
        };
        let p = if top_p < 1.0 {
            let (vals, idx) = scaled.f_sort(-1, true)?;
            let p = cut(vals.f_softmax(-1, Kind::Float)?)?;
            scaled.f_zeros_like()?.f_scatter(-1, &idx, &p)?
        } else {
            scaled.f_softmax(-1, Kind::Float)?
        };
        (expect_embedding(&p, e_t)?.f_to_kind(Kind::Float)?, p)
    };
    let norm = p.f_norm_scalaropt_dim(2, [-1].as_slice(), true)?;
    Ok(num.f_div(&norm)?)
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
    opts.sampling.validate()?;
    let _no_grad = tch::no_grad_guard();
    let vocab = net.cfg.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(t) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            bail!("prompt {i}: token id {t} is outside the vocabulary (0..{vocab})");
        }
    }
    if opts.mix_k < 1 || opts.mix_k > vocab {
        bail!("mix_k must be in 1..={vocab}, got {}", opts.mix_k);
    }
    check_latent(opts, router, gate, net.cfg.hidden_size)?;
    let mut marker = match (&opts.answer_marker, tok) {
        (Some(m), Some(tok)) if !m.is_empty() => Some(MarkerWatch {
            tok,
            marker: m.clone(),
            tails: vec![String::new(); prompts.len()],
            seen: vec![false; prompts.len()],
        }),
        (Some(m), None) if !m.is_empty() => bail!("answer_marker {m:?} needs the tokenizer"),
        _ => None,
    };
    let device = net.embed_tokens.device();
    let b = prompts.len() as i64;
    let mut rng = Rng::new(opts.seed);
    // Log-probs and mixtures use softmax(z / T); greedy decoding scores at T = 1.
    let temp = if opts.sampling.temperature > 0.0 {
        opts.sampling.temperature
    } else {
        1.0
    };
    // Full-vocabulary expectations p^T E (Soft Thinking; HRPO without top-k)
    // read E^T, made contiguous once per rollout.
    let needs_e_t = match opts.latent {
        Latent::SoftThinking { .. } => true,
        Latent::Hrpo => {
            let s = &opts.sampling;
            s.temperature == 0.0 || s.top_k == 0 || s.top_k >= vocab
        }
        _ => false,
    };
    let e_t = if needs_e_t {
        Some(net.embed_tokens.f_transpose(0, 1)?.f_contiguous()?)
    } else {
        None
    };

    let (mut h, mut cache) = prefill(net, prompts, opts.max_new as i64)?; // (B, H)

    // Decode steps are small: their matmuls run on our own threads
    // (model::small_matmul), and libtorch's OpenMP workers, left spinning
    // between ops, would only compete with them for the cores.
    // Past MAX_ROWS rows a step's matmuls are real GEMMs for libtorch, which
    // then needs its threads (MKL beats the streaming kernel there).
    let _threads = (device == Device::Cpu && b <= crate::model::small_matmul::MAX_ROWS)
        .then(|| IntraOpThreads::set(1));
    let mut records: Vec<Vec<TokenRecord>> = vec![Vec::new(); b as usize];
    let mut inputs = Vec::new();
    let mut done = vec![false; b as usize];
    // Soft Thinking's cold stop: consecutive low-entropy steps, and stopped rows.
    let mut low_run = vec![0usize; b as usize];
    let mut cold = vec![false; b as usize];
    let one_new = Tensor::f_ones([b, 1], (Kind::Bool, device))?;
    let bar = crate::ctl::Progress::new("rollout", opts.max_new as u64);
    for t in 0..opts.max_new {
        crate::ctl::check()?;
        bar.set(t as u64);
        let logits = net.logits(&h)?.f_to_kind(Kind::Float)?; // (B, V)
        let next = sample(&logits, &opts.sampling, &mut rng)?;
        let logp_all = logits.f_div_scalar(temp)?.f_log_softmax(-1, Kind::Float)?;
        let probs = logp_all.f_exp()?;
        let logp = logp_all
            .f_gather(-1, &next.f_unsqueeze(-1)?, false)?
            .f_squeeze_dim(-1)?;
        let entropy = probs
            .f_mul(&logp_all)?
            .f_sum_dim_intlist(-1, false, Kind::Float)?
            .f_neg()?;
        let (mix_ids, mix_w) = mix::top_k(&probs, opts.mix_k)?;
        let mix_entropy = mix::entropy(&mix_w)?;
        let router_lp = match router {
            Some(r) => Some(r.log_probs(&h)?), // (B, 2)
            None => None,
        };
        // Mode uniforms are drawn for every row whatever happens, so the random
        // stream does not depend on which rows are forced (nor on the mode).
        let u_mode: Vec<f64> = (0..b).map(|_| rng.next_f64()).collect();

        let next_ids = Vec::<i64>::try_from(&next)?;
        let stats =
            Tensor::f_stack(&[&logp, &entropy, &mix_entropy], 1)?.f_to_device(Device::Cpu)?;
        let stats = Vec::<Vec<f32>>::try_from(&stats)?;
        let soft_lp = match &router_lp {
            Some(lp) => Vec::<Vec<f32>>::try_from(&lp.f_to_device(Device::Cpu)?)?,
            None => vec![vec![0.0, f32::NEG_INFINITY]; b as usize],
        };
        // The mixtures come to the host once per step, and only when a router may pick them.
        let mix_host = match router {
            Some(_) if opts.latent == Latent::Router => Some((
                Vec::<Vec<i64>>::try_from(&mix_ids.f_to_device(Device::Cpu)?)?,
                Vec::<Vec<f32>>::try_from(&mix_w.f_to_device(Device::Cpu)?)?,
            )),
            _ => None,
        };
        let mut modes = vec![HARD; b as usize];
        let mut any_soft = false;
        for i in 0..b as usize {
            if done[i] {
                continue;
            }
            let tok_i = next_ids[i];
            let ends = opts.eos.contains(&tok_i) || t + 1 == opts.max_new;
            let after_marker = match marker.as_mut() {
                Some(m) => m.push(i, tok_i)?,
                None => false,
            };
            let p_soft = soft_lp[i][1].exp();
            let hard = ends || after_marker;
            let (mode, forced) = match opts.latent {
                Latent::Router => {
                    let forced = router.is_none() || hard;
                    let soft = !forced && u_mode[i] < p_soft as f64;
                    (if soft { SOFT } else { HARD }, forced)
                }
                Latent::SoftThinking { cold_stop } => {
                    if let Some((threshold, patience)) = cold_stop {
                        if stats[i][1] < threshold {
                            low_run[i] += 1;
                        } else {
                            low_run[i] = 0;
                        }
                        cold[i] |= low_run[i] >= patience;
                    }
                    (if hard || cold[i] { HARD } else { SOFT }, true)
                }
                Latent::Coconut { latent_steps } => (
                    if hard || t >= latent_steps {
                        HARD
                    } else {
                        SOFT
                    },
                    true,
                ),
                Latent::Hrpo => (if hard { HARD } else { SOFT }, true),
            };
            modes[i] = mode;
            any_soft |= mode == SOFT;
            let (ids_i, w_i) = match &mix_host {
                Some((ids, w)) if mode == SOFT => (ids[i].clone(), w[i].clone()),
                _ => (Vec::new(), Vec::new()),
            };
            records[i].push(TokenRecord {
                token: tok_i,
                mode,
                forced,
                logp: stats[i][0],
                router_logp: if router.is_some() {
                    soft_lp[i][mode as usize]
                } else {
                    0.0
                },
                p_soft: if router.is_some() { p_soft } else { 0.0 },
                entropy: stats[i][1],
                topk_entropy: stats[i][2],
                mix_ids: ids_i,
                mix_weights: w_i,
                latent: LatentRecord::None,
            });
            done[i] = opts.eos.contains(&tok_i);
        }
        if t + 1 == opts.max_new || done.iter().all(|&d| d) {
            break;
        }
        let mut x = net.embed(&next)?; // (B, H)
        if any_soft {
            // The soft rows' input, and for the latent modes the vector recorded.
            let (soft, recorded) = match opts.latent {
                Latent::Router => (mix::embed(&net.embed_tokens, &mix_ids, &mix_w)?, None),
                Latent::SoftThinking { .. } => {
                    let Some(e_t) = e_t.as_ref() else {
                        bail!("internal: Soft Thinking without E^T");
                    };
                    let s = expect_embedding(&probs, e_t)?;
                    (s.shallow_clone(), Some(s))
                }
                Latent::Coconut { .. } => (h.shallow_clone(), Some(h.shallow_clone())),
                Latent::Hrpo => {
                    let Some(g) = gate else {
                        bail!("internal: HRPO without its gate");
                    };
                    let state = hrpo_state(
                        &logits,
                        &opts.sampling,
                        temp,
                        &net.embed_tokens,
                        e_t.as_ref(),
                    )?;
                    let blend = g.forward(&x, &state)?.f_to_kind(x.kind())?;
                    (blend, Some(state))
                }
            };
            let is_soft = Tensor::from_slice(&modes)
                .f_to_device(device)?
                .f_eq(SOFT)?
                .f_unsqueeze(-1)?;
            x = soft.f_where_self(&is_soft, &x)?;
            if let Some(rec) = recorded {
                let rows = Vec::<Vec<f32>>::try_from(
                    &rec.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?,
                )?;
                for (i, v) in rows.into_iter().enumerate() {
                    if modes[i] != SOFT {
                        continue;
                    }
                    if let Some(r) = records[i].last_mut() {
                        r.latent = if opts.latent == Latent::Hrpo {
                            LatentRecord::Hrpo(v)
                        } else {
                            LatentRecord::Input(v)
                        };
                    }
                }
            }
        }
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
        prompts: prompts.to_vec(),
        records,
        inputs,
        temperature: temp,
        mix_k: opts.mix_k,
    })
}
