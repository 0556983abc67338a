//! tarpo: a research workbench for RL fine-tuning of language models that
//! reason partly in latent space (TARPO and its baselines).
//!
//! Layers, lowest first (lower layers never call upward):
//! `model` (checkpoints, decoder, KV cache, tokenizer) -> `policy` (sampling,
//! rollouts) -> the CLI in `main.rs`.
pub mod model;
pub mod policy;
pub mod rl;
