//! Decoding policies: sampling, the router, soft mixtures, the rollout engine
//! (TARPO's router and the Soft Thinking, Coconut and HRPO latent modes) and
//! its teacher-forced replay.
pub mod counterfactual;
pub mod generate;
pub mod hrpo;
pub mod latent;
pub mod mix;
pub mod records;
pub mod replay;
pub mod rollout;
pub mod router;
pub mod sampler;
pub mod step_stats;

pub use generate::{generate, GenerateOptions};
pub use hrpo::HrpoGate;
pub use latent::Latent;
pub use records::{LatentRecord, Rollout, TokenRecord, HARD, LATENT, SOFT};
pub use rollout::{rollout, rollout_observed, rollout_with, Observer, RolloutOptions};
pub use router::Router;
pub use sampler::{Rng, Sampling};
