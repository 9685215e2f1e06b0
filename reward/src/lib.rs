//! Step 2 of InstructGPT: a reward model trained on rankings of responses with the
//! pairwise ranking loss over every pair of a ranking in one batch element, then
//! normalised so demonstrations score 0 on average.

pub mod eval;
pub mod loss;
pub mod train;

pub use common::scoring::score_sequences;
