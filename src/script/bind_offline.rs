//! Offline losses in scripts (RPO, KTO and DRO, `rl::offline`): the mean
//! per-token log-prob of each row's completion under the policy or the frozen
//! reference, the loss on a batch of (prompt, completion, reward) rows as a
//! Loss for `opt.step`, its value on held-out rows, V_hat and the reward
//! statistics, and offline rows from a JSONL file.
use super::bind_train::{encode_pairs, pend};
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::policy::{replay, Rollout};
use crate::rl::offline::{self, Row};
use crate::rl::policy::Policy;
use crate::rl::sft;
use crate::rl::update::backward;
use anyhow::{anyhow, bail, Context, Result};
use rhai::{Array, Dynamic, Engine, Map};
use tch::Kind;

type Res<T> = Result<T, Box<rhai::EvalAltResult>>;

pub fn register(engine: &mut Engine) {
    engine.register_fn("seq_logps", |m: Backbone, rows: Array| {
        rt(seq_logps_fn(&m, &rows, Map::new())).map(float_array)
    });
    engine.register_fn("seq_logps", |m: Backbone, rows: Array, o: Map| {
        rt(seq_logps_fn(&m, &rows, o)).map(float_array)
    });
    engine.register_fn("offline_loss", |m: Backbone, rows: Array, o: Map| {
        rt(offline_loss(&m, &rows, o, true)).map(|(h, _)| h.expect("a loss"))
    });
    engine.register_fn("offline_eval", |m: Backbone, rows: Array, o: Map| {
        rt(offline_loss(&m, &rows, o, false)).map(|(_, v)| v)
    });
    engine.register_fn(
        "rpo_v_hat",
        |l_ref: Array, rw: Array, tau: f64| -> Res<f64> {
            let (l, r) = (rt(floats(&l_ref, "l_ref"))?, rt(floats(&rw, "rewards"))?);
            rt(offline::v_hat(&l, &r, tau))
        },
    );
    engine.register_fn("reward_stats", |rw: Array| -> Res<Map> {
        let (mean, std) = rt(offline::reward_stats(&rt(floats(&rw, "rewards"))?))?;
        Ok(Map::from_iter([
            ("mean".into(), mean.into()),
            ("std".into(), std.into()),
        ]))
    });
    engine.register_fn("attach_value_head", |m: Backbone| {
        rt(attach_value_head(&m, Map::new()))
    });
    engine.register_fn("attach_value_head", |m: Backbone, o: Map| {
        rt(attach_value_head(&m, o))
    });
    engine.register_get("has_value_head", |m: &mut Backbone| {
        m.0.borrow().policy.value_head.is_some()
    });
    engine.register_fn("load_offline", |p: &str| {
        rt(load_offline(std::path::Path::new(p)))
    });
}

/// l(y|x) of each row of a teacher-forced rollout (`sft::teacher_forced`)
/// under the policy or (reference) the frozen reference, micro-batch by
/// micro-batch, without gradient.
pub fn seq_logps(p: &Policy, ro: &Rollout, reference: bool, micro: usize) -> Result<Vec<f64>> {
    let _g = tch::no_grad_guard();
    let rows: Vec<usize> = (0..ro.records.len()).collect();
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(micro.max(1)) {
        // Each side embeds the inputs with its own table.
        let score = |net: &crate::model::Llama| -> Result<Vec<f64>> {
            let batch = replay::build(net, ro, chunk)?;
            let s = replay::score(net, None, &batch, 1.0)?;
            let mask = batch.mask.f_to_kind(Kind::Float)?;
            let mean = s
                .logp
                .f_mul(&mask)?
                .f_sum_dim_intlist([1].as_slice(), false, Kind::Float)?
                .f_div(&mask.f_sum_dim_intlist([1].as_slice(), false, Kind::Float)?)?;
            Ok(Vec::<f64>::try_from(&mean.f_to_kind(Kind::Double)?)?)
        };
        out.extend(if reference {
            p.with_reference(score)?
        } else {
            score(&p.model.net)?
        });
    }
    Ok(out)
}

fn seq_logps_fn(m: &Backbone, rows: &Array, o: Map) -> Result<Vec<f64>> {
    let o = Opts::check("seq_logps", help::SEQ_LOGPS, o)?;
    let reference = o.choice("from", &["policy", "reference"])? == "reference";
    let st = m.0.borrow();
    let (prompts, completions) = encode_pairs(&st.policy.model, rows, &o, "seq_logps")?;
    let ro = sft::teacher_forced(prompts, completions)?;
    seq_logps(&st.policy, &ro, reference, o.positive("micro_batch")?)
}

/// A number field of row `i`.
fn number(r: &Dynamic, i: usize, key: &str, func: &str) -> Result<f64> {
    let v = r
        .clone()
        .try_cast::<Map>()
        .and_then(|m| m.get(key).cloned());
    v.as_ref()
        .and_then(super::opts::as_f64)
        .filter(|x| x.is_finite())
        .ok_or_else(|| {
            anyhow!("{func}: rows[{i}] needs a finite number `{key}` (see help(\"{func}\"))")
        })
}

