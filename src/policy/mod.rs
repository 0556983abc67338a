//! Decoding policies: sampling, the router, soft mixtures, the rollout engine
//! (TARPO's router and the Soft Thinking, Coconut and HRPO latent modes) and
//! its teacher-forced replay.
pub mod generate;
pub mod hrpo;
pub mod mix;
pub mod replay;
pub mod rollout;
pub mod router;
pub mod sampler;

pub use generate::{generate, GenerateOptions};
pub use hrpo::HrpoGate;
pub use rollout::{
    rollout, rollout_with, Latent, LatentRecord, Rollout, RolloutOptions, TokenRecord,
};
pub use router::Router;
pub use sampler::{Rng, Sampling};
