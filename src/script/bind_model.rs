//! Backbones, routers, gates and data sets in scripts: `load_backbone`,
//! `attach_router`, `attach_hrpo_gate`, `load_dataset` and their methods.
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::model::device::{parse_device, parse_dtype};
use crate::model::{LoraConfig, Message, Model, Tokenizer};
use crate::policy::{generate, GenerateOptions, HrpoGate, Router, Sampling};
use crate::rl::dataset::{Dataset, Sampler};
use anyhow::{bail, Context, Result};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

type Res<T> = Result<T, Box<EvalAltResult>>;

pub fn register(engine: &mut Engine) {
    engine
        .register_type_with_name::<Backbone>("Backbone")
        .register_type_with_name::<RouterHandle>("Router")
        .register_type_with_name::<DatasetHandle>("Dataset");
    engine.register_fn("load_backbone", || {
        rt(load_backbone(&default_path(), Map::new()))
    });
    engine.register_fn("load_backbone", |o: Map| {
        rt(load_backbone(&default_path(), o))
    });
    engine.register_fn("default_model", default_path);
    engine.register_fn("looped_model", || {
        crate::model::looped_dir().display().to_string()
    });
    engine.register_fn("load_backbone", |p: &str| rt(load_backbone(p, Map::new())));
    engine.register_fn("load_backbone", |p: &str, o: Map| rt(load_backbone(p, o)));
    engine.register_fn("attach_router", |m: Backbone| {
        rt(attach_router(&m, Map::new()))
    });
    engine.register_fn("attach_router", |m: Backbone, o: Map| {
        rt(attach_router(&m, o))
    });
    engine.register_fn("attach_loop_weights", |m: Backbone| {
        rt(attach_loop_weights(&m, Map::new()))
    });
    engine.register_fn("attach_loop_weights", |m: Backbone, o: Map| {
        rt(attach_loop_weights(&m, o))
    });
    engine.register_fn("attach_hrpo_gate", |m: Backbone| {
        rt(attach_gate(&m, Map::new()))
    });
    engine.register_fn("attach_hrpo_gate", |m: Backbone, o: Map| {
        rt(attach_gate(&m, o))
    });
    engine.register_fn("to_dataset", |rows: Array| {
        rt(to_dataset(&rows, Map::new()))
    });
    engine.register_fn("to_dataset", |rows: Array, o: Map| rt(to_dataset(&rows, o)));
    engine.register_fn("load_dataset", |p: &str| rt(load_dataset(p, Map::new())));
    engine.register_fn("load_dataset", |p: &str, o: Map| rt(load_dataset(p, o)));

    engine.register_fn("generate", |m: &mut Backbone, p: &str| {
        rt(generate_text(m, p, Map::new()))
    });
    engine.register_fn("generate", |m: &mut Backbone, p: &str, o: Map| {
        rt(generate_text(m, p, o))
    });
    engine.register_fn("tokenize", |m: &mut Backbone, text: &str| -> Res<Array> {
        let ids = rt(m.0.borrow().policy.model.tok.encode(text, false))?;
        Ok(int_array(ids))
    });
    engine.register_fn("decode", |m: &mut Backbone, ids: Array| -> Res<String> {
        let ids = rt(ints(&ids, "ids"))?;
        rt(m.0.borrow().policy.model.tok.decode(&ids, false))
    });
    engine.register_fn("save_adapter", |m: &mut Backbone, dir: &str| {
        rt(m.0.borrow().policy.model.save_lora(Path::new(dir)))
    });
    engine.register_fn("export_merged", |m: &mut Backbone, dir: &str| {
        rt(m.0.borrow().policy.model.export_merged(Path::new(dir)))
    });
    // The model as trained, as a normal HF directory (adapters merged).
    engine.register_fn("save", |m: &mut Backbone, dir: &str| {
        rt(m.0.borrow().policy.model.export_merged(Path::new(dir)))
    });
    engine.register_get("info", |m: &mut Backbone| info(m));
    engine.register_fn("param_norms", |m: &mut Backbone| rt(param_norms(m)));
    engine.register_get("has_router", |m: &mut Backbone| {
        m.0.borrow().policy.router.is_some()
    });
    engine.register_get("has_loop_weights", |m: &mut Backbone| {
        m.0.borrow().policy.loop_logits.is_some()
    });
    // RLTT's learned loop weights (softmax of the logits), () without them.
    engine.register_get("loop_weights", |m: &mut Backbone| -> Res<Dynamic> {
        match &m.0.borrow().policy.loop_logits {
            Some(th) => {
                let w = rt(th
                    .f_softmax(0, tch::Kind::Float)
                    .map_err(anyhow::Error::from))?;
                let w = rt(Vec::<f64>::try_from(&w.to_kind(tch::Kind::Double))
                    .map_err(anyhow::Error::from))?;
                Ok(Dynamic::from_array(
                    w.into_iter().map(Dynamic::from_float).collect(),
                ))
            }
            None => Ok(Dynamic::UNIT),
        }
    });
    engine.register_get("router", |m: &mut Backbone| -> Res<RouterHandle> {
        if m.0.borrow().policy.router.is_none() {
            return rt(Err(anyhow::anyhow!(
                "this backbone has no router: attach_router(m) first"
            )));
        }
        Ok(RouterHandle(m.clone()))
    });
    engine.register_fn("to_string", |m: &mut Backbone| describe(m));
    engine.register_fn("to_debug", |m: &mut Backbone| describe(m));

    engine.register_get("p_soft", |r: &mut RouterHandle| rt(router_p_soft(r)));
    engine.register_get("bias", |r: &mut RouterHandle| -> Res<Array> {
        let st = r.0 .0.borrow();
        let b = rt(router_of(&st.policy).and_then(|r| Ok(Vec::<f32>::try_from(&r.bias)?)))?;
        Ok(float_array(b.into_iter().map(f64::from)))
    });
    engine.register_fn("to_string", |r: &mut RouterHandle| {
        format!(
            "Router(p_soft at h = 0: {:.4})",
            router_p_soft(r).unwrap_or(f64::NAN)
        )
    });

    engine.register_fn("len", |d: &mut DatasetHandle| d.data.len() as i64);
    engine.register_get("len", |d: &mut DatasetHandle| d.data.len() as i64);
    engine.register_fn("sample", |d: &mut DatasetHandle, n: i64| rt(sample(d, n)));
    engine.register_fn("get", |d: &mut DatasetHandle, i: i64| rt(row(d, i)));
    engine.register_indexer_get(|d: &mut DatasetHandle, i: i64| rt(row(d, i)));
    engine.register_fn(
        "rows",
        |d: &mut DatasetHandle, start: i64, n: i64| -> Res<Array> {
            let end = (start.max(0) + n.max(0)).min(d.data.len() as i64);
            (start.max(0)..end).map(|i| rt(row(d, i))).collect()
        },
    );
    engine.register_fn("to_string", |d: &mut DatasetHandle| {
        format!("Dataset({} rows from {})", d.data.len(), d.path.display())
    });
}

