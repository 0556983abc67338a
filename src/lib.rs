//! tarpo: a research workbench for RL fine-tuning of language models that
//! reason partly in latent space (TARPO and its baselines).
//!
//! Layers, lowest first (lower layers never call upward):
//! `ctl` (interrupt, progress), `rng` (the seeded generator), `fsio`
//! (crash-safe files) and `faults` (the crash tests' injection points) ->
//! `model` (checkpoints, decoder, KV cache, tokenizer) -> `policy` (router,
//! rollouts, replay) -> `rl` (rewards, advantages, losses, optimizer,
//! checkpoints) -> `analysis` (frames, charts) -> `script` (Rhai bindings,
//! stdlib) -> `repl` and the CLI in `main.rs`.
pub mod analysis;
pub mod ctl;
pub mod data;
pub mod dist;
pub mod faults;
pub mod fsio;
pub mod model;
pub mod policy;
pub mod repl;
pub mod rl;
pub mod rng;
pub mod script;
