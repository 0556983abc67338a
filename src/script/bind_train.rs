//! Training in scripts: `optimizer`, `tarpo_loss` and `opt.step(loss)`.
//! `tarpo_loss` replays the rollout and accumulates the loss's gradient
//! micro-batch by micro-batch (so memory stays bounded); the returned Loss
//! stands for that gradient, which `opt.step` consumes exactly once.
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::rl::loss::LossConfig;
use crate::rl::loss_agg::Norm;
use crate::rl::optim::{grad_norm, zero_grads, AdamW, AdamWConfig, Schedule};
use crate::rl::train::{param_groups, RefInputs};
use crate::rl::update::{accumulate_gradients, ReplayConfig};
use anyhow::{bail, Result};
use rhai::{Array, Engine, Map};
use std::cell::RefCell;
use std::rc::Rc;

pub fn register(engine: &mut Engine) {
    engine
        .register_type_with_name::<OptimizerHandle>("Optimizer")
        .register_type_with_name::<LossHandle>("Loss");
    engine.register_fn("optimizer", |m: Backbone| rt(optimizer(&m, Map::new())));
    engine.register_fn("optimizer", |m: Backbone, o: Map| rt(optimizer(&m, o)));
    engine.register_fn(
        "tarpo_loss",
        |m: Backbone, ro: RolloutHandle, adv: Array| rt(tarpo_loss(&m, &ro, &adv, Map::new())),
    );
    engine.register_fn(
        "tarpo_loss",
        |m: Backbone, ro: RolloutHandle, adv: Array, o: Map| rt(tarpo_loss(&m, &ro, &adv, o)),
    );
    engine.register_fn("step", |o: &mut OptimizerHandle, l: LossHandle| {
        rt(step(o, &l))
    });
    engine.register_get("lr", |o: &mut OptimizerHandle| {
        o.0.borrow().adamw.lrs().first().copied().unwrap_or(0.0)
    });
    engine.register_get("steps", |o: &mut OptimizerHandle| {
        o.0.borrow().adamw.step_count() as i64
    });
    engine.register_fn("to_string", |o: &mut OptimizerHandle| {
        let st = o.0.borrow();
        format!(
            "Optimizer(AdamW, {} steps, lr {:?})",
            st.adamw.step_count(),
            st.adamw.lrs()
        )
    });
    engine.register_get("value", |l: &mut LossHandle| l.metrics.loss);
    engine.register_get("kl_token", |l: &mut LossHandle| l.metrics.kl_token);
    engine.register_get("kl_router", |l: &mut LossHandle| l.metrics.kl_router);
    engine.register_fn("metrics", |l: &mut LossHandle| loss_map(l));
    engine.register_fn("to_string", |l: &mut LossHandle| {
        format!(
            "Loss({:.6}, kl_token {:.3e}, kl_router {:.3e})",
            l.metrics.loss, l.metrics.kl_token, l.metrics.kl_router
        )
    });
}

fn optimizer(m: &Backbone, o: Map) -> Result<OptimizerHandle> {
    let o = Opts::check("optimizer", help::OPTIMIZER, o)?;
    let kind = Schedule::parse(&o.str("schedule")?)?;
    let schedule = match (o.opt_int("steps")?, kind) {
        (_, crate::rl::optim::ScheduleKind::Constant) => Schedule::constant(),
        (Some(n), _) if n > 0 => {
            Schedule::with_warmup_fraction(kind, o.float("warmup")?, n as u64, o.float("min_lr_ratio")?)?
        }
        _ => bail!(
            "optimizer: schedule {:?} needs `steps` (the total optimizer steps, >= 1); use schedule: \"constant\" otherwise",
            o.str("schedule")?
        ),
    };
    let clip = o.float("clip")?;
    let config = AdamWConfig {
        betas: (o.float("beta1")?, o.float("beta2")?),
        eps: o.float("eps")?,
        max_grad_norm: (clip > 0.0).then_some(clip),
        schedule,
        ..AdamWConfig::default()
    };
    let st = m.0.borrow();
    let groups = param_groups(
        &st.policy,
        o.float("lr")?,
        o.float("router_lr")?,
        o.float("weight_decay")?,
    );
    if groups.is_empty() {
        bail!(
            "optimizer: nothing to train: load the backbone with lora: #{{...}} or attach a router"
        );
    }
    let adamw = AdamW::new(groups, config)?;
    drop(st);
    Ok(OptimizerHandle(Rc::new(RefCell::new(OptimizerState {
        adamw,
        backbone: m.clone(),
    }))))
}

