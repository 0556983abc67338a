//! Rollouts in scripts: `rollout_group`, per-token records, `reward` (built-in
//! by name or a Rhai function), advantages and the other group arithmetic.
use super::bind_model::encode_prompt;
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::policy::{rollout_observed, Latent, Observer, RolloutOptions, Sampling};
use crate::policy::{HARD, SOFT};
use crate::rl::{advantage, metrics, reward as rewards};
use anyhow::{anyhow, bail, Result};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, Map, NativeCallContext};
use std::rc::Rc;

type Res<T> = Result<T, Box<EvalAltResult>>;

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<RolloutHandle>("Rollout");
    engine.register_fn("rollout_group", |m: Backbone, p: Array| {
        rt(rollout_group(&m, p, Map::new()))
    });
    engine.register_fn("rollout_group", |m: Backbone, p: Array, o: Map| {
        rt(rollout_group(&m, p, o))
    });
    engine.register_fn("reward", |ro: RolloutHandle, name: &str| -> Res<Array> {
        if name == "humaneval" {
            return rt(super::bind_code::humaneval_rewards(&ro.0, Map::new()).map(float_array));
        }
        let f = rt(rewards::lookup(name))?;
        let d = &ro.0;
        Ok(float_array(
            d.texts
                .iter()
                .enumerate()
                .map(|(i, t)| f(t, &d.items[i / d.group].answer)),
        ))
    });
    engine.register_fn(
        "reward",
        |ctx: NativeCallContext, ro: RolloutHandle, f: FnPtr| -> Res<Array> {
            let d = &ro.0;
            let mut out = Array::with_capacity(d.texts.len());
            for (i, t) in d.texts.iter().enumerate() {
                let answer = d.items[i / d.group].answer.clone();
                let v: Dynamic = f.call_within_context(&ctx, (t.clone(), answer))?;
                match super::opts::as_f64(&v) {
                    Some(x) => out.push(Dynamic::from_float(x)),
                    None => {
                        return rt(Err(anyhow!(
                        "reward function {}: must return a number, returned {} for completion {i}",
                        f.fn_name(),
                        v.type_name()
                    )))
                    }
                }
            }
            Ok(out)
        },
    );
    engine.register_fn(
        "reward",
        |text: &str, answer: &str, name: &str| -> Res<f64> {
            Ok(rt(rewards::lookup(name))?(text, answer))
        },
    );
    engine.register_fn("extract_answer", |text: &str, kind: &str| -> Res<Dynamic> {
        Ok(rt(rewards::extract_answer(text, kind))?.map_or(Dynamic::UNIT, Into::into))
    });
    engine.register_fn("compute_advantages", |rw: Array, o: Map| -> Res<Array> {
        let o = rt(Opts::check(
            "compute_advantages",
            help::COMPUTE_ADVANTAGES,
            o,
        ))?;
        let r = rt(floats(&rw, "rewards"))?;
        let r_ref = match o.raw("ref_rewards") {
            Some(v) => Some(rt(floats(&v.cast::<Array>(), "ref_rewards"))?),
            None => None,
        };
        let extra = advantage::Extra {
            ref_rewards: r_ref.as_deref(),
            scale: rt(o.opt_bool("scale_rewards"))?,
        };
        let adv = rt(advantage::compute_with(
            &r,
            rt(o.usize("group"))?,
            &rt(o.str("estimator"))?,
            &extra,
        ))?;
        Ok(float_array(adv))
    });
    engine.register_fn(
        "aapo_revived_frac",
        |rw: Array, r_ref: Array, group: i64| -> Res<f64> {
            let (r, rr) = (
                rt(floats(&rw, "rewards"))?,
                rt(floats(&r_ref, "ref_rewards"))?,
            );
            rt(advantage::aapo_revived_fraction(
                &r,
                &rr,
                group.max(0) as usize,
            ))
        },
    );
    engine.register_fn("zero_adv_frac", |rw: Array, group: i64| -> Res<f64> {
        let r = rt(floats(&rw, "rewards"))?;
        rt(advantage::zero_advantage_fraction(
            &r,
            group.max(0) as usize,
        ))
    });
    engine.register_fn(
        "informative_groups",
        |rw: Array, group: i64| -> Res<Array> {
            let r = rt(floats(&rw, "rewards"))?;
            let g = rt(advantage::informative_groups(&r, group.max(0) as usize))?;
            Ok(int_array(g.into_iter().map(|x| x as i64)))
        },
    );
    engine.register_fn(
        "overlong_penalty",
        |ro: RolloutHandle, max_len: i64, cache: i64| -> Array {
            float_array(ro.0.ro.lengths().into_iter().map(|n| {
                advantage::overlong_penalty(n, max_len.max(0) as usize, cache.max(0) as usize)
            }))
        },
    );
    engine.register_fn(
        "step_metrics",
        |m: Backbone, ro: RolloutHandle, rw: Array, adv: Array| -> Res<Map> {
            let r = rt(floats(&rw, "rewards"))?;
            let a = rt(floats(&adv, "advantages"))?;
            let st = m.0.borrow();
            let d = &ro.0;
            let sm = rt(metrics::rollout_metrics(
                &st.policy.model.net,
                &d.ro,
                &r,
                &a,
                d.group,
            ))?;
            let json = rt(serde_json::to_value(&sm).map_err(anyhow::Error::from))?;
            let mut map = from_json(&json).cast::<Map>();
            // Fields the rollout alone cannot know are filled by the loss and the optimizer.
            for k in [
                "step",
                "kl_token",
                "kl_router",
                "grad_norm",
                "grad_hidden_norm",
                "grad_action_norm",
                "clip_frac",
                "lr",
                "loss",
                "skipped",
            ] {
                map.remove(k);
            }
            Ok(map)
        },
    );
    register_methods(engine);
}

