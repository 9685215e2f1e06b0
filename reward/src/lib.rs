//! Step 2 of InstructGPT: a reward model trained on human rankings.
