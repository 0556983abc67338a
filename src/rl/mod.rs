//! Reinforcement learning: rewards, advantage estimators, KL estimators and
//! loss aggregation, the policy and its reference, gradients of the loss,
//! the optimizer and checkpoints. The training loop itself is the stdlib's
//! (`stdlib/tarpo.rhai`), over these primitives.
pub mod advantage;
pub mod checkpoint;
pub mod dapo;
pub mod data_parallel;
pub mod dataset;
pub mod kl;
pub mod loss;
pub mod loss_agg;
pub mod math_answer;
pub mod metrics;
pub mod offline;
pub mod optim;
pub mod policy;
pub mod registry;
pub mod reward;
pub mod rltt;
pub mod sandbox;
pub mod sft;
pub mod update;