fn register_methods(engine: &mut Engine) {
    engine.register_fn("len", |r: &mut RolloutHandle| r.0.texts.len() as i64);
    engine.register_get("len", |r: &mut RolloutHandle| r.0.texts.len() as i64);
    engine.register_get("group", |r: &mut RolloutHandle| r.0.group as i64);
    engine.register_get("texts", |r: &mut RolloutHandle| -> Array {
        r.0.texts.iter().map(|t| t.clone().into()).collect()
    });
    engine.register_get("answers", |r: &mut RolloutHandle| -> Array {
        (0..r.0.texts.len())
            .map(|i| r.0.items[i / r.0.group].answer.clone().into())
            .collect()
    });
    engine.register_get("prompts", |r: &mut RolloutHandle| -> Array {
        r.0.items
            .iter()
            .map(|p| {
                let mut m = Map::new();
                m.insert("id".into(), p.id.into());
                m.insert("prompt".into(), p.prompt.clone().into());
                m.insert("answer".into(), p.answer.clone().into());
                Dynamic::from_map(m)
            })
            .collect()
    });
    engine.register_get("lengths", |r: &mut RolloutHandle| {
        int_array(r.0.ro.lengths().into_iter().map(|n| n as i64))
    });
    engine.register_fn("text", |r: &mut RolloutHandle, i: i64| -> Res<String> {
        Ok(r.0.texts[rt(index(r, i))?].clone())
    });
    engine.register_fn("tokens", |r: &mut RolloutHandle, i: i64| -> Res<Array> {
        let i = rt(index(r, i))?;
        Ok(int_array(r.0.ro.tokens().swap_remove(i)))
    });
    engine.register_fn("records", |r: &mut RolloutHandle, i: i64| rt(records(r, i)));
    engine.register_fn(
        "prompt_tokens",
        |r: &mut RolloutHandle, i: i64| -> Res<Array> {
            let i = rt(index(r, i))?;
            Ok(int_array(r.0.ro.prompts[i].iter().copied()))
        },
    );
    engine.register_fn("soft_ratio", |r: &mut RolloutHandle| r.0.ro.soft_ratio());
    engine.register_fn("marked", |r: &mut RolloutHandle, i: i64| -> Res<String> {
        let i = rt(index(r, i))?;
        let st = r.0.backbone.0.borrow();
        rt(metrics::mark_soft(&st.policy.model.tok, &r.0.ro.records[i]))
    });
    engine.register_fn("join", |a: RolloutHandle, b: RolloutHandle| {
        rt(join(&a, &b))
    });
    engine.register_fn("select", |r: &mut RolloutHandle, rows: Array| {
        rt(select(r, rows))
    });
    engine.register_fn("to_string", |r: &mut RolloutHandle| {
        format!(
            "Rollout({} completions, group {}, soft ratio {:.3})",
            r.0.texts.len(),
            r.0.group,
            r.0.ro.soft_ratio()
        )
    });
}

fn index(r: &RolloutHandle, i: i64) -> Result<usize> {
    let n = r.0.texts.len() as i64;
    if i < 0 || i >= n {
        bail!("completion index {i} out of range (0..{n})");
    }
    Ok(i as usize)
}

