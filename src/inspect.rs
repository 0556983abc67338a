//! The `logits` and `info` commands' work (a module of the binary, beside
//! `main.rs`): last-position logits of a token sequence, and what a
//! checkpoint directory holds.
use anyhow::{bail, Result};
use std::path::Path;
use tarpo::model::{Model, ModelConfig, Tokenizer, Weights};
use tch::{Device, Kind, Tensor};

pub fn last_logits(m: &Model, ids: &[i64], at_loop: Option<usize>) -> Result<Vec<f32>> {
    let _g = tch::no_grad_guard();
    let vocab = m.net.cfg.vocab_size;
    if ids.is_empty() {
        bail!("--ids: no token ids given");
    }
    if let Some(t) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
        bail!("--ids: token id {t} is outside the vocabulary (0..{vocab})");
    }
    let dev = m.net.embed_tokens.device();
    let x = Tensor::from_slice(ids).view([1, -1]).to_device(dev);
    let valid = x.ones_like().to_kind(Kind::Bool);
    let step = tarpo::model::Step::full(&valid)?;
    let x = m.net.embed(&x)?;
    let h = match at_loop {
        None => m.net.forward(&x, &step, None)?,
        Some(n) => {
            let loops = m.net.cfg.loops;
            if n == 0 || n > loops {
                bail!("--loop {n}: the model has {loops} loop(s); give 1 to {loops}");
            }
            m.net.forward_loops(&x, &step, None)?.swap_remove(n - 1)
        }
    };
    let last = h.f_narrow(1, ids.len() as i64 - 1, 1)?;
    let logits = m
        .net
        .logits(&last)?
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_flatten(0, -1)?;
    Ok(Vec::<f32>::try_from(&logits)?)
}

pub fn info(dir: &Path) -> Result<()> {
    let cfg = ModelConfig::load(dir)?;
    let w = Weights::open(dir, Device::Cpu, Kind::Float)?;
    let (params, dtypes) = w.summary();
    let tok = Tokenizer::load(dir).map(|t| t.has_chat_template());
    println!("model          {}", dir.display());
    println!("architecture   {:?}", cfg.arch);
    println!(
        "parameters     {} ({:.1} M) stored as {}",
        params,
        params as f64 / 1e6,
        dtypes.join(", ")
    );
    println!("layers         {}", cfg.num_hidden_layers);
    if cfg.loops > 1 || cfg.arch == tarpo::model::config::Arch::Ouro {
        println!(
            "loops          {} (total_ut_steps; {} layer passes), early exit at cumulative p >= {}",
            cfg.loops,
            cfg.loops as i64 * cfg.num_hidden_layers,
            cfg.early_exit_threshold
        );
    }
    println!(
        "hidden         {} (intermediate {})",
        cfg.hidden_size, cfg.intermediate_size
    );
    println!(
        "heads          {} query, {} key/value, head_dim {}",
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    );
    println!("vocab          {}", cfg.vocab_size);
    println!(
        "rope           theta {} {:?}",
        cfg.rope_theta, cfg.rope_scaling
    );
    println!("tied embedding {}", cfg.tie_word_embeddings);
    println!(
        "biases         qkv {} o {} mlp {}",
        cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias
    );
    println!("rms_norm_eps   {}", cfg.rms_norm_eps);
    match tok {
        Ok(chat) => println!(
            "tokenizer      tokenizer.json, chat template: {}",
            if chat { "yes" } else { "no" }
        ),
        Err(e) => println!("tokenizer      unavailable: {e:#}"),
    }
    Ok(())
}
