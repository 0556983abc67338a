//! Reinforcement learning: rewards, advantage estimators, KL estimators and
//! loss aggregation, and the optimizer.
pub mod advantage;
pub mod checkpoint;
pub mod dataset;
pub mod kl;
pub mod loss;
pub mod loss_agg;
pub mod metrics;
pub mod optim;
pub mod registry;
pub mod reward;
pub mod train;
pub mod update;