fn tarpo_loss(m: &Backbone, ro: &RolloutHandle, adv: &Array, o: Map) -> Result<LossHandle> {
    let o = Opts::check("tarpo_loss", help::TARPO_LOSS, o)?;
    let adv = floats(adv, "advantages")?;
    let clip = match (o.opt_float("clip_low")?, o.opt_float("clip_high")?) {
        (Some(lo), hi) => Some((lo, hi.unwrap_or(lo))),
        (None, Some(_)) => bail!("tarpo_loss: clip_high needs clip_low"),
        (None, None) => None,
    };
    let ref_inputs = match o.choice("ref_inputs", &["same", "hard"])?.as_str() {
        "same" => RefInputs::Same,
        _ => RefInputs::Hard,
    };
    let cfg = ReplayConfig {
        loss: LossConfig {
            lambda: o.float("lambda")?,
            beta: o.float("beta")?,
            kl: o.str("kl")?,
            norm: Norm::parse(&o.str("norm")?)?,
            max_len: o.opt_int("max_len")?.unwrap_or(ro.0.max_new as i64),
            clip,
        },
        micro_batch: o.usize("micro_batch")?.max(1),
        ref_inputs,
        score_temperature: o.opt_float("score_temperature")?,
    };
    crate::rl::kl::lookup(&cfg.loss.kl)?;
    let mut st = m.0.borrow_mut();
    if cfg.loss.lambda != 0.0 && st.policy.router.is_none() {
        bail!(
            "tarpo_loss: lambda = {} needs a router (attach_router(m)); use lambda: 0 for GRPO",
            cfg.loss.lambda
        );
    }
    // A new loss owns the gradient: clear what an unstepped or interrupted one left.
    zero_grads(&st.policy.parameters())?;
    st.pending_loss = 0;
    let metrics = accumulate_gradients(&st.policy, &ro.0.ro, &adv, &cfg)?;
    st.losses += 1;
    st.pending_loss = st.losses;
    Ok(LossHandle {
        metrics,
        serial: st.losses,
        backbone: m.clone(),
    })
}

fn step(o: &OptimizerHandle, l: &LossHandle) -> Result<rhai::Map> {
    let mut st = o.0.borrow_mut();
    if !st.backbone.same(&l.backbone) {
        bail!("opt.step: this loss belongs to another backbone than the optimizer's");
    }
    let mut bb = st.backbone.0.borrow_mut();
    if bb.pending_loss != l.serial {
        bail!("opt.step: this loss's gradient is gone (already stepped, or a newer tarpo_loss replaced it)");
    }
    let router_grad = match &bb.policy.router {
        Some(r) => grad_norm(&r.parameters())?,
        None => 0.0,
    };
    bb.pending_loss = 0;
    drop(bb);
    let report = st.adamw.step()?;
    st.adamw.zero_grad()?;
    let mut m = loss_map(l);
    m.insert("grad_norm".into(), report.grad_norm.into());
    m.insert("grad_action_norm".into(), router_grad.into());
    m.insert("lr".into(), report.lr.into());
    m.insert("skipped".into(), report.skipped.into());
    m.insert("step".into(), (st.adamw.step_count() as i64).into());
    Ok(m)
}

fn loss_map(l: &LossHandle) -> Map {
    let mut m = Map::new();
    m.insert("loss".into(), l.metrics.loss.into());
    m.insert("kl_token".into(), l.metrics.kl_token.into());
    m.insert("kl_router".into(), l.metrics.kl_router.into());
    m.insert("grad_hidden_norm".into(), l.metrics.grad_hidden_norm.into());
    m
}
