//! A reward model of another family than the policy (its own vocabulary and chat template)
//! scores responses as TRL 1.16's `GRPOTrainer` has one score them: the conversation with the
//! response as the assistant's turn, rendered by the reward model's template and tokenized
//! without special tokens (a plain prompt joined to the response), read at the last token.
//! Checked against TRL's own code on `transformers` (`tests/python/reward_tokenizer_reference.py`),
//! on hand-made cases and on the responses a GRPO run sampled; GAE, whose value model would
//! start from that reward model, is refused in one line.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::scoring::Normalization;
use common::{Head, Model, ModelOptions};
use data::formats::{Content, Message, PromptExample, PromptFields, TemplateArgs};
use ppo::reward_fn::{own_tokens, RewardFunction, RewardInput, RewardModel};
use serde_json::{json, Value};

struct Fixture {
    root: PathBuf,
    policy: PathBuf,
    reward: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reward-tokenizer");
        rlhf_tests::tiny_llama_fixture(&root);
        let reward = root.join("reward");
        rlhf_tests::run_python(
            "reward_tokenizer_reference.py",
            &["make", "--out", reward.to_str().unwrap()],
        );
        Fixture {
            policy: root.join("model"),
            root,
            reward,
        }
    })
}

/// TRL's rewards of `cases` ({"prompt", "completion"}), each with its case and text.
fn trl_scores(cases: &[Value], name: &str) -> Vec<Value> {
    let f = fixture();
    let file = f.root.join(format!("{name}.json"));
    std::fs::write(&file, Value::Array(cases.to_vec()).to_string()).unwrap();
    let out = rlhf_tests::run_python(
        "reward_tokenizer_reference.py",
        &[
            "score",
            "--model",
            f.reward.to_str().unwrap(),
            "--cases",
            file.to_str().unwrap(),
        ],
    );
    out.as_array().unwrap().clone()
}

fn example(prompt: &Value) -> PromptExample {
    let prompt = match prompt {
        Value::String(s) => Content::Text(s.clone()),
        Value::Array(messages) => Content::Messages(
            messages
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect(),
        ),
        other => panic!("a prompt: {other}"),
    };
    PromptExample {
        prompt,
        template: TemplateArgs::default(),
    }
}

/// Our scores of TRL's cases, in one padded batch.
fn our_scores(cases: &[Value]) -> Vec<f64> {
    let f = fixture();
    let options = ModelOptions::new(Head::Score, tch::Device::Cpu, tch::Kind::Float).frozen();
    let (model, tok) = Model::load_with_tokenizer(&f.reward, &options).unwrap();
    let policy_tok = data::Tokenizer::load(&f.policy).unwrap();
    assert!(!policy_tok.same_vocabulary(&tok));
    let examples: Vec<PromptExample> = cases.iter().map(|c| example(&c["prompt"])).collect();
    let (texts, messages): (Vec<String>, Vec<Vec<Value>>) = cases.iter().map(response).unzip();
    let n = cases.len();
    let reward = RewardModel {
        normalization: Normalization::of(&model),
        model: &model,
        pad_id: tok.pad_id,
        batch_size: n,
        without_adapters: false,
        own_tokenizer: Some(&tok),
    };
    let input = RewardInput {
        prompts: &vec![vec![]; n],
        responses: &vec![vec![]; n],
        completion_ids: &vec![vec![]; n],
        texts: &texts,
        fields: &vec![PromptFields::new(); n],
        ended_with_eos: &vec![true; n],
        examples: Some(&examples),
        step: None,
        messages: Some(&messages),
    };
    reward.scores(&input).unwrap()
}

/// A case's completion as a response: its text, and its messages (a text as the
/// assistant's; messages, as after tools, with no text of their own).
fn response(case: &Value) -> (String, Vec<Value>) {
    match &case["completion"] {
        Value::String(text) => (
            text.clone(),
            vec![json!({"role": "assistant", "content": text})],
        ),
        Value::Array(messages) => (String::new(), messages.clone()),
        other => panic!("a completion: {other}"),
    }
}