/// Completion `i`'s tokens as maps (the per-token record of ALGORITHMS.md).
fn records(r: &RolloutHandle, i: i64) -> Result<Array> {
    let i = index(r, i)?;
    let st = r.0.backbone.0.borrow();
    let tok = &st.policy.model.tok;
    r.0.ro.records[i]
        .iter()
        .enumerate()
        .map(|(pos, t)| {
            let mut m = Map::new();
            m.insert("position".into(), (pos as i64).into());
            let (token, text) = if t.has_token() {
                (t.token.into(), tok.decode(&[t.token], false)?.into())
            } else {
                (Dynamic::UNIT, Dynamic::from(String::new()))
            };
            m.insert("token".into(), token);
            m.insert("text".into(), text);
            let mode = match t.mode {
                HARD => "hard",
                SOFT => "soft",
                _ => "latent",
            };
            m.insert("mode".into(), mode.into());
            m.insert("forced".into(), t.forced.into());
            m.insert("p_soft".into(), (t.p_soft as f64).into());
            m.insert("logp".into(), (t.logp as f64).into());
            m.insert("router_logp".into(), (t.router_logp as f64).into());
            m.insert("entropy".into(), (t.entropy as f64).into());
            m.insert("topk_entropy".into(), (t.topk_entropy as f64).into());
            m.insert(
                "mix_ids".into(),
                int_array(t.mix_ids.iter().copied()).into(),
            );
            m.insert(
                "mix_weights".into(),
                float_array(t.mix_weights.iter().map(|&w| w as f64)).into(),
            );
            Ok(Dynamic::from_map(m))
        })
        .collect()
}

/// Whole groups of a rollout (DAPO-style filtering in scripts): `rows` are
/// group indices.
fn select(r: &RolloutHandle, groups: Array) -> Result<RolloutHandle> {
    let d = &r.0;
    let n_groups = d.items.len() as i64;
    let groups = ints(&groups, "groups")?;
    if let Some(g) = groups.iter().find(|&&g| g < 0 || g >= n_groups) {
        bail!("ro.select: group {g} out of range (0..{n_groups})");
    }
    let rows: Vec<usize> = groups
        .iter()
        .flat_map(|&g| g as usize * d.group..(g as usize + 1) * d.group)
        .collect();
    Ok(RolloutHandle(Rc::new(RolloutData {
        ro: d.ro.select(&rows),
        group: d.group,
        items: groups
            .iter()
            .map(|&g| d.items[g as usize].clone())
            .collect(),
        texts: rows.iter().map(|&i| d.texts[i].clone()).collect(),
        max_new: d.max_new,
        backbone: d.backbone.clone(),
        made: None,
    })))
}

/// Two rollouts of the same backbone and settings, one after the other.
fn join(a: &RolloutHandle, b: &RolloutHandle) -> Result<RolloutHandle> {
    let (x, y) = (&a.0, &b.0);
    if x.group != y.group {
        bail!(
            "join: the rollouts differ in group ({} vs {})",
            x.group,
            y.group
        );
    }
    if !x.backbone.same(&y.backbone) {
        bail!("join: the rollouts come from different backbones");
    }
    let all: Vec<usize> = (0..x.ro.records.len()).collect();
    let rest: Vec<usize> = (0..y.ro.records.len()).collect();
    Ok(RolloutHandle(Rc::new(RolloutData {
        ro: x.ro.select(&all).concat(y.ro.select(&rest))?,
        group: x.group,
        items: x.items.iter().chain(&y.items).cloned().collect(),
        texts: x.texts.iter().chain(&y.texts).cloned().collect(),
        max_new: x.max_new.max(y.max_new),
        backbone: x.backbone.clone(),
        made: None,
    })))
}

fn prompt_items(prompts: Array) -> Result<Vec<PromptItem>> {
    if prompts.is_empty() {
        bail!("rollout_group: no prompts");
    }
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            if p.is_string() {
                return Ok(PromptItem {
                    prompt: p.to_string(),
                    answer: String::new(),
                    id: -1,
                    fields: Default::default(),
                });
            }
            let Some(m) = p.clone().try_cast::<Map>() else {
                bail!("rollout_group: prompts[{i}] must be a string or a #{{prompt, answer}} map, got {}", p.type_name());
            };
            let text = |k: &str| m.get(k).map(|v| v.to_string());
            Ok(PromptItem {
                prompt: text("prompt").ok_or_else(|| {
                    anyhow!("rollout_group: prompts[{i}] has no `prompt` key")
                })?,
                answer: text("answer").unwrap_or_default(),
                id: m.get("id").and_then(|v| v.as_int().ok()).unwrap_or(-1),
                fields: m
                    .iter()
                    .filter(|(_, v)| v.is_string())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
        })
        .collect()
}