/// The offline loss of `rows`: with `grad`, its gradient added and the Loss;
/// else its value alone.
fn offline_loss(
    m: &Backbone,
    rows: &Array,
    o: Map,
    grad: bool,
) -> Result<(Option<LossHandle>, f64)> {
    let func = if grad { "offline_loss" } else { "offline_eval" };
    let o = Opts::check(func, help::OFFLINE_LOSS, o)?;
    let method = o.choice("method", &["rpo", "kto", "dro"])?;
    let micro = o.positive("micro_batch")?;
    let mut st = m.0.borrow_mut();
    if method == "dro" && st.policy.value_head.is_none() {
        bail!("{func}: method \"dro\" needs its value head: attach_value_head(m) first");
    }
    let (prompts, completions) = encode_pairs(&st.policy.model, rows, &o, func)?;
    // One teacher-forced rollout: scored for l, then replayed for the gradient.
    let ro = sft::teacher_forced(prompts, completions)?;
    let l = seq_logps(&st.policy, &ro, false, micro)?;
    let mut data = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        data.push(Row {
            l: l[i],
            l_ref: number(r, i, "l_ref", func)?,
            reward: number(r, i, "reward", func)?,
            v_hat: if method == "rpo" {
                number(r, i, "v_hat", func)?
            } else {
                0.0
            },
        });
    }
    // DRO's values, with the head's graph kept for its gradient.
    let values = match method.as_str() {
        "dro" => {
            let states = prompt_states(&st.policy.model.net, &ro.prompts)?;
            let head = st.policy.value_head.as_ref().expect("checked above");
            Some(if grad {
                head.forward(&states)?
            } else {
                tch::no_grad(|| head.forward(&states))?
            })
        }
        _ => None,
    };
    let (loss, dl) = match (method.as_str(), &values) {
        ("rpo", _) => offline::rpo(&data, o.finite("tau")?),
        ("dro", Some(v)) => offline::dro(
            &data,
            &Vec::<f64>::try_from(&v.f_detach()?.f_to_kind(Kind::Double)?)?,
            o.finite("tau")?,
        ),
        _ => offline::kto(
            &data,
            o.finite("beta")?,
            o.finite("lambda")?,
            o.finite("threshold")?,
        ),
    };
    let total: f64 = loss.iter().sum();
    if !grad {
        return Ok((None, total / loss.len() as f64));
    }
    // The replay's "advantage" -dL/dl makes its gradient the loss's.
    let adv: Vec<f64> = dl.iter().map(|d| -d).collect();
    let cfg = sft::config(crate::rl::loss_agg::Norm::SeqMeanTokenMean, micro);
    let sums = backward(&st.policy, &ro, &adv, &cfg).and_then(|mut s| {
        s.loss = total;
        if let Some(v) = &values {
            // dL_i/dV_i = -(residual_i) = dl_i / tau; the numerator's gradient
            // (finish divides by the rows, like the replay's).
            let tau = o.finite("tau")?;
            let dv: Vec<f32> = dl.iter().map(|d| (d / tau) as f32).collect();
            let dv = tch::Tensor::from_slice(&dv).f_to_device(v.device())?;
            v.f_mul(&dv)?.f_sum(Kind::Float)?.f_backward()?;
        }
        Ok(s)
    });
    let loss_cfg = cfg.loss.clone();
    Ok((
        Some(pend(m, &mut st, sums, &loss_cfg)?),
        total / loss.len() as f64,
    ))
}

/// (B, H) mean final hidden state over each prompt's tokens, no gradient.
fn prompt_states(net: &crate::model::Llama, prompts: &[Vec<i64>]) -> Result<tch::Tensor> {
    let _g = tch::no_grad_guard();
    let dev = net.embed_tokens.device();
    let mut rows = Vec::with_capacity(prompts.len());
    for p in prompts {
        let ids = tch::Tensor::from_slice(p)
            .f_view([1, -1])?
            .f_to_device(dev)?;
        let step = crate::model::Step::full(&ids.f_ones_like()?.f_to_kind(Kind::Bool)?)?;
        let h = net.forward(&net.embed(&ids)?, &step, None)?;
        rows.push(h.f_mean_dim([1].as_slice(), false, Kind::Float)?);
    }
    Ok(tch::Tensor::f_cat(&rows, 0)?)
}

/// DRO's value head: Linear(H, width) -> tanh -> Linear(width, 1) on the
/// mean prompt state, trained with the policy (its own optimizer group).
fn attach_value_head(m: &Backbone, o: Map) -> Result<()> {
    let o = Opts::check("attach_value_head", help::ATTACH_VALUE_HEAD, o)?;
    let mut st = m.0.borrow_mut();
    let net = &st.policy.model.net;
    let head = offline::ValueHead::new(
        net.cfg.hidden_size,
        o.positive("width")? as i64,
        o.usize("seed")? as u64,
        net.embed_tokens.device(),
    )?;
    st.policy.value_head = Some(head);
    Ok(())
}

/// Offline rows `{"prompt", "completion", "reward"}` from JSONL, each checked;
/// a bad one is named by file and line.
fn load_offline(path: &std::path::Path) -> Result<Array> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = Array::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}: malformed JSON: {e}", at()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("{}: a row must be a JSON object", at()))?;
        for k in ["prompt", "completion"] {
            if !obj.get(k).is_some_and(|x| x.is_string()) {
                bail!("{}: missing string field `{k}`", at());
            }
        }
        match obj.get("reward").and_then(|r| r.as_f64()) {
            Some(r) if r.is_finite() => {}
            _ => bail!("{}: `reward` must be a finite number", at()),
        }
        out.push(from_json(&v));
    }
    if out.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(out)
}