#[test]
fn scores_are_trls() {
    let cases = vec![
        json!({"prompt": [{"role": "user", "content": "Heads 35, legs 94. How many rabbits?"}],
            "completion": "12 rabbits, 23 chickens."}),
        json!({"prompt": "Heads 11, legs 30.", "completion": " 11*2=22, 30-22=8, 8/2=4 rabbits"}),
        json!({"prompt": [{"role": "system", "content": "You solve puzzles."},
            {"role": "user", "content": "鸡兔同笼：头35，脚94？"}], "completion": " 兔12只。 "}),
        json!({"prompt": [{"role": "user", "content": "Heads 2, legs 6?"},
            {"role": "assistant", "content": "1 rabbit"}, {"role": "user", "content": "Why?"}],
            "completion": "2*2=4, 6-4=2, 2/2=1 rabbit, 2-1=1 chicken. The answer is 1"}),
        json!({"prompt": "Q: 2+2?", "completion": ""}),
        // After tools: the assistant's turns and the results between them.
        json!({"prompt": [{"role": "user", "content": "Heads 35, legs 94. How many rabbits?"}],
            "completion": [
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                    "function": {"name": "calc", "arguments": {"expr": "(94-70)/2"}}}]},
                {"role": "tool", "name": "calc", "content": "12.0"},
                {"role": "assistant", "content": "12 rabbits."}]}),
    ];
    let want = trl_scores(&cases, "cases");
    let cases: Vec<Value> = want.iter().map(|w| w["case"].clone()).collect();
    let ours = our_scores(&cases);
    let tok = data::Tokenizer::load(&fixture().reward).unwrap();
    for (w, ours) in want.iter().zip(ours) {
        let e = example(&w["case"]["prompt"]);
        let (text, messages) = response(&w["case"]);
        let messages = w["case"]["completion"].is_array().then_some(&messages[..]);
        let ids = own_tokens(&tok, &e, (&text, messages), None).unwrap();
        assert_eq!(tok.decode(&ids, false), w["text"].as_str().unwrap());
        let trl = w["score"].as_f64().unwrap();
        assert!(
            (ours - trl).abs() < 1e-4,
            "{}: ours {ours}, TRL {trl}",
            w["case"]
        );
    }
    // The longest are kept to their last tokens (the reward model's positions).
    let e = example(&cases[0]["prompt"]);
    let all = own_tokens(&tok, &e, ("12", None), None).unwrap();
    assert_eq!(
        own_tokens(&tok, &e, ("12", None), Some(5)).unwrap(),
        all[all.len() - 5..]
    );
}

