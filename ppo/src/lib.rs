//! Step 3 of InstructGPT: PPO against a reward model with a per-token KL penalty to the
//! frozen SFT policy, a value model initialised from the reward model, GAE, clipped policy
//! and value losses, an adaptive or fixed KL coefficient, and optionally PPO-ptx.
//!
//! `train` runs the loop; `rollout`, `math` (rewards, advantage estimators, losses), and
//! `update` (the minibatch passes over the policy and the optional critic) are its steps.

pub mod a2po;
pub mod args;
mod log;
pub mod math;
pub use common::python_str;
pub mod reward_fn;
pub mod rollout;
pub mod sdft;
mod sources;
pub mod tools;
pub mod train;
pub mod update;
