//! Parameter groups (a name, tensors, a learning rate and weight decay) and
//! the checks the optimizer runs on them before it takes them.
use anyhow::{bail, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Parameters sharing a base learning rate and weight decay.
pub struct ParamGroup {
    pub name: String,
    /// Leaf tensors with `requires_grad` (shallow clones of the model's).
    pub params: Vec<Tensor>,
    /// Base learning rate, multiplied by the schedule's factor.
    pub lr: f64,
    /// Decoupled weight decay (0 for biases, e.g. the router bias).
    pub weight_decay: f64,
}

impl ParamGroup {
    pub fn new(name: impl Into<String>, params: Vec<Tensor>, lr: f64, weight_decay: f64) -> Self {
        ParamGroup {
            name: name.into(),
            params,
            lr,
            weight_decay,
        }
    }
}

/// Learning rates, decay, dtypes and uniqueness of the parameters.
pub(super) fn validate_groups(groups: &[ParamGroup]) -> Result<()> {
    let mut seen: HashMap<usize, (usize, usize)> = HashMap::new();
    for (gi, g) in groups.iter().enumerate() {
        if !(g.lr.is_finite() && g.lr >= 0.0) {
            bail!(
                "group {gi} ({}): lr must be finite and >= 0, got {}",
                g.name,
                g.lr
            );
        }
        if !(g.weight_decay.is_finite() && g.weight_decay >= 0.0) {
            bail!(
                "group {gi} ({}): weight_decay must be finite and >= 0, got {}",
                g.name,
                g.weight_decay
            );
        }
        for (pi, p) in g.params.iter().enumerate() {
            if !p.defined() {
                bail!(
                    "group {gi} ({}): parameter {pi} is an undefined tensor",
                    g.name
                );
            }
            let kind = p.f_kind()?;
            if !is_float(kind) {
                bail!(
                    "group {gi} ({}): parameter {pi} has dtype {kind:?}; only floating-point parameters can be optimized",
                    g.name
                );
            }
            if !p.requires_grad() {
                bail!(
                    "group {gi} ({}): parameter {pi} does not require grad",
                    g.name
                );
            }
            if p.numel() > 0 {
                let ptr = p.data_ptr() as usize;
                if let Some((gj, pj)) = seen.insert(ptr, (gi, pi)) {
                    bail!(
                        "parameter {pi} of group {gi} ({}) is the same tensor as parameter {pj} of group {gj}; a parameter may appear only once",
                        g.name
                    );
                }
            }
        }
    }
    Ok(())
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}