/// The embedded default model's directory.
fn default_path() -> String {
    crate::model::default_dir().display().to_string()
}

fn load_backbone(path: &str, o: Map) -> Result<Backbone> {
    let o = Opts::check("load_backbone", help::LOAD_BACKBONE, o)?;
    let device = parse_device(&o.str("device")?)?;
    let dtype = parse_dtype(&o.str("dtype")?)?;
    let mut model = Model::load(Path::new(path), device, dtype)?;
    if let Some(l) = o.map("lora") {
        let l = Opts::check("load_backbone: lora", help::LORA, l)?;
        let mut cfg = LoraConfig::new(l.int("rank")?, l.float("alpha")?);
        cfg.seed = l.usize("seed")? as u64;
        if let Some(t) = l.raw("targets") {
            let t = t.cast::<Array>();
            cfg.targets = t.iter().map(|x| x.to_string()).collect();
        }
        model.net.attach_lora(&cfg)?;
    }
    if let Some(dir) = o.opt_str("adapter")? {
        model.load_lora(Path::new(&dir))?;
    }
    let patterns = train_patterns(&o, model.net.has_lora())?;
    model.net.set_trainable(&patterns)?;
    Ok(Backbone::new(model, o.usize("seed")? as u64))
}

/// The base weights `train` selects: all of them by default without LoRA
/// (full fine-tuning, as TRL does without a PEFT config), none with LoRA or
/// for "none" (router-only training), or the listed name patterns.
fn train_patterns(o: &Opts, lora: bool) -> Result<Vec<String>> {
    let Some(v) = o.raw("train") else {
        return Ok(if lora { vec![] } else { vec!["*".into()] });
    };
    let patterns: Vec<String> = if v.is_string() {
        match v.to_string().as_str() {
            "all" => vec!["*".into()],
            "none" => vec![],
            other => bail!(
                "load_backbone: train must be \"all\", \"none\" or an array of weight-name patterns, got {other:?}"
            ),
        }
    } else if let Some(a) = v.clone().try_cast::<Array>() {
        a.iter()
            .enumerate()
            .map(|(i, p)| {
                p.clone().into_string().map_err(|t| {
                    anyhow::anyhow!("load_backbone: train[{i}] must be a string pattern, got {t}")
                })
            })
            .collect::<Result<_>>()?
    } else {
        bail!(
            "load_backbone: train must be \"all\", \"none\" or an array of weight-name patterns, got {}",
            v.type_name()
        );
    };
    if lora && !patterns.is_empty() {
        bail!("load_backbone: with lora the base weights are frozen; drop `train` or `lora`");
    }
    Ok(patterns)
}

