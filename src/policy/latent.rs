//! How each step's next input is chosen (ALGORITHMS.md section 2 step 4,
//! section 3): TARPO's router and the latent modes of the other methods, one
//! rule per `Latent` variant, each in its own function: which mode a row
//! takes at a step, and what a non-hard row is fed next.
//!
//! Rules every mode shares (enforced by the engine, `rollout`): a token is
//! sampled at every step but Coconut's thoughts, a sequence's last token is
//! hard, and so is every token once the answer marker is complete.
use super::hrpo::HrpoGate;
use super::mix;
use super::records::{HARD, SOFT};
use super::router::Router;
use super::sampler::Sampling;
use crate::model::llama::linear;
use crate::model::Llama;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Which method chooses the next inputs. A non-router mode's steps are
/// recorded with `forced = true` (no router decision), `p_soft = 0` and
/// `router_logp = 0`; its latent vectors go to `TokenRecord::latent`.
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
    /// Coconut: the first `latent_steps` steps of each sequence are continuous
    /// thoughts (mode LATENT): no token is sampled, scored or put into the
    /// text; the next input is the final-normed hidden state h_t itself. Then
    /// up to `max_new` tokens of text. End the prompt with Coconut's begin
    /// marker if the model was trained with one.
    Coconut { latent_steps: usize },
    /// HRPO: before the answer marker the next input is the gate's blend of
    /// E[y_t] and h_hat = p_t^T E / ||p_t||_2 (`hrpo::HrpoGate`), p_t the
    /// sampling distribution (temperature, top-k, and top-p when < 1; softmax(z)
    /// when greedy); after it, plain E[y_t]. Needs the gate (`rollout_with`).
    Hrpo,
}

impl Latent {
    pub fn name(&self) -> &'static str {
        match self {
            Latent::Router => "Router",
            Latent::SoftThinking { .. } => "SoftThinking",
            Latent::Coconut { .. } => "Coconut",
            Latent::Hrpo => "Hrpo",
        }
    }

    /// Coconut's thoughts before the text (0 for the other modes).
    pub fn thoughts(&self) -> usize {
        match self {
            Latent::Coconut { latent_steps } => *latent_steps,
            _ => 0,
        }
    }

    /// Checks that the mode gets what it needs and nothing it would ignore.
    pub(super) fn check(
        &self,
        router: Option<&Router>,
        gate: Option<&HrpoGate>,
        hidden: i64,
    ) -> Result<()> {
        if router.is_some() && *self != Latent::Router {
            bail!(
                "Latent::{} chooses its own modes: pass no router (routers are for Latent::Router)",
                self.name()
            );
        }
        match (self, gate) {
            (Latent::Hrpo, None) => {
                bail!("Latent::Hrpo needs the HRPO gate: call rollout_with(.., Some(&gate), ..)")
            }
            (Latent::Hrpo, Some(g)) if g.hidden() != hidden => bail!(
                "HRPO gate of hidden size {} for a model of hidden size {hidden}",
                g.hidden()
            ),
            (Latent::Hrpo, Some(_)) | (_, None) => {}
            (_, Some(_)) => bail!(
                "an HRPO gate was given but the latent mode is Latent::{}",
                self.name()
            ),
        }
        if let Latent::SoftThinking {
            cold_stop: Some((threshold, patience)),
        } = self
        {
            if threshold.is_nan() {
                bail!("Soft Thinking cold stop: the entropy threshold is NaN");
            }
            if *patience == 0 {
                bail!("Soft Thinking cold stop: patience must be >= 1 step");
            }
        }
        Ok(())
    }
}

/// What one decode step gives the rules.
pub(super) struct StepView<'a> {
    /// (B, V) fp32 logits.
    pub logits: &'a Tensor,
    /// (B, k) the renormalised top-k mixture of softmax(z / T).
    pub mix_ids: &'a Tensor,
    pub mix_w: &'a Tensor,
    /// (B, H) E[y_t], the hard input.
    pub x_hard: &'a Tensor,
}

/// The rules of one rollout, with the per-row state they keep.
pub(super) struct Rules<'a> {
    latent: Latent,
    router: Option<&'a Router>,
    gate: Option<&'a HrpoGate>,
    sampling: Sampling,
    /// E^T (H, V) contiguous, for full-vocabulary expectations p^T E.
    e_t: Option<Tensor>,
    /// Soft Thinking's cold stop: consecutive low-entropy steps, and stopped rows.
    low_run: Vec<usize>,
    cold: Vec<bool>,
}

