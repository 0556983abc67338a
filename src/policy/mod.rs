//! Decoding policies: sampling and the rollout engine.
pub mod generate;
pub mod sampler;

pub use generate::{generate, GenerateOptions};
pub use sampler::{Rng, Sampling};