fn args(out: &Path, extra: &[&str]) -> ppo::train::TrainArgs {
    let f = fixture();
    let prompts = f.root.join("prompts.jsonl");
    let row = json!({"prompt": [{"role": "user", "content": "There are 35 heads"}]});
    std::fs::write(&prompts, format!("{row}\n{row}\n")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut argv: Vec<String> = [
        "--policy",
        &s(&f.policy),
        "--reward-model",
        &s(&f.reward),
        "--prompts",
        &s(&prompts),
        "--output-dir",
        &s(out),
        "--device",
        "cpu",
        "--rollout-batch-size",
        "2",
        "--response-length",
        "8",
        "--ppo-epochs",
        "1",
        "--num-minibatches",
        "1",
        "--max-steps",
        "1",
        "--seed",
        "3",
        "--sample-every",
        "1",
        "--num-samples",
        "8",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    argv.extend(extra.iter().map(|a| a.to_string()));
    rlhf_tests::parse_args(&argv)
}

/// A GRPO run with that reward model given twice, weighted 1 and 0.5 (two reward sources,
/// as TRL's list of reward models): every response it sampled got 1.5 × TRL's reward of it,
/// and each source's mean is logged under its own name.
#[test]
fn grpo_scores_responses_in_the_reward_models_tokens() {
    let f = fixture();
    let out = f.root.join("grpo");
    let _ = std::fs::remove_dir_all(&out);
    let reward = f.reward.to_str().unwrap();
    let grpo = [
        "--advantage-estimator",
        "grpo",
        "--num-generations",
        "4",
        "--reward-model",
        reward,
        "--reward-model-weight",
        "1",
        "--reward-model-weight",
        "0.5",
    ];
    ppo::train::run(&args(&out, &grpo)).unwrap();
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains("reward_model_weight = [1.0, 0.5]"),
        "{config}"
    );
    let metrics = rlhf_tests::read_jsonl(&out.join("metrics.jsonl"));
    let last = metrics.last().unwrap();
    let (first, second) = (
        last["rewards/reward_model/mean"].as_f64().unwrap(),
        last["rewards/reward_model_2/mean"].as_f64().unwrap(),
    );
    assert!((first - second).abs() < 1e-9, "{last}");
    let samples = rlhf_tests::read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 8);
    let prompt = json!([{"role": "user", "content": "There are 35 heads"}]);
    let cases: Vec<Value> = samples
        .iter()
        .map(|s| json!({"prompt": prompt, "completion": s["response"]}))
        .collect();
    let want = trl_scores(&cases, "sampled");
    for (s, w) in samples.iter().zip(&want) {
        assert_eq!(s["response"], w["case"]["completion"]);
        let (ours, trl) = (s["score"].as_f64().unwrap(), w["score"].as_f64().unwrap());
        assert!((ours - 1.5 * trl).abs() < 1e-4, "{s}: TRL {trl}");
    }
    assert!(!out.join("final_value").exists());

    // GAE's value model would start from the reward model, which cannot read the policy's
    // tokens; with a value model of the policy's family it trains.
    let err = ppo::train::run(&args(&f.root.join("gae"), &[])).unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot start the value model: give --value-model DIR"),
        "{err:#}"
    );
    let out = f.root.join("gae-value");
    let _ = std::fs::remove_dir_all(&out);
    let policy = f.policy.to_str().unwrap();
    let summary = ppo::train::run(&args(&out, &["--value-model", policy])).unwrap();
    assert_eq!(summary.steps, 1);
    assert!(out.join("final_value").exists());
    // One reward model is written to config.toml as it always was.
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("reward_model = {:?}", f.reward.to_str().unwrap()))
            && config.contains("reward_model_weight = 1.0"),
        "{config}"
    );

    // Conversations need the reward model's own chat template: without one the run is
    // refused before it writes anything, naming the first conversation.
    let bare = f.root.join("reward-without-template");
    std::fs::create_dir_all(&bare).unwrap();
    for entry in std::fs::read_dir(&f.reward).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap() != "chat_template.jinja" {
            std::fs::copy(&p, bare.join(p.file_name().unwrap())).unwrap();
        }
    }
    let out = f.root.join("bare");
    let mut bare_args = args(
        &out,
        &["--advantage-estimator", "grpo", "--num-generations", "2"],
    );
    bare_args.reward_model = vec![bare];
    let err = format!("{:#}", ppo::train::run(&bare_args).unwrap_err());
    assert!(
        err.contains("prompts.jsonl:1") && err.contains("no chat template to render it with"),
        "{err}"
    );
    assert!(!out.exists());

    // At most 8 reward models (each logged under its own name).
    let nine: Vec<&str> = (0..8)
        .flat_map(|_| ["--reward-model", f.reward.to_str().unwrap()])
        .collect();
    let err = ppo::train::run(&args(&f.root.join("nine"), &nine)).unwrap_err();
    assert!(
        format!("{err:#}").contains("--reward-model: at most 8"),
        "{err:#}"
    );

    // A weight for each model, or none.
    let two_weights = ["--reward-model-weight", "1", "--reward-model-weight", "2"];
    let err = ppo::train::run(&args(&f.root.join("weights"), &two_weights)).unwrap_err();
    assert!(
        format!("{err:#}").contains("--reward-model-weight: give one per --reward-model"),
        "{err:#}"
    );
}
