//! Reinforcement learning: rewards, advantage estimators, KL estimators and
//! loss aggregation.
pub mod advantage;
pub mod kl;
pub mod loss_agg;
pub mod reward;