fn attach_router(m: &Backbone, o: Map) -> Result<RouterHandle> {
    let o = Opts::check("attach_router", help::ATTACH_ROUTER, o)?;
    let mut st = m.0.borrow_mut();
    if st.policy.gate.is_some() {
        bail!("this backbone has an HRPO gate: a router and a gate are different methods");
    }
    let net = &st.policy.model.net;
    let router = Router::new(
        net.cfg.hidden_size,
        o.float("init_soft")?,
        o.float("temperature")?,
        o.usize("seed")? as u64,
        net.embed_tokens.device(),
    )?;
    st.policy.router_ref = Some(router.frozen_copy()?);
    st.policy.router = Some(router);
    drop(st);
    Ok(RouterHandle(m.clone()))
}

/// RLTT's learned loop weighting: T trainable logits (tarpo_loss with
/// `loops: "learned"` reads their softmax).
fn attach_loop_weights(m: &Backbone, o: Map) -> Result<()> {
    let o = Opts::check("attach_loop_weights", help::ATTACH_LOOP_WEIGHTS, o)?;
    let mut st = m.0.borrow_mut();
    let loops = st.policy.model.net.cfg.loops;
    if loops < 2 {
        bail!("attach_loop_weights: this model has {loops} loop; RLTT's weights are for looped models (total_ut_steps >= 2)");
    }
    let start = match o.choice("init", &["uniform", "progressive"])?.as_str() {
        "uniform" => None,
        _ => Some(o.finite("alpha")?),
    };
    let theta = crate::rl::rltt::initial_logits(loops, start)?
        .f_to_device(st.policy.model.net.embed_tokens.device())?
        .set_requires_grad(true);
    st.policy.loop_logits = Some(theta);
    Ok(())
}

fn attach_gate(m: &Backbone, o: Map) -> Result<()> {
    let o = Opts::check("attach_hrpo_gate", help::ATTACH_HRPO_GATE, o)?;
    let mut st = m.0.borrow_mut();
    if st.policy.router.is_some() {
        bail!("this backbone has a router: a router and an HRPO gate are different methods");
    }
    let net = &st.policy.model.net;
    let gate = HrpoGate::new(
        net.cfg.hidden_size,
        o.usize("seed")? as u64,
        net.embed_tokens.device(),
    )?;
    st.policy.gate = Some(gate);
    Ok(())
}

fn router_of(p: &crate::rl::policy::Policy) -> Result<&Router> {
    p.router
        .as_ref()
        .context("this backbone has no router: attach_router(m) first")
}

/// pi_r(soft) where W h = 0: what the bias alone gives.
fn router_p_soft(r: &RouterHandle) -> Result<f64> {
    let st = r.0 .0.borrow();
    let router = router_of(&st.policy)?;
    let b = Vec::<f32>::try_from(&router.bias)?;
    let t = router.temperature;
    let (hard, soft) = (b[0] as f64 / t, b[1] as f64 / t);
    Ok(1.0 / (1.0 + (hard - soft).exp()))
}

/// The prompt as token ids: the chat template around it, or the raw text.
pub fn encode_prompt(
    tok: &Tokenizer,
    text: &str,
    chat: Option<bool>,
    system: Option<&str>,
) -> Result<Vec<i64>> {
    // Unset: the template when there is one (base models often have none).
    if !chat.unwrap_or_else(|| tok.has_chat_template()) {
        return tok.encode(text, true);
    }
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(Message::new("system", s));
    }
    msgs.push(Message::new("user", text));
    let rendered = tok.apply_chat_template(&msgs, true)?;
    tok.encode(&rendered, false)
}

