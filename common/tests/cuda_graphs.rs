//! CUDA-graph decoding against eager decoding (issue 20). Needs a CUDA device: elsewhere
//! the test says it was skipped and passes.

use common::generate::{generate, SamplingConfig};
use common::{Head, Model, ModelConfig, ModelOptions};
use tch::{Device, Kind, Tensor};

fn model(kind: Kind) -> Model {
    tch::manual_seed(7);
    let config = serde_json::json!({"model_type": "qwen2", "vocab_size": 512,
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": true});
    let config = ModelConfig::from_json(config, std::path::Path::new("config.json")).unwrap();
    Model::new(config, &ModelOptions::new(Head::Lm, Device::Cuda(0), kind))
}

#[test]
fn graphs_decode_as_eager_does() {
    if !tch::Cuda::is_available() {
        eprintln!("cuda_graphs: skipped, no CUDA device here");
        return;
    }
    assert!(
        common::cuda_graph::available(),
        "this build has no CUDA graph shim (libtorch without CUDA headers at build time)"
    );
    // 16 rows, left padding from 0 to 15 positions, 40 new tokens, EOS 3 ends some early.
    let lengths: Vec<i64> = (0..16).map(|i| 24 - i).collect();
    let ids = Tensor::randint_low(4, 512, [16, 24], (Kind::Int64, Device::Cpu));
    let mask = Tensor::stack(
        &lengths
            .iter()
            .map(|&l| Tensor::arange(24, (Kind::Int64, Device::Cpu)).ge(24 - l))
            .collect::<Vec<_>>(),
        0,
    )
    .to_kind(Kind::Int64);
    let ids = ids * &mask;
    for (kind, tolerance) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
        let model = model(kind);
        // (The repetition penalty's token set is updated in place inside the graph.)
        for (temperature, repetition_penalty) in [(0.0, 1.0), (1.0, 1.0), (1.0, 1.3)] {
            let cfg = |cuda_graph| SamplingConfig {
                max_new_tokens: 40,
                temperature,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                repetition_penalty,
                eos_ids: vec![3],
                pad_id: 0,
                seed: 5,
                cuda_graph,
            };
            let eager = generate(&model, &ids, &mask, &cfg(false));
            let graphs = generate(&model, &ids, &mask, &cfg(true));
            let what = format!("{kind:?} temperature {temperature} penalty {repetition_penalty}");
            assert!(eager.tokens.equal(&graphs.tokens), "{what}: tokens differ");
            assert_eq!(eager.lengths, graphs.lengths, "{what}");
            let diff = (&eager.logprobs - &graphs.logprobs)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff <= tolerance, "{what}: log-probs differ by {diff}");
            eprintln!(
                "{what}: same tokens, log-prob difference {diff:e}, lengths {:?}",
                graphs.lengths
            );
        }
    }
}
