//! Step 1 of InstructGPT: supervised fine-tuning on demonstrations.