/// The latent mode the `soft` option names, checked against what is attached.
fn latent_mode(o: &Opts, has_router: bool, has_gate: bool) -> Result<(Latent, bool)> {
    let soft = o.choice("soft", &["auto", "topk", "none", "full", "hidden", "hrpo"])?;
    let latent = match soft.as_str() {
        "auto" if has_gate => Latent::Hrpo,
        "auto" | "topk" | "none" => Latent::Router,
        "full" => Latent::SoftThinking {
            cold_stop: o
                .opt_float("cold_stop")?
                .map(|t| Ok::<_, anyhow::Error>((t as f32, o.usize("patience")?)))
                .transpose()?,
        },
        "hidden" => Latent::Coconut {
            latent_steps: match o.opt_int("latent_steps")? {
                Some(n) if n >= 0 => n as usize,
                Some(n) => bail!("rollout_group: option `latent_steps` must be >= 0, got {n}"),
                None => bail!("rollout_group: soft \"hidden\" (Coconut) needs `latent_steps`"),
            },
        },
        _ => Latent::Hrpo,
    };
    if soft == "topk" && !has_router {
        bail!("rollout_group: soft \"topk\" needs a router: attach_router(m) first");
    }
    if soft == "hrpo" && !has_gate {
        bail!("rollout_group: soft \"hrpo\" needs the HRPO gate: attach_hrpo_gate(m) first");
    }
    let use_router = has_router && matches!(soft.as_str(), "auto" | "topk");
    Ok((latent, use_router))
}

fn rollout_group(m: &Backbone, prompts: Array, o: Map) -> Result<RolloutHandle> {
    let o = Opts::check("rollout_group", help::ROLLOUT_GROUP, o)?;
    make_rollout(m, prompts, &o, &mut |_| Ok(()), false)
}

/// rollout_group's work on checked options; `on_step` sees each step's
/// records, and `stop_on_interrupt` keeps what was generated at Ctrl-C.
pub(super) fn make_rollout(
    m: &Backbone,
    prompts: Array,
    o: &Opts,
    on_step: Observer,
    stop_on_interrupt: bool,
) -> Result<RolloutHandle> {
    let items = prompt_items(prompts)?;
    let group = o.positive("group")?;
    let seed = match o.opt_int("seed")? {
        Some(s) => s as u64,
        None => m.0.borrow_mut().rng.next_u64(),
    };
    // Shared from here: an observer may read the backbone (its tokenizer).
    let st = m.0.borrow();
    let p = &st.policy;
    let reference = o.choice("from", &["policy", "reference"])? == "reference";
    let (latent, use_router) = latent_mode(o, p.router.is_some() && !reference, p.gate.is_some())?;
    if reference && latent != Latent::Router {
        bail!("rollout_group: the reference rollout (from: \"reference\") is token-only; leave `soft` at \"auto\" or \"none\"");
    }
    let tok = &p.model.tok;
    let (chat, system) = (o.opt_bool("chat")?, o.opt_str("system")?);
    let mut ids = Vec::with_capacity(items.len() * group);
    for it in &items {
        let e = encode_prompt(tok, &it.prompt, chat, system.as_deref())?;
        ids.extend(std::iter::repeat_n(e, group));
    }
    let sampling = Sampling {
        temperature: o.float("temperature")?,
        top_k: o.int("top_k")?,
        top_p: o.float("top_p")?,
    };
    let max_new = o.positive("max_new")?;
    let mut opts = RolloutOptions::new(max_new, sampling, seed, p.model.eos.clone());
    opts.mix_k = o.int("topk")?;
    let max_prompt = o.positive("max_prompt")?;
    opts.max_prompt = Some(max_prompt);
    let long = ids
        .iter()
        .step_by(group)
        .filter(|p| p.len() > max_prompt)
        .count();
    if long > 0 {
        eprintln!(
            "rollout_group: {long} of {} prompts are longer than max_prompt = {max_prompt} tokens: they keep their last {max_prompt} (left-truncated)",
            items.len()
        );
    }
    opts.latent = latent;
    opts.stop_on_interrupt = stop_on_interrupt;
    let marker = o.str("answer_marker")?;
    opts.answer_marker = (!marker.is_empty()).then_some(marker);
    let router = if use_router { p.router.as_ref() } else { None };
    let gate = if latent == Latent::Hrpo {
        p.gate.as_ref()
    } else {
        None
    };
    let ro = if reference {
        p.with_reference(|net| rollout_observed(net, None, None, Some(tok), &ids, &opts, on_step))?
    } else {
        rollout_observed(&p.model.net, router, gate, Some(tok), &ids, &opts, on_step)?
    };
    let replayable = router.is_some() && latent == Latent::Router;
    let texts = ro
        .tokens()
        .iter()
        .map(|t| tok.decode(t, true))
        .collect::<Result<Vec<_>>>()?;
    drop(st);
    Ok(RolloutHandle(Rc::new(RolloutData {
        ro,
        group,
        items,
        texts,
        max_new,
        backbone: m.clone(),
        made: replayable.then_some(opts),
    })))
}