fn generate_text(m: &Backbone, prompt: &str, o: Map) -> Result<String> {
    let o = Opts::check("generate", help::GENERATE, o)?;
    let st = m.0.borrow();
    let model = &st.policy.model;
    let ids = encode_prompt(
        &model.tok,
        prompt,
        o.opt_bool("chat")?,
        o.opt_str("system")?.as_deref(),
    )?;
    let opts = GenerateOptions {
        max_new: o.usize("max_new")?,
        sampling: Sampling {
            temperature: o.float("temperature")?,
            top_k: o.int("top_k")?,
            top_p: o.float("top_p")?,
        },
        seed: o.usize("seed")? as u64,
        eos: model.eos.clone(),
    };
    let out = generate(&model.net, &[ids], &opts)?;
    model.tok.decode(&out[0], true)
}

fn info(m: &Backbone) -> Map {
    let st = m.0.borrow();
    let p = &st.policy;
    let c = &p.model.net.cfg;
    let mut map = Map::new();
    map.insert("path".into(), p.model.dir.display().to_string().into());
    map.insert("layers".into(), c.num_hidden_layers.into());
    map.insert("hidden".into(), c.hidden_size.into());
    map.insert("vocab".into(), c.vocab_size.into());
    map.insert("lora".into(), p.model.net.has_lora().into());
    let trained = p.model.net.trainable();
    map.insert("trainable".into(), (trained.len() as i64).into());
    map.insert("router".into(), p.router.is_some().into());
    map.insert("hrpo_gate".into(), p.gate.is_some().into());
    map
}

/// The L2 norm of each group of trainable parameters (the optimizer's
/// groups: lora, backbone, backbone_no_decay, router_weight, router_bias,
/// hrpo_gate), to watch what training moves.
fn param_norms(m: &Backbone) -> Result<Map> {
    let st = m.0.borrow();
    let mut out = Map::new();
    for g in crate::rl::policy::param_groups(&st.policy, 0.0, 0.0, 0.0) {
        let sq: f64 = g
            .params
            .iter()
            .map(|t| {
                Ok(t.f_detach()?
                    .f_square()?
                    .f_sum(tch::Kind::Double)?
                    .double_value(&[]))
            })
            .sum::<Result<f64>>()?;
        out.insert(g.name.into(), sq.sqrt().into());
    }
    Ok(out)
}

fn describe(m: &Backbone) -> String {
    let i = info(m);
    let get = |k: &str| i.get(k).map(|v| v.to_string()).unwrap_or_default();
    format!(
        "Backbone({}, {} layers, hidden {}, lora: {}, router: {})",
        get("path"),
        get("layers"),
        get("hidden"),
        get("lora"),
        get("router")
    )
}

fn load_dataset(path: &str, o: Map) -> Result<DatasetHandle> {
    let o = Opts::check("load_dataset", help::LOAD_DATASET, o)?;
    Ok(DatasetHandle {
        data: Rc::new(Dataset::load(Path::new(path))?),
        sampler: Rc::new(RefCell::new(Sampler::new(o.usize("seed")? as u64))),
        path: path.into(),
    })
}

/// A data set of in-memory rows (#{prompt, answer, ...} maps), sampled like a file's.
fn to_dataset(rows: &Array, o: Map) -> Result<DatasetHandle> {
    let o = Opts::check("to_dataset", help::LOAD_DATASET, o)?;
    let rows = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let v = to_json(r, &format!("rows[{i}]"))?;
            crate::rl::dataset::Row::from_json(&v)
                .map_err(|e| anyhow::anyhow!("to_dataset: rows[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if rows.is_empty() {
        bail!("to_dataset: no rows");
    }
    Ok(DatasetHandle {
        data: Rc::new(Dataset { rows }),
        sampler: Rc::new(RefCell::new(Sampler::new(o.usize("seed")? as u64))),
        path: "<memory>".into(),
    })
}

fn row(d: &DatasetHandle, i: i64) -> Result<Dynamic> {
    let n = d.data.len() as i64;
    if i < 0 || i >= n {
        bail!("dataset index {i} out of range (0..{n})");
    }
    let r = &d.data.rows[i as usize];
    let mut m = Map::new();
    for (k, v) in &r.extra {
        m.insert(k.into(), from_json(v));
    }
    m.insert("id".into(), i.into());
    m.insert("prompt".into(), r.prompt.clone().into());
    m.insert("answer".into(), r.answer.clone().into());
    Ok(m.into())
}

/// The next `n` rows of the shuffled order (epochs wrap around).
fn sample(d: &DatasetHandle, n: i64) -> Result<Array> {
    if n <= 0 {
        bail!("ds.sample(n): n must be >= 1, got {n}");
    }
    let idx = d.sampler.borrow_mut().next(d.data.len(), n as usize)?;
    idx.into_iter().map(|i| row(d, i as i64)).collect()
}
