//! Ouro's exit gate (ALGORITHMS.md section 6): lambda_t = sigmoid(gate(h_t))
//! on each loop's normed state, the exit distribution
//! p_t = lambda_t * prod_{s<t} (1 - lambda_s) for t < T and the rest of the
//! mass at T, in fp32, and the loop inference reads: the first whose
//! cumulative probability reaches `early_exit_threshold`, else the last.
use super::llama::Linear;
use super::weights::Weights;
use anyhow::Result;
use tch::{Kind, Tensor};

pub struct ExitGate {
    /// Linear(H, 1) with bias: `model.early_exit_gate`.
    pub(crate) linear: Linear,
}

impl ExitGate {
    pub fn load(w: &Weights, hidden: i64) -> Result<Self> {
        Ok(ExitGate {
            linear: Linear::load(w, "model.early_exit_gate", hidden, 1, true)?,
        })
    }

    pub fn frozen(&self) -> Result<Self> {
        Ok(ExitGate {
            linear: self.linear.frozen()?,
        })
    }

    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![(
            "model.early_exit_gate.weight".to_string(),
            &self.linear.weight,
        )];
        if let Some(b) = &self.linear.bias {
            out.push(("model.early_exit_gate.bias".to_string(), b));
        }
        out
    }

    /// (B, T, loops) exit probabilities in fp32 from each loop's state
    /// (B, T, H); differentiable (RLTT's `exit_pdf` weighting trains the gate).
    pub fn distribution(&self, states: &[Tensor]) -> Result<Tensor> {
        let mut rest: Option<Tensor> = None;
        let mut pdf = Vec::with_capacity(states.len());
        for (t, h) in states.iter().enumerate() {
            let last = t + 1 == states.len();
            let p = match (&rest, last) {
                (Some(r), true) => r.shallow_clone(),
                (None, true) => h.f_select(-1, 0)?.f_ones_like()?.f_to_kind(Kind::Float)?,
                (r, false) => {
                    let lambda = self
                        .linear
                        .forward(h)?
                        .f_squeeze_dim(-1)?
                        .f_to_kind(Kind::Float)?
                        .f_sigmoid()?;
                    let (p, next) = match r {
                        Some(r) => (
                            lambda.f_mul(r)?,
                            r.f_mul(&lambda.f_neg()?.f_add_scalar(1.0)?)?,
                        ),
                        None => (lambda.shallow_clone(), lambda.f_neg()?.f_add_scalar(1.0)?),
                    };
                    rest = Some(next);
                    p
                }
            };
            pdf.push(p);
        }
        Ok(Tensor::f_stack(&pdf, 2)?)
    }

    /// (B, T) index of the loop inference reads at each position.
    pub fn exit_loops(&self, states: &[Tensor], threshold: f64) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        exit_index(&self.distribution(states)?, threshold)
    }
}

/// The first loop whose cumulative exit probability reaches `threshold`,
/// else the last: (B, T, loops) -> (B, T) int64.
pub fn exit_index(pdf: &Tensor, threshold: f64) -> Result<Tensor> {
    let reached = pdf.f_cumsum(2, Kind::Float)?.f_ge(threshold)?;
    let first = reached.f_to_kind(Kind::Float)?.f_argmax(2, false)?;
    let last = Tensor::f_full_like(&first, pdf.size()[2] - 1)?;
    Ok(first.f_where_self(&reached.f_any_dim(2, false)?, &last)?)
}

/// Per position, the state of loop `at[b, t]`: (B, T, H).
pub fn gather_loops(states: &[Tensor], at: &Tensor) -> Result<Tensor> {
    let stacked = Tensor::f_stack(states, 2)?; // (B, T, loops, H)
    let h = stacked.size()[3];
    let idx = at
        .f_unsqueeze(-1)?
        .f_unsqueeze(-1)?
        .f_expand([-1, -1, 1, h], false)?;
    Ok(stacked.f_gather(2, &idx, false)?.f_squeeze_dim(2)?)
}

impl super::Llama {
    /// (B, T, loops) exit distribution over a looped model's loop states
    /// (`forward_loops`); None for plain models.
    pub fn exit_distribution(&self, states: &[Tensor]) -> Result<Option<Tensor>> {
        self.exit_gate
            .as_ref()
            .map(|g| g.distribution(states))
            .transpose()
    }
}
