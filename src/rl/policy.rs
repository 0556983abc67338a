//! What training updates and what it is compared against: the backbone with
//! its router, HRPO gate and trainable weights, and the frozen reference of
//! the KL terms.
use super::optim::ParamGroup;
use crate::model::{Llama, Model};
use crate::policy::{HrpoGate, Router};
use anyhow::Result;
use tch::Tensor;

/// What the KL terms compare against: the policy's starting weights.
pub enum Reference {
    /// The backbone with its LoRA adapters at their starting values (off for
    /// fresh adapters, the loaded ones after a warm start): no second copy.
    Base,
    /// A frozen copy of the starting weights (full fine-tuning).
    Model(Box<Llama>),
    /// The backbone itself: its weights do not train (router-only training,
    /// or full fine-tuning before its first optimizer made the copy).
    Own,
}

pub struct Policy {
    pub model: Model,
    /// TARPO's router; None for token-only methods (GRPO, Dr. GRPO, DAPO).
    pub router: Option<Router>,
    /// The router at initialisation (the router's KL reference).
    pub router_ref: Option<Router>,
    /// HRPO's gated latent inputs (with `rollout.latent = Latent::Hrpo`).
    pub gate: Option<HrpoGate>,
    pub reference: Reference,
    /// RLTT's learned loop weighting: T logits, softmax'd (attach_loop_weights).
    pub loop_logits: Option<Tensor>,
    /// DRO's value head (attach_value_head).
    pub value_head: Option<super::offline::ValueHead>,
}

impl Policy {
    /// A policy of `model` alone, with the reference its trainable weights imply.
    pub fn new(model: Model) -> Policy {
        let reference = if model.net.has_lora() {
            Reference::Base
        } else {
            Reference::Own
        };
        Policy {
            model,
            router: None,
            router_ref: None,
            gate: None,
            reference,
            loop_logits: None,
            value_head: None,
        }
    }

    /// Everything training updates: backbone weights or LoRA, router, HRPO gate.
    pub fn parameters(&self) -> Vec<Tensor> {
        let mut params: Vec<Tensor> = self.model.net.lora_parameters();
        params.extend(self.model.net.trainable().into_iter().map(|(_, t)| t));
        if let Some(r) = &self.router {
            params.extend(r.parameters());
        }
        if let Some(g) = &self.gate {
            params.extend(g.parameters());
        }
        params.extend(self.loop_logits.iter().map(Tensor::shallow_clone));
        if let Some(v) = &self.value_head {
            params.extend(v.named_parameters().into_iter().map(|(_, t)| t));
        }
        params
    }

    /// Runs `f` on the reference: the backbone with its adapters as they
    /// started, the frozen copy, or the backbone itself.
    pub fn with_reference<T>(&self, f: impl FnOnce(&Llama) -> T) -> T {
        let net = &self.model.net;
        match &self.reference {
            Reference::Base => {
                net.set_lora_reference(true);
                let out = f(net);
                net.set_lora_reference(false);
                out
            }
            Reference::Model(m) => f(m),
            Reference::Own => f(net),
        }
    }

    /// Makes the frozen copy of the starting weights that fully fine-tuned
    /// backbones are compared against, once, before they first change.
    pub fn freeze_reference(&mut self) -> Result<()> {
        if matches!(self.reference, Reference::Own) && !self.model.net.trainable().is_empty() {
            self.reference = Reference::Model(Box::new(self.model.net.frozen_copy()?));
        }
        Ok(())
    }
}

/// Optimizer groups as the reference runs them: the backbone (LoRA, or its
/// own matrices under full fine-tuning) at `lr` with weight decay; norms and
/// biases of a fully trained backbone at `lr` without decay; the router
/// weight at `router_lr`, its bias at `router_lr` without decay (decay would
/// pull the initial soft probability back to 50 %); the HRPO gate at
/// `router_lr` without decay. Empty groups are left out.
pub fn param_groups(
    policy: &Policy,
    lr: f64,
    router_lr: f64,
    weight_decay: f64,
) -> Vec<ParamGroup> {
    let (mut decay, mut no_decay) = (Vec::new(), Vec::new());
    for (_, t) in policy.model.net.trainable() {
        // Norm weights and biases are the 1-D tensors.
        if t.dim() < 2 {
            no_decay.push(t);
        } else {
            decay.push(t);
        }
    }
    let mut groups = vec![
        ParamGroup::new("lora", policy.model.net.lora_parameters(), lr, weight_decay),
        ParamGroup::new("backbone", decay, lr, weight_decay),
        ParamGroup::new("backbone_no_decay", no_decay, lr, 0.0),
    ];
    if let Some(r) = &policy.router {
        groups.push(ParamGroup::new(
            "router_weight",
            vec![r.weight.shallow_clone()],
            router_lr,
            weight_decay,
        ));
        groups.push(ParamGroup::new(
            "router_bias",
            vec![r.bias.shallow_clone()],
            router_lr,
            0.0,
        ));
    }
    if let Some(g) = &policy.gate {
        // The HRPO reference trains its gates at 1e-4 like the router.
        groups.push(ParamGroup::new("hrpo_gate", g.parameters(), router_lr, 0.0));
    }
    if let Some(theta) = &policy.loop_logits {
        // RLTT trains its loop weights at 10x the backbone's rate, no decay.
        groups.push(ParamGroup::new(
            "loop_weights",
            vec![theta.shallow_clone()],
            10.0 * lr,
            0.0,
        ));
    }
    if let Some(v) = &policy.value_head {
        groups.push(ParamGroup::new(
            "value_head",
            v.named_parameters().into_iter().map(|(_, t)| t).collect(),
            lr,
            weight_decay,
        ));
    }
    groups.retain(|g| !g.params.is_empty());
    groups
}
