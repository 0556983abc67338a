//! Training in scripts: `optimizer`, `tarpo_loss` and `opt.step(loss)`.
//! `tarpo_loss` replays the rollout and adds the gradient of its loss to the
//! parameters micro-batch by micro-batch (so memory stays bounded); the
//! returned Loss stands for that gradient. Losses accumulate as in PyTorch
//! until `opt.step(loss)` or `opt.step([l1, l2, ...])` steps on them, which
//! must name exactly the pending ones: their gradient is then that of one
//! batch of all their completions, in every normalisation mode
//! (`rl::update`). The optimizer takes in parameters that appeared after it
//! was made (a router attached later) at each step.
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::rl::data_parallel::{all_reduce_step, broadcast_parameters};
use crate::rl::loss::{LossConfig, LossMetrics};
use crate::rl::loss_agg::Norm;
use crate::rl::optim::{describe_nonfinite, grad_norm, zero_grads, AdamW, AdamWConfig, Schedule};
use crate::rl::policy::param_groups;
use crate::rl::rltt::LoopWeighting;
use crate::rl::update::{backward, finish, LossSums, RefInputs, ReplayConfig};
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
    engine.register_fn("sft_loss", |m: Backbone, rows: Array| {
        rt(sft_loss(&m, &rows, Map::new()))
    });
    engine.register_fn("sft_loss", |m: Backbone, rows: Array, o: Map| {
        rt(sft_loss(&m, &rows, o))
    });
    engine.register_fn("step", |o: &mut OptimizerHandle, l: LossHandle| {
        rt(step(o, &[l]))
    });
    engine.register_fn("step", |o: &mut OptimizerHandle, ls: Array| {
        let losses = rt(ls
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let t = v.type_name();
                v.try_cast::<LossHandle>()
                    .ok_or_else(|| anyhow::anyhow!("opt.step: losses[{i}] must be a Loss, got {t}"))
            })
            .collect::<Result<Vec<_>>>())?;
        if losses.is_empty() {
            return rt(Err(anyhow::anyhow!("opt.step: no losses given")));
        }
        rt(step(o, &losses))
    });
    engine.register_fn("zero_grad", |o: &mut OptimizerHandle| rt(zero_grad(o)));
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
    engine.register_fn("metrics", |l: &mut LossHandle| loss_map(&l.metrics));
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
        max_consecutive_skips: o.usize("max_skips")?,
        schedule,
    };
    let (lr, router_lr, weight_decay) = (
        o.float("lr")?,
        o.float("router_lr")?,
        o.float("weight_decay")?,
    );
    let mut st = m.0.borrow_mut();
    // Data parallel: every rank starts from rank 0's weights.
    let params = st.policy.parameters();
    broadcast_parameters(&params)?;
    // Full fine-tuning: the KL reference is the weights as they are now.
    st.policy.freeze_reference()?;
    let groups = param_groups(&st.policy, lr, router_lr, weight_decay);
    if groups.is_empty() {
        bail!(
            "optimizer: nothing to train: the backbone is frozen (train: \"none\") and has no router or HRPO gate; attach_router(m) first, or load it with lora: #{{...}} or train: \"all\""
        );
    }
    let adamw = AdamW::new(groups, config)?;
    drop(st);
    Ok(OptimizerHandle(Rc::new(RefCell::new(OptimizerState {
        adamw,
        backbone: m.clone(),
        lr,
        router_lr,
        weight_decay,
        in_sync: params.len(),
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
            lambda: o.finite("lambda")?,
            beta: o.finite("beta")?,
            kl: o.str("kl")?,
            norm: Norm::parse(&o.str("norm")?)?,
            max_len: o.opt_int("max_len")?.unwrap_or(ro.0.max_new as i64),
            clip,
        },
        micro_batch: o.positive("micro_batch")?,
        ref_inputs,
        score_temperature: o.opt_float("score_temperature")?,
        logits_chunk: None,
        loops: match o.str("loops")?.as_str() {
            "final" => None,
            w => Some(LoopWeighting::parse(w, o.finite("alpha")?)?),
        },
    };
    crate::rl::kl::lookup(&cfg.loss.kl)?;
    let mut st = m.0.borrow_mut();
    if cfg.loss.lambda != 0.0 && st.policy.router.is_none() {
        bail!(
            "tarpo_loss: lambda = {} needs a router (attach_router(m)); use lambda: 0 for GRPO",
            cfg.loss.lambda
        );
    }
    if !ro.0.backbone.same(m) {
        bail!("tarpo_loss: the rollout was made by another backbone");
    }
    let sums = backward(&st.policy, &ro.0.ro, &adv, &cfg);
    pend(m, &mut st, sums, &cfg.loss)
}

/// Registers a computed loss's sums as pending (or, when it failed, drops
/// every pending gradient, since part of this one is in the parameters).
pub(super) fn pend(
    m: &Backbone,
    st: &mut BackboneState,
    sums: Result<LossSums>,
    loss: &LossConfig,
) -> Result<LossHandle> {
    let sums = match sums {
        Ok(s) => s,
        Err(e) => {
            zero_grads(&st.policy.parameters())?;
            let lost = std::mem::take(&mut st.pending).serials.len();
            return Err(if lost > 0 {
                e.context(format!(
                    "the loss failed; the gradient of the {lost} loss(es) computed before it was dropped too"
                ))
            } else {
                e
            });
        }
    };
    let mut total = st
        .pending
        .sums
        .take()
        .unwrap_or_else(|| LossSums::new(loss));
    if let Err(e) = total.add(&sums) {
        st.pending.sums = Some(total);
        return Err(e);
    }
    st.losses += 1;
    let serial = st.losses;
    st.pending.serials.push(serial);
    st.pending.sums = Some(total);
    Ok(LossHandle {
        metrics: sums.metrics(),
        serial,
        backbone: m.clone(),
    })
}

/// `sft_loss(m, rows, opts)`: the NLL of each row's completion (`field`,
/// after `prefix`, then the end token) after its prompt, as a pending loss.
fn sft_loss(m: &Backbone, rows: &Array, o: Map) -> Result<LossHandle> {
    let o = Opts::check("sft_loss", help::SFT_LOSS, o)?;
    let cfg = crate::rl::sft::config(Norm::parse(&o.str("norm")?)?, o.positive("micro_batch")?);
    let mut st = m.0.borrow_mut();
    let (prompts, completions) = encode_pairs(&st.policy.model, rows, &o, "sft_loss")?;
    let loss = cfg.loss.clone();
    let sums = crate::rl::sft::nll_backward(&st.policy, prompts, completions, &cfg);
    pend(m, &mut st, sums, &loss)
}

/// Token ids, one row per example.
pub(super) type TokenRows = Vec<Vec<i64>>;

/// The token ids of each row's prompt and completion (`field`), as SFT and
/// the offline losses read them: options `field`, `prefix`, `eos`, `chat`,
/// `system`, `max_prompt`.
pub(super) fn encode_pairs(
    model: &crate::model::Model,
    rows: &Array,
    o: &Opts,
    func: &str,
) -> Result<(TokenRows, TokenRows)> {
    let field = o.str("field")?;
    let (chat, system) = (o.opt_bool("chat")?, o.opt_str("system")?);
    let max_prompt = o.positive("max_prompt")?;
    let tok = &model.tok;
    let chat_on = chat.unwrap_or_else(|| tok.has_chat_template());
    let prefix =
        o.opt_str("prefix")?
            .unwrap_or_else(|| if chat_on { String::new() } else { "\n".into() });
    let eos = if o.bool("eos")? {
        model.eos.first().copied()
    } else {
        None
    };
    if rows.is_empty() {
        bail!("{func}: no rows");
    }
    let (mut prompts, mut completions) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        let Some(map) = r.clone().try_cast::<Map>() else {
            bail!(
                "{func}: rows[{i}] must be a #{{prompt, {field}}} map, got {}",
                r.type_name()
            );
        };
        let text = |k: &str| -> Result<String> {
            map.get(k)
                .filter(|v| v.is_string())
                .map(|v| v.to_string())
                .ok_or_else(|| anyhow::anyhow!("{func}: rows[{i}] has no string `{k}`"))
        };
        let p = super::bind_model::encode_prompt(
            tok,
            &text("prompt")?,
            Some(chat_on),
            system.as_deref(),
        )?;
        prompts.push(p[p.len().saturating_sub(max_prompt)..].to_vec());
        let mut c = tok.encode(&format!("{prefix}{}", text(&field)?), false)?;
        c.extend(eos);
        completions.push(c);
    }
    Ok((prompts, completions))
}

/// `opt.step(loss)` or `opt.step([losses])`: one AdamW step on the gradient
/// the losses accumulated, which must be exactly the ones pending.
fn step(o: &OptimizerHandle, losses: &[LossHandle]) -> Result<rhai::Map> {
    let mut st = o.0.borrow_mut();
    if let Some(l) = losses.iter().find(|l| !st.backbone.same(&l.backbone)) {
        bail!(
            "opt.step: loss #{} belongs to another backbone than the optimizer's",
            l.serial
        );
    }
    let backbone = st.backbone.clone();
    let mut bb = backbone.0.borrow_mut();
    let pending = &bb.pending.serials;
    let mut given: Vec<u64> = losses.iter().map(|l| l.serial).collect();
    given.sort_unstable();
    if given.windows(2).any(|w| w[0] == w[1]) {
        bail!("opt.step: a loss is given twice");
    }
    if let Some(g) = given.iter().find(|s| !pending.contains(s)) {
        bail!("opt.step: the gradient of loss #{g} is gone (already stepped, or dropped by opt.zero_grad() or a failed tarpo_loss)");
    }
    if given.len() != pending.len() {
        let others: Vec<String> = pending
            .iter()
            .filter(|s| !given.contains(s))
            .map(|s| format!("#{s}"))
            .collect();
        bail!(
            "opt.step: the gradient also holds loss {} (computed and not stepped); pass every loss to accumulate, opt.step([a, b, ...]), or drop the others with opt.zero_grad() first",
            others.join(", ")
        );
    }
    let Some(mut sums) = bb.pending.sums.take() else {
        bail!("internal: pending losses without their sums");
    };
    bb.pending.serials.clear();
    sync_params(&mut st, &bb.policy)?;
    let params = bb.policy.parameters();
    if params.len() != st.in_sync {
        // Trained tensors added since (a router): rank 0's values everywhere.
        broadcast_parameters(&params)?;
        st.in_sync = params.len();
    }
    all_reduce_step(&params, &mut sums)?;
    let metrics = finish(&params, &sums)?;
    let router_grad = match &bb.policy.router {
        Some(r) => grad_norm(&r.parameters())?,
        None => 0.0,
    };
    drop(bb);
    let report = st.adamw.step_guarded(metrics.loss.is_finite())?;
    st.adamw.zero_grad()?;
    let mut m = loss_map(&metrics);
    m.insert("grad_norm".into(), report.grad_norm.into());
    m.insert("grad_action_norm".into(), router_grad.into());
    m.insert("lr".into(), report.lr.into());
    m.insert("skipped".into(), report.skipped.into());
    if report.skipped {
        let what = describe_nonfinite(&report.nonfinite);
        if crate::dist::world().is_main() {
            eprintln!(
                "warning: optimizer step {} skipped: non-finite {what} ({} in a row)",
                st.adamw.step_count() + st.adamw.skipped_steps(),
                st.adamw.consecutive_skips()
            );
        }
        m.insert("nonfinite".into(), what.into());
    }
    m.insert("step".into(), (st.adamw.step_count() as i64).into());
    Ok(m)
}

/// Gives the optimizer the parameters the policy has now (a router or gate
/// attached after it was made is trained from here on).
pub(super) fn sync_params(
    opt: &mut OptimizerState,
    policy: &crate::rl::policy::Policy,
) -> Result<()> {
    let groups = param_groups(policy, opt.lr, opt.router_lr, opt.weight_decay);
    opt.adamw.sync_groups(groups)?;
    Ok(())
}

/// `opt.zero_grad()`: drops every pending loss's gradient.
fn zero_grad(o: &OptimizerHandle) -> Result<()> {
    let st = o.0.borrow();
    let mut bb = st.backbone.0.borrow_mut();
    zero_grads(&bb.policy.parameters())?;
    bb.pending = Default::default();
    Ok(())
}

fn loss_map(l: &LossMetrics) -> Map {
    let mut m = Map::new();
    m.insert("loss".into(), l.loss.into());
    m.insert("kl_token".into(), l.kl_token.into());
    m.insert("kl_router".into(), l.kl_router.into());
    m.insert("grad_hidden_norm".into(), l.grad_hidden_norm.into());
    m.insert("clip_frac".into(), l.clip_frac.into());
    m
}