impl<'a> Rules<'a> {
    pub fn new(
        latent: Latent,
        router: Option<&'a Router>,
        gate: Option<&'a HrpoGate>,
        sampling: Sampling,
        net: &Llama,
        rows: usize,
    ) -> Result<Self> {
        latent.check(router, gate, net.cfg.hidden_size)?;
        let needs_e_t = match latent {
            Latent::SoftThinking { .. } => true,
            Latent::Hrpo => sampling.top_k_cut(net.cfg.vocab_size) == 0,
            _ => false,
        };
        let e_t = if needs_e_t {
            Some(net.embed_tokens.f_transpose(0, 1)?.f_contiguous()?)
        } else {
            None
        };
        Ok(Rules {
            latent,
            router,
            gate,
            sampling,
            e_t,
            low_run: vec![0; rows],
            cold: vec![false; rows],
        })
    }

    /// Row `i`'s mode and whether it was forced (not a router decision).
    /// `hard`: the sequence ends here or its answer marker is complete;
    /// `u`: the row's mode uniform; `p_soft`: the router's soft probability;
    /// `entropy`: of p_t.
    pub fn mode(&mut self, i: usize, hard: bool, u: f64, p_soft: f32, entropy: f32) -> (i64, bool) {
        match self.latent {
            Latent::Router => router_mode(self.router.is_some(), hard, u, p_soft),
            Latent::SoftThinking { cold_stop } => {
                if let Some((threshold, patience)) = cold_stop {
                    self.low_run[i] = if entropy < threshold {
                        self.low_run[i] + 1
                    } else {
                        0
                    };
                    self.cold[i] |= self.low_run[i] >= patience;
                }
                (if hard || self.cold[i] { HARD } else { SOFT }, true)
            }
            // After its thoughts Coconut writes plain text.
            Latent::Coconut { .. } => (HARD, true),
            Latent::Hrpo => (if hard { HARD } else { SOFT }, true),
        }
    }

    /// The next input of every row as if it were SOFT (B, H) in the model
    /// dtype, and for the latent modes the vector each SOFT row records.
    pub fn soft_input(&self, net: &Llama, s: &StepView) -> Result<(Tensor, Option<Tensor>)> {
        match self.latent {
            Latent::Router => Ok((mix::embed(&net.embed_tokens, s.mix_ids, s.mix_w)?, None)),
            Latent::SoftThinking { .. } => {
                // softmax(z / T), made only here.
                let probs = (s.logits.f_div_scalar(self.sampling.scale())?)
                    .f_log_softmax(-1, Kind::Float)?
                    .f_exp()?;
                let x = expect_embedding(&probs, self.e_t()?)?;
                Ok((x.shallow_clone(), Some(x)))
            }
            Latent::Coconut { .. } => bail!("internal: Coconut's text steps are hard"),
            Latent::Hrpo => {
                let Some(g) = self.gate else {
                    bail!("internal: HRPO without its gate");
                };
                let h_hat = self.hrpo_state(net, s.logits)?;
                let x = g.forward(s.x_hard, &h_hat)?.f_to_kind(s.x_hard.kind())?;
                Ok((x, Some(h_hat)))
            }
        }
    }

    fn e_t(&self) -> Result<&Tensor> {
        match &self.e_t {
            Some(e) => Ok(e),
            None => bail!("internal: a full-vocabulary expectation without E^T"),
        }
    }

    /// HRPO's h_hat = p^T E / ||p||_2 (B, H) fp32, p the sampling distribution
    /// (`Sampling::truncate`). h_hat does not change when p is rescaled, so the
    /// cut distribution needs no renormalising.
    fn hrpo_state(&self, net: &Llama, logits: &Tensor) -> Result<Tensor> {
        let cut = self.sampling.truncate(logits)?;
        let num = match &cut.ids {
            Some(ids) if self.sampling.top_k_cut(net.cfg.vocab_size) > 0 => {
                let rows = net.embed(ids)?.f_to_kind(Kind::Float)?; // (B, k, H)
                rows.f_mul(&cut.probs.f_unsqueeze(-1)?)?.f_sum_dim_intlist(
                    -2,
                    false,
                    Kind::Float,
                )?
            }
            _ => {
                let p = cut.in_vocab_order(net.cfg.vocab_size)?;
                expect_embedding(&p, self.e_t()?)?.f_to_kind(Kind::Float)?
            }
        };
        let norm = cut.probs.f_norm_scalaropt_dim(2, [-1].as_slice(), true)?;
        Ok(num.f_div(&norm)?)
    }
}

/// TARPO (section 2, step 3): the router samples the mode, m ~ pi_r(. | h_t),
/// except where the step is forced hard. Without a router every step is hard.
fn router_mode(has_router: bool, hard: bool, u: f64, p_soft: f32) -> (i64, bool) {
    let forced = !has_router || hard;
    let soft = !forced && u < p_soft as f64;
    (if soft { SOFT } else { HARD }, forced)
}

/// x (B, V) @ E (V, H) given E^T (H, V) contiguous: (B, H) in E's dtype. Few
/// rows on the CPU take the same streaming kernel as the LM head.
fn expect_embedding(p: &Tensor, e_t: &Tensor) -> Result<Tensor> {
    linear(&p.f_to_kind(e_t.kind())?, e_t, None)
}
