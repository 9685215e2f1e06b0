//! Step 2 of InstructGPT: a reward model trained on rankings of responses with the
//! pairwise ranking loss over every pair of a ranking in one batch element, then
//! normalised so demonstrations score 0 on average.

pub mod eval;
pub mod loss;
pub mod train;

use common::scoring::last_token_scores;
use common::Model;
use data::preference::pad_right;

/// Raw rewards of `sequences`, scored in batches of `batch_size`.
pub fn score_sequences(
    model: &Model,
    sequences: &[Vec<i64>],
    batch_size: usize,
    pad_id: i64,
) -> Vec<f64> {
    let _guard = tch::no_grad_guard();
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        let refs: Vec<&[i64]> = chunk.iter().map(Vec::as_slice).collect();
        let (ids, mask) = pad_right(&refs, pad_id, model.device());
        let scores = last_token_scores(model, &ids, &mask).to_device(tch::Device::Cpu);
        out.extend(
            Vec::<f32>::try_from(scores)
                .expect("f32 scores")
                .into_iter()
                .map(f64::from),
        );
    }
    out
}
