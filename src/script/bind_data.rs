//! Making data and models from scratch in scripts: `arith_problems`,
//! `write_jsonl`, `train_tokenizer`, `new_model`.
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::data::arith::{self, ArithConfig};
use crate::model::scratch::{self, ScratchConfig};
use anyhow::{bail, Result};
use rhai::{Array, Dynamic, Engine, Map};
use std::path::Path;

pub fn register(engine: &mut Engine) {
    engine.register_fn("arith_problems", |n: i64| rt(arith_problems(n, Map::new())));
    engine.register_fn("arith_problems", |n: i64, o: Map| rt(arith_problems(n, o)));
    engine.register_fn("write_jsonl", |rows: Array, path: &str| {
        rt(write_jsonl(&rows, path))
    });
    engine.register_fn("train_tokenizer", |texts: Array, path: &str| {
        rt(train_tokenizer(&texts, path, Map::new()))
    });
    engine.register_fn("train_tokenizer", |texts: Array, path: &str, o: Map| {
        rt(train_tokenizer(&texts, path, o))
    });
    engine.register_fn("new_model", |dir: &str, o: Map| rt(new_model(dir, o)));
}

/// `n` arithmetic word problems as #{prompt, answer, solution, steps} maps.
fn arith_problems(n: i64, o: Map) -> Result<Array> {
    if n < 0 {
        bail!("arith_problems: n must be >= 0, got {n}");
    }
    let rows = arith::generate(n as usize, &arith_config(o)?)?;
    let json = serde_json::to_value(&rows)?;
    Ok(from_json(&json).cast::<Array>())
}

fn arith_config(o: Map) -> Result<ArithConfig> {
    let o = Opts::check("arith_problems", help::ARITH, o)?;
    Ok(ArithConfig {
        min_steps: o.positive("min_steps")?,
        max_steps: o.positive("max_steps")?,
        max_operand: o.int("max_operand")?,
        max_value: o.int("max_value")?,
        distractors: o.usize("distractors")?,
        slips: o.float("slips")?,
        seed: o.usize("seed")? as u64,
    })
}

/// Writes an array of maps as JSONL (a data set `load_dataset` reads).
fn write_jsonl(rows: &Array, path: &str) -> Result<()> {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| to_json(r, &format!("rows[{i}]")))
        .collect::<Result<_>>()?;
    crate::data::write_jsonl(Path::new(path), &rows)
}

fn train_tokenizer(texts: &Array, path: &str, o: Map) -> Result<()> {
    let o = Opts::check("train_tokenizer", help::TRAIN_TOKENIZER, o)?;
    let texts: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.clone().into_string().map_err(|ty| {
                anyhow::anyhow!("train_tokenizer: texts[{i}] must be a string, got {ty}")
            })
        })
        .collect::<Result<_>>()?;
    scratch::train_tokenizer(&texts, o.positive("vocab")?, Path::new(path))
}

/// Writes a fresh Qwen2 model directory; returns its parameter count.
fn new_model(dir: &str, o: Map) -> Result<Dynamic> {
    let o = Opts::check("new_model", help::NEW_MODEL, o)?;
    let cfg = ScratchConfig {
        hidden: o.positive("hidden")? as i64,
        layers: o.positive("layers")? as i64,
        heads: o.positive("heads")? as i64,
        kv_heads: o.positive("kv_heads")? as i64,
        intermediate: o.positive("intermediate")? as i64,
        max_positions: o.positive("max_positions")? as i64,
        seed: o.usize("seed")? as u64,
        loops: o.positive("loops")? as i64,
    };
    let tok = o.str("tokenizer")?;
    Ok(scratch::new_model(Path::new(dir), Path::new(&tok), &cfg)?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option table's defaults (what scripts get) are the task's own
    /// (what `tarpo data arith` gets).
    #[test]
    fn arith_option_defaults_are_the_task_defaults() {
        let cfg = arith_config(Map::new()).unwrap();
        assert_eq!(
            cfg,
            ArithConfig {
                seed: cfg.seed,
                ..ArithConfig::default()
            }
        );
    }
}
