//! Step 3 of InstructGPT: PPO against the reward model with a KL penalty.
