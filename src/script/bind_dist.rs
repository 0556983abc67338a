//! Data parallelism in scripts: `world()`, and the collectives a loop needs
//! beyond the gradient all-reduce that `opt.step` does itself: `all_reduce`
//! of numbers, `all_gather` of values and rollouts, `barrier`.
use super::types::*;
use crate::dist::wire::{Reader, Writer};
use crate::dist::{self, Op};
use anyhow::{bail, Result};
use rhai::{Array, Dynamic, Engine, Map};
use std::rc::Rc;

pub fn register(engine: &mut Engine) {
    engine.register_fn("world", || {
        let w = dist::world();
        let mut m = Map::new();
        m.insert("rank".into(), (w.rank as i64).into());
        m.insert("size".into(), (w.size as i64).into());
        m.insert("local_rank".into(), (w.local_rank as i64).into());
        m
    });
    engine.register_fn("all_reduce", |x: Dynamic, op: &str| rt(all_reduce(x, op)));
    engine.register_fn("all_gather", |x: Dynamic| rt(all_gather(x)));
    engine.register_fn("barrier", || rt(dist::world().barrier("barrier")));
    engine.register_fn("bytes_reduced", || dist::bytes_reduced() as i64);
    engine.register_fn("draw_seed", |m: Backbone| {
        m.0.borrow_mut().rng.next_u64() as i64
    });
}

/// `all_reduce(x, "sum" | "mean" | "max" | "min")` of a number or an array
/// of numbers; returns floats shaped like x.
fn all_reduce(x: Dynamic, op: &str) -> Result<Dynamic> {
    let w = dist::world();
    let (mut xs, scalar) = match super::opts::as_f64(&x) {
        Some(v) => (vec![v], true),
        None => match x.clone().try_cast::<Array>() {
            Some(a) => (floats(&a, "all_reduce")?, false),
            None => bail!(
                "all_reduce: x must be a number or an array of numbers, got {}",
                x.type_name()
            ),
        },
    };
    let (code, mean) = match op {
        "sum" => (Op::Sum, false),
        "mean" => (Op::Sum, true),
        "max" => (Op::Max, false),
        "min" => (Op::Min, false),
        _ => bail!("all_reduce: op must be \"sum\", \"mean\", \"max\" or \"min\", got {op:?}"),
    };
    w.reduce_f64("all_reduce", &mut xs, code)?;
    if mean {
        xs.iter_mut().for_each(|v| *v /= w.size as f64);
    }
    Ok(if scalar {
        Dynamic::from_float(xs[0])
    } else {
        float_array(xs).into()
    })
}

/// `all_gather(x)`: every rank's x, in rank order. x is a unit, bool,
/// number, string, array or map of those, or a rollout (which arrives bound
/// to this rank's copy of the backbone).
fn all_gather(x: Dynamic) -> Result<Array> {
    let w = dist::world();
    let mut out = Writer::default();
    encode(&mut out, &x, "x")?;
    let parts = w.all_gather_bytes("all_gather", &out.0)?;
    let local = find_rollout(&x);
    parts
        .iter()
        .enumerate()
        .map(|(r, bytes)| {
            let mut rd = Reader::new(bytes);
            let v = decode(&mut rd, local.as_ref(), r)?;
            if !rd.done() {
                bail!("all_gather: rank {r} sent bytes after its value");
            }
            Ok(v)
        })
        .collect()
}

fn find_rollout(x: &Dynamic) -> Option<Backbone> {
    if let Some(ro) = x.clone().try_cast::<RolloutHandle>() {
        return Some(ro.0.backbone.clone());
    }
    if let Some(a) = x.clone().try_cast::<Array>() {
        return a.iter().find_map(find_rollout);
    }
    x.clone().try_cast::<Map>()?.values().find_map(find_rollout)
}

fn encode(w: &mut Writer, x: &Dynamic, at: &str) -> Result<()> {
    if x.is_unit() {
        w.u8(0);
    } else if let Ok(b) = x.as_bool() {
        w.u8(1);
        w.u8(b as u8);
    } else if let Ok(i) = x.as_int() {
        w.u8(2);
        w.i64(i);
    } else if let Ok(f) = x.as_float() {
        w.u8(3);
        w.f64(f);
    } else if x.is_string() {
        w.u8(4);
        w.str(&x.to_string());
    } else if let Some(a) = x.clone().try_cast::<Array>() {
        w.u8(5);
        w.len(a.len());
        for (i, v) in a.iter().enumerate() {
            encode(w, v, &format!("{at}[{i}]"))?;
        }
    } else if let Some(m) = x.clone().try_cast::<Map>() {
        w.u8(6);
        w.len(m.len());
        for (k, v) in &m {
            w.str(k);
            encode(w, v, &format!("{at}.{k}"))?;
        }
    } else if let Some(ro) = x.clone().try_cast::<RolloutHandle>() {
        w.u8(7);
        rollout(w, &ro.0);
    } else {
        bail!("all_gather: {at} is a {}, which cannot be sent (numbers, strings, arrays, maps and rollouts can)", x.type_name());
    }
    Ok(())
}

fn rollout(w: &mut Writer, d: &RolloutData) {
    w.rollout(&d.ro);
    w.i64(d.group as i64);
    w.i64(d.max_new as i64);
    w.len(d.items.len());
    for it in &d.items {
        w.str(&it.prompt);
        w.str(&it.answer);
        w.i64(it.id);
        w.len(it.fields.len());
        for (k, v) in &it.fields {
            w.str(k);
            w.str(v);
        }
    }
    w.len(d.texts.len());
    d.texts.iter().for_each(|t| w.str(t));
}

fn decode(r: &mut Reader, backbone: Option<&Backbone>, rank: usize) -> Result<Dynamic> {
    Ok(match r.u8()? {
        0 => Dynamic::UNIT,
        1 => (r.u8()? != 0).into(),
        2 => r.i64()?.into(),
        3 => r.f64()?.into(),
        4 => r.str()?.into(),
        5 => {
            let n = r.len(1)?;
            let a: Array = (0..n)
                .map(|_| decode(r, backbone, rank))
                .collect::<Result<_>>()?;
            a.into()
        }
        6 => {
            let n = r.len(1)?;
            let mut m = Map::new();
            for _ in 0..n {
                let k = r.str()?;
                m.insert(k.into(), decode(r, backbone, rank)?);
            }
            m.into()
        }
        7 => {
            let Some(b) = backbone else {
                bail!("all_gather: rank {rank} sent a rollout and this rank's value holds none (its backbone is needed to receive one)");
            };
            Dynamic::from(read_rollout(r, b)?)
        }
        t => bail!("all_gather: rank {rank} sent an unknown value tag {t}"),
    })
}

fn read_rollout(r: &mut Reader, b: &Backbone) -> Result<RolloutHandle> {
    let ro = r.rollout()?;
    let (group, max_new) = (r.i64()? as usize, r.i64()? as usize);
    let n = r.len(1)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let (prompt, answer, id) = (r.str()?, r.str()?, r.i64()?);
        let k = r.len(1)?;
        let mut fields = std::collections::BTreeMap::new();
        for _ in 0..k {
            fields.insert(r.str()?, r.str()?);
        }
        items.push(PromptItem {
            prompt,
            answer,
            id,
            fields,
        });
    }
    let n = r.len(1)?;
    let texts = (0..n).map(|_| r.str()).collect::<Result<_>>()?;
    Ok(RolloutHandle(Rc::new(RolloutData {
        ro,
        group,
        items,
        texts,
        max_new,
        backbone: b.clone(),
        made: None,
    })))
}
