//! Decoding policies: sampling, the router, soft mixtures, the rollout engine
//! and its teacher-forced replay.
pub mod generate;
pub mod mix;
pub mod replay;
pub mod rollout;
pub mod router;
pub mod sampler;

pub use generate::{generate, GenerateOptions};
pub use rollout::{rollout, Rollout, RolloutOptions, TokenRecord};
pub use router::Router;
pub use sampler::{Rng, Sampling};
