//! Tool calling in rollouts (TRL 1.16's `GRPOTrainer(tools=…)`): an answer is the message
//! TRL's `parse_response` makes of it (content, reasoning, the calls the loop runs, their
//! text arguments typed by the tool schemas) and the results' tokens are what its
//! `_get_tool_suffix_ids` appends, on the Qwen2.5, Qwen3 (TRL's training template), Qwen3.5,
//! Llama 3.1, GLM-4-MoE, Gemma 4 and gpt-oss chat templates (`tests/python/tool_reference.py`); the loop splices results
//! between sampled stretches, keeps them out of the sampled mask, and stops at the
//! response budget and the iteration limit as TRL's `_tool_call_loop` does; a GRPO run
//! with a tool program calls it and logs TRL's tool metrics; bad setups end in one line.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use data::Tokenizer;
use ppo::python_str::python_str;
use ppo::tools::{calls_of, suffix_ids, Segment, ToolCall, ToolFormat, ToolLoop, ToolRunner};
use serde_json::{json, Value};

struct Fixture {
    templates: PathBuf,
    reference: Value,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let templates = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tool-templates");
        let _ = std::fs::remove_dir_all(&templates);
        let root = templates.to_str().unwrap();
        rlhf_tests::run_python("template_reference.py", &["make", "--root", root]);
        let reference = rlhf_tests::run_python("tool_reference.py", &["--root", root]);
        Fixture {
            templates,
            reference,
        }
    })
}

/// What a tool program answers is written into the tool message as TRL writes a Python
/// tool's return value, `str(result)`, and an error as `str({"error": message})`.
#[test]
fn results_and_errors_are_written_as_trl_writes_them() {
    let f = fixture();
    let cases = f.reference["str"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let json = case[0].as_str().unwrap();
        let value: Value = serde_json::from_str(json).unwrap();
        assert_eq!(python_str(&value), case[1].as_str().unwrap(), "{json}");
    }
    for case in f.reference["errors"].as_array().unwrap() {
        let error = json!({"error": case[0]});
        assert_eq!(python_str(&error), case[1].as_str().unwrap());
    }
}

/// A template's tokenizer, with TRL's training template where the trainer swaps one in.
fn tokenizer(name: &str) -> Tokenizer {
    let f = fixture();
    let dir = f.templates.join(name);
    let tok = Tokenizer::load(&dir).unwrap();
    match f.reference[name]["training_template"].as_str() {
        None => tok,
        Some(template) => {
            let path = dir.join("training.jinja");
            std::fs::write(&path, template).unwrap();
            tok.with_chat_template_file(&path).unwrap().0
        }
    }
}

#[test]
fn calls_and_results_are_trls() {
    let f = fixture();
    let mut checked = 0;
    for (name, format) in [
        ("qwen2_5", ToolFormat::Hermes),
        ("qwen3", ToolFormat::Hermes),
        ("qwen3_5_nothink", ToolFormat::QwenXml),
        ("llama3_1", ToolFormat::Llama3),
        ("glm4moe", ToolFormat::Glm4),
        ("gemma4", ToolFormat::Gemma4),
        ("gptoss", ToolFormat::GptOss),
        ("lfm2_2_5", ToolFormat::Lfm2),
        ("nemotron_3_nano", ToolFormat::Nemotron3),
        ("deepseek_r1_distill", ToolFormat::DeepSeekR1),
        ("nemotron_native", ToolFormat::Native),
    ] {
        let tok = tokenizer(name);
        assert_eq!(ToolFormat::of(&tok).unwrap(), format, "{name}");
        let want = &f.reference[name];
        for case in want["parsed"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids =
                |key: &str| -> Vec<i64> { serde_json::from_value(case[key].clone()).unwrap() };
            let tools = Some(&case["tools"]).filter(|t| !t.is_null());
            let message = format.message(&tok, (&ids("prefix"), &ids("ids")), tools);
            assert_eq!(&message, &case["message"], "{name}: {text:?}");
            // The loop runs the message's calls.
            let want_calls = case["message"]["tool_calls"].as_array().map(|calls| {
                calls
                    .iter()
                    .map(|c| json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}))
                    .collect::<Vec<_>>()
            });
            let ours = calls_of(&message).map(|calls| {
                calls
                    .into_iter()
                    .map(|c| json!({"name": c.name, "arguments": c.arguments}))
                    .collect::<Vec<_>>()
            });
            assert_eq!(ours, want_calls, "{name}: {text:?}");
            checked += 1;
        }
        for case in want["suffixes"].as_array().unwrap() {
            let results: Vec<(String, String)> =
                serde_json::from_value(case["results"].clone()).unwrap();
            let ids: Vec<i64> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(
                suffix_ids(&tok, &results).unwrap(),
                ids,
                "{name}: {results:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 451);
    // Qwen3's own template drops an answer's empty think block once tool results follow
    // it: refused, naming the way out.
    let own = Tokenizer::load(&f.templates.join("qwen3")).unwrap();
    let e = ToolFormat::of(&own).unwrap_err().to_string();
    assert!(
        e.contains("not prefix-preserving") && e.contains("--chat-template"),
        "{e}"
    );
    // Which templates of the fixture's (every one TRL ships that we check) call tools in a
    // form parsed here, or have a response template of their own (Nemotron's, saved into its
    // tokenizer_config.json); the others are refused in one line (templates that render no
    // tool results or no calls; ChatML).
    let mut formats = vec![];
    for entry in std::fs::read_dir(&f.templates).unwrap() {
        let dir = entry.unwrap().path();
        if let Ok(tok) = Tokenizer::load(&dir) {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            match ToolFormat::of(&tok) {
                Ok(format) => formats.push((name, format)),
                Err(e) => assert!(
                    e.to_string().starts_with("the chat template"),
                    "{name}: {e}"
                ),
            }
        }
    }
    formats.sort_by(|a, b| a.0.cmp(&b.0));
    let formats: Vec<(&str, ToolFormat)> = formats.iter().map(|(n, f)| (n.as_str(), *f)).collect();
    assert_eq!(
        formats,
        [
            ("deepseek_r1_distill", ToolFormat::DeepSeekR1),
            ("gemma4", ToolFormat::Gemma4),
            ("glm4moe", ToolFormat::Glm4),
            ("gptoss", ToolFormat::GptOss),
            ("lfm2_2_5", ToolFormat::Lfm2),
            ("llama3_1", ToolFormat::Llama3),
            ("llama3_2", ToolFormat::Llama3),
            ("nemotron_3_nano", ToolFormat::Nemotron3),
            ("nemotron_native", ToolFormat::Native),
            ("qwen2_5", ToolFormat::Hermes),
            ("qwen3_5_nothink", ToolFormat::QwenXml),
            ("qwen3_6", ToolFormat::QwenXml),
        ]
    );
    let chatml = Tokenizer::load(&f.templates.join("chatml")).unwrap();
    let e = ToolFormat::of(&chatml).unwrap_err().to_string();
    assert!(e.contains("in a form this version does not parse"), "{e}");
    // Without tools, TRL parses a conversation's answers where the tokenizer has a
    // response template of its own (Nemotron's here), and only there.
    let native = tokenizer("nemotron_native");
    let case = &f.reference["nemotron_native"]["parsed"][0];
    let ids = |key: &str| -> Vec<i64> { serde_json::from_value(case[key].clone()).unwrap() };
    let answers = ([ids("prefix")], [ids("ids")]);
    let parsed = ppo::rollout::completion_messages(&native, (&answers.0, &answers.1), true);
    assert_eq!(parsed.unwrap(), Some(vec![vec![case["message"].clone()]]));
    let text_prompts = ppo::rollout::completion_messages(&native, (&answers.0, &answers.1), false);
    assert_eq!(text_prompts.unwrap(), None);
    let own = tokenizer("qwen2_5");
    let none = ppo::rollout::completion_messages(&own, (&answers.0, &answers.1), true);
    assert_eq!(none.unwrap(), None);
    // The response templates built in are TRL's own.
    let trl = f.reference["response_templates"].as_object().unwrap();
    assert_eq!(trl.len(), 9);
    for (name, want) in trl {
        assert_eq!(
            data::response::builtin_json(name).as_ref(),
            Some(want),
            "{name}"
        );
    }
}

/// Answers every call with `answer(call)`, remembering the calls and their rows.
struct Recorder<F: Fn(&ToolCall) -> Result<String, String>> {
    answer: F,
    calls: RefCell<Vec<ToolCall>>,
    rows: RefCell<Vec<usize>>,
}

impl<F: Fn(&ToolCall) -> Result<String, String>> ToolRunner for Recorder<F> {
    fn run(
        &self,
        rows: &[usize],
        calls: &[ToolCall],
    ) -> anyhow::Result<Vec<Result<String, String>>> {
        self.calls.borrow_mut().extend(calls.iter().cloned());
        self.rows.borrow_mut().extend(rows);
        Ok(calls.iter().map(&self.answer).collect())
    }
}

fn segment(tok: &Tokenizer, text: &str, logprob: f32) -> Segment {
    let mut ids = tok.encode(text, false).unwrap();
    ids.push(tok.eos_id.unwrap());
    Segment {
        logprobs: vec![logprob; ids.len()],
        ids,
        eos: true,
    }
}

#[test]
fn the_loop_splices_results_between_sampled_stretches() {
    let tok = tokenizer("qwen2_5");
    let format = ToolFormat::of(&tok).unwrap();
    let call = r#"<tool_call>
{"name": "calc", "arguments": {"expr": "94-2*35"}}
</tool_call>"#;
    let (calling, answer) = (
        segment(&tok, call, -0.5),
        segment(&tok, "The answer is 12", -0.25),
    );
    let prompts: Vec<Vec<i64>> = ["鸡兔同笼, 35 heads, 94 legs?", "2*3?"]
        .iter()
        .map(|q| {
            tok.encode(
                &format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
                false,
            )
            .unwrap()
        })
        .collect();
    let runner = Recorder {
        answer: |c: &ToolCall| match c.arguments["expr"].as_str() {
            Some("94-2*35") => Ok("24".into()),
            _ => Err("cannot evaluate".into()),
        },
        calls: RefCell::new(vec![]),
        rows: RefCell::new(vec![]),
    };
    let suffix = suffix_ids(&tok, &[("calc".into(), "24".into())]).unwrap();
    let whole = calling.ids.len() + suffix.len() + answer.ids.len();
    let looped = |budget: usize, max_iterations: usize| ToolLoop {
        format,
        tokenizer: &tok,
        runner: &runner,
        budget,
        max_len: 4096,
        max_iterations,
        schemas: &[],
    };
    // Row 0 calls the tool and then answers; row 1 answers at once.
    let asked = RefCell::new(vec![]);
    let continue_with = |next: Segment| {
        let asked = &asked;
        move |rows: &[usize], prompts: &[Vec<i64>], iteration: usize, max_new: usize| {
            asked
                .borrow_mut()
                .push((rows.to_vec(), prompts.to_vec(), iteration, max_new));
            Ok(vec![next.clone(); rows.len()])
        }
    };
    let (out, stats) = looped(256, 5)
        .run(
            &prompts,
            vec![calling.clone(), answer.clone()],
            &mut continue_with(answer.clone()),
        )
        .unwrap();
    assert_eq!((stats.calls, stats.failures), (1, 0));
    assert_eq!(*runner.rows.borrow(), [0], "the call is row 0's");
    assert_eq!(
        runner.calls.borrow()[0],
        ToolCall {
            name: "calc".into(),
            arguments: serde_json::from_value(json!({"expr": "94-2*35"})).unwrap()
        }
    );
    let r = &out[0];
    assert_eq!(r.ids, [&calling.ids[..], &suffix, &answer.ids].concat());
    let sampled: Vec<bool> = [
        vec![true; calling.ids.len()],
        vec![false; suffix.len()],
        vec![true; answer.ids.len()],
    ]
    .concat();
    assert_eq!(r.sampled, sampled);
    assert_eq!(
        r.logprobs,
        [
            vec![-0.5; calling.ids.len()],
            vec![0.0; suffix.len()],
            vec![-0.25; answer.ids.len()]
        ]
        .concat()
    );
    assert!(r.eos);
    assert!(tok
        .decode(&r.ids, true)
        .contains("<tool_response>\n24\n</tool_response>"));
    // What TRL's reward functions get: the answers as messages, the results between them.
    let calling_message = json!({"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"expr": "94-2*35"}}}]});
    let answer_message = json!({"role": "assistant", "content": "The answer is 12"});
    assert_eq!(
        r.messages,
        [
            calling_message.clone(),
            json!({"role": "tool", "name": "calc", "content": "24"}),
            answer_message.clone()
        ]
    );
    assert_eq!(out[1].messages, [answer_message]);
    assert_eq!(
        (out[1].ids.clone(), out[1].sampled.iter().all(|&s| s)),
        (answer.ids.clone(), true)
    );
    // The continuation is asked for row 0 alone, from its prompt, answer and results, with
    // the room left in the budget.
    let (rows, continued, iteration, max_new) = asked.borrow()[0].clone();
    assert_eq!(
        (rows, iteration, max_new),
        (vec![0], 0, 256 - calling.ids.len() - suffix.len())
    );
    assert_eq!(
        continued,
        [[&prompts[0][..], &calling.ids, &suffix].concat()]
    );

    // A continuation past the budget is cut (and so did not end); results that would not
    // fit are dropped, the answer kept as sampled (the call still counts).
    let (out, _) = looped(whole - 3, 5)
        .run(
            &prompts[..1],
            vec![calling.clone()],
            &mut continue_with(answer.clone()),
        )
        .unwrap();
    assert_eq!((out[0].ids.len(), out[0].eos), (whole - 3, false));
    asked.borrow_mut().clear();
    let (out, stats) = looped(calling.ids.len() + suffix.len() - 1, 5)
        .run(
            &prompts[..1],
            vec![calling.clone()],
            &mut continue_with(answer.clone()),
        )
        .unwrap();
    assert_eq!((out[0].ids.clone(), stats.calls), (calling.ids.clone(), 1));
    assert_eq!(out[0].messages, [calling_message]);
    assert!(asked.borrow().is_empty());

    // A policy that keeps calling stops after --max-tool-calling-iterations rounds; a
    // failed call is answered with its error and counted.
    let bad = segment(
        &tok,
        "<tool_call>\n{\"name\": \"calc\", \"arguments\": {\"expr\": \"x\"}}\n</tool_call>",
        -1.0,
    );
    let (out, stats) = looped(4096, 2)
        .run(
            &prompts[..1],
            vec![bad.clone()],
            &mut continue_with(bad.clone()),
        )
        .unwrap();
    assert_eq!((stats.calls, stats.failures), (2, 2));
    let error = suffix_ids(
        &tok,
        &[("calc".into(), "{'error': 'cannot evaluate'}".into())],
    )
    .unwrap();
    assert_eq!(
        out[0].ids,
        [&bad.ids[..], &error, &bad.ids, &error, &bad.ids].concat()
    );
}

/// A reward program that appends each completion it is given to `log` (the first argument)
/// and scores none.
const KEEP_COMPLETIONS: &str = r#"
import json, sys
log = open(sys.argv[1], "a")
for line in sys.stdin:
    log.write(json.dumps(json.loads(line)["completion"]) + "\n"); log.flush()
    print(json.dumps({"reward": None}), flush=True)
"#;

/// `calc` as an environment: episodes begun by `reset`, each call counted in its episode,
/// `get_reward` 1 for exactly one call; every line appended to `log` (the first argument).
/// With a second argument, even episodes' resets return it as their observation.
const ENVIRONMENT: &str = r#"
import json, re, sys
log = open(sys.argv[1], "a")
observation = sys.argv[2] if len(sys.argv) > 2 else None
episodes = {}
for line in sys.stdin:
    message = json.loads(line)
    log.write(line); log.flush()
    if "reset" in message:
        episodes[message["reset"]] = 0
        answer = {"observation": observation} if message["reset"] % 2 == 0 else {}
    elif "get_reward" in message:
        answer = {"reward": float(episodes.pop(message["get_reward"]) == 1)}
    else:
        episodes[message["episode"]] += 1
        expr = str(message["arguments"].get("expr", ""))
        if message["name"] == "calc" and re.fullmatch(r"[0-9+*/() -]+", expr):
            answer = {"result": str(eval(expr))}
        else:
            answer = {"error": "cannot do that"}
    print(json.dumps(answer), flush=True)
"#;

/// An environment whose reset returns a number for the prompt.
const OBSERVING: &str = r#"
import json, sys
for line in sys.stdin:
    print(json.dumps({"observation": 3}), flush=True)
"#;

/// A tiny Llama taught (by SFT on one conversation) to call `calc` and then answer with its
/// result, under Qwen2.5's chat template; then two GRPO steps with the tool program: the
/// responses call it, its results reach the policy, and TRL's metrics are logged.
#[test]
fn grpo_runs_the_tool_program_and_logs_its_use() {
    let f = fixture();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tool-run");
    rlhf_tests::tiny_llama_fixture(&root);
    let template = root.join("qwen2_5.jinja");
    std::fs::copy(f.templates.join("qwen2_5/chat_template.jinja"), &template).unwrap();
    let prompt = json!({"prompt": [{"role": "user", "content": "35 heads, 94 legs: rabbits?"}],
        "answer": "12"});
    let prompts: String = (0..4).map(|_| format!("{prompt}\n")).collect();
    std::fs::write(root.join("prompts.jsonl"), prompts).unwrap();
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let teaching =
        rlhf_tests::calc_teaching_args(&root, &root.join("model"), &template, &root.join("sft"));
    sft::train::run(&rlhf_tests::parse_args(&teaching)).unwrap();
    let log = root.join("calls.jsonl");
    let command = rlhf_tests::python_program(&root, "calc.py", rlhf_tests::CALC_PROGRAM, &[&log]);
    let out = root.join("grpo");
    let ppo_args = |estimator: &str, out: &Path, extra: &[&str]| -> ppo::train::TrainArgs {
        let mut argv: Vec<String> = [
            "--policy",
            &s(root.join("sft/final")),
            "--prompts",
            &s(root.join("prompts.jsonl")),
            "--output-dir",
            &s(out.to_path_buf()),
            "--device",
            "cpu",
            "--advantage-estimator",
            estimator,
            "--num-generations",
            "4",
            "--rollout-batch-size",
            "8",
            "--response-length",
            "128",
            "--ppo-epochs",
            "1",
            "--num-minibatches",
            "2",
            "--lr",
            "1e-4",
            "--seed",
            "5",
            "--reward-rule",
            "exact-answer",
            "--answer-pattern",
            r"(\d+)\s*$",
            "--max-steps",
            "2",
            "--eos-token",
            "<|im_end|>",
        ]
        .map(str::to_string)
        .to_vec();
        argv.extend(extra.iter().map(|s| s.to_string()));
        rlhf_tests::parse_args(&argv)
    };
    // A reward program that keeps the completions it is given (and scores none).
    let kept = root.join("completions.jsonl");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&kept);
    let keep = rlhf_tests::python_program(&root, "keep.py", KEEP_COMPLETIONS, &[&kept]);
    let tool_command = [
        "--tool-command",
        command.as_str(),
        "--reward-command",
        &keep,
    ];
    ppo::train::run(&ppo_args("grpo", &out, &tool_command)).unwrap();
    let m = rlhf_tests::read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(m.len(), 2);
    let calls = rlhf_tests::read_jsonl(&log);
    for r in &m {
        let frequency = r["tools/call_frequency"].as_f64().unwrap();
        assert!(frequency >= 0.5, "{r}");
        assert_eq!(r["tools/failure_frequency"].as_f64().unwrap(), 0.0, "{r}");
    }
    assert!(calls.len() >= 16, "{} calls", calls.len());
    assert_eq!(
        calls[0],
        json!({"name": "calc", "arguments": {"expr": "(94-70)/2"}})
    );
    // Reward programs get each completion as TRL's reward functions do with tools: the
    // assistant's messages (the calls parsed out of them) with the results between them.
    let completions = rlhf_tests::read_jsonl(&kept);
    assert_eq!(completions.len(), 64, "8 prompts x 4 answers, 2 iterations");
    let taught = json!([
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
            "function": {"name": "calc", "arguments": {"expr": "(94-70)/2"}}}]},
        {"role": "tool", "name": "calc", "content": "12.0"},
        {"role": "assistant", "content": "12"}]);
    assert!(completions.contains(&taught), "{completions:?}");
    let mut results = 0;
    for c in &completions {
        let messages = c.as_array().unwrap();
        assert_eq!(messages[0]["role"], "assistant", "{c}");
        let mut pending = 0;
        for m in messages {
            match m["role"].as_str().unwrap() {
                "tool" => {
                    assert!(pending > 0, "a result without its call: {c}");
                    pending -= 1;
                    results += 1;
                }
                _ => {
                    assert_eq!(pending, 0, "calls without their results: {c}");
                    pending = m["tool_calls"].as_array().map_or(0, Vec::len);
                }
            }
        }
    }
    assert_eq!(results, calls.len(), "a result for each call run");
    // The results' tokens are read, not sampled: `response_length` counts the call and the
    // answer (each with its EOS), not the tool message between them.
    let tok = Tokenizer::load(&root.join("sft/final")).unwrap();
    let call = r#"<tool_call>
{"name": "calc", "arguments": {"expr": "(94-70)/2"}}
</tool_call>"#;
    let sampled = (tok.encode(call, false).unwrap().len()
        + tok.encode("12", false).unwrap().len()
        + 2) as f64;
    let results = suffix_ids(&tok, &[("calc".into(), "12.0".into())])
        .unwrap()
        .len() as f64;
    for r in &m {
        let length = r["response_length"].as_f64().unwrap();
        assert!(length < sampled + results / 2.0, "{length} tokens a response: the results were counted ({sampled} sampled, {results} of results)");
    }
    // Having read the result, the policy answers with it: most responses are right.
    let reward: f64 = m.iter().map(|r| r["reward"].as_f64().unwrap()).sum::<f64>() / 2.0;
    assert!(reward >= 0.5, "mean reward {reward}");

    // GAE's values would run across the results: refused, as are --tools without a program
    // and a --tools file that is not a list.
    let critic = s(root.join("sft/final"));
    let e = ppo::train::run(&ppo_args(
        "gae",
        &out,
        &["--tool-command", &command, "--value-model", &critic],
    ))
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("--environment-command need a critic-free"),
        "{e:#}"
    );
    std::fs::write(root.join("tools.json"), "{\"type\": \"function\"}").unwrap();
    let tools = s(root.join("tools.json"));
    let e = ppo::train::run(&ppo_args(
        "grpo",
        &out,
        &["--tool-command", &command, "--tools", &tools],
    ))
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("not a JSON list of tool schemas"),
        "{e:#}"
    );
    // A response template of the tokenizer's own that cannot be read stops the run at its
    // start, naming the file.
    let bad = root.join("bad-template");
    std::fs::create_dir_all(&bad).unwrap();
    for entry in std::fs::read_dir(root.join("sft/final")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, bad.join(path.file_name().unwrap())).unwrap();
        }
    }
    let config = bad.join("tokenizer_config.json");
    let mut tc: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    tc["response_template"] = json!({"start_anchor": "<|im_start|>assistant\n", "fields": {}});
    std::fs::write(&config, tc.to_string()).unwrap();
    let mut a = ppo_args("grpo", &out, &[]);
    a.policy = bad.clone();
    let e = format!("{:#}", ppo::train::run(&a).unwrap_err());
    assert!(
        e.contains("tokenizer_config.json")
            && e.contains("response_template.fields must be a non-empty object"),
        "{e}"
    );
    // Without tools, a policy whose tokenizer has a response template of its own (here TRL's
    // Qwen3 one, saved as transformers saves it) has its answers parsed for the reward
    // programs, as TRL does: the taught call is a call of the message, not text.
    tc["response_template"] = data::response::builtin_json("qwen3").unwrap();
    std::fs::write(&config, tc.to_string()).unwrap();
    let _ = std::fs::remove_file(&kept);
    let mut a = ppo_args(
        "grpo",
        &root.join("own-template"),
        &["--reward-command", &keep],
    );
    (a.policy, a.run.max_steps) = (bad.clone(), Some(1));
    ppo::train::run(&a).unwrap();
    let completions = rlhf_tests::read_jsonl(&kept);
    assert_eq!(completions.len(), 32);
    let taught = json!([{"role": "assistant", "content": "", "tool_calls": [{"type": "function",
        "function": {"name": "calc", "arguments": {"expr": "(94-70)/2"}}}]}]);
    assert!(completions.contains(&taught), "{completions:?}");
    let mut calling = 0;
    for c in &completions {
        let m = c.as_array().unwrap();
        assert_eq!(m.len(), 1, "{c}");
        assert!(
            !m[0]["content"].as_str().unwrap().contains("<|im_end|>"),
            "{c}"
        );
        calling += usize::from(m[0].get("tool_calls").is_some());
    }
    assert!(calling >= 16, "{calling} of 32 answers parsed as calls");

    // The same tool as an environment (TRL's `environment_factory`): one episode per
    // response, reset with its row, its calls numbered by episode, and a reward of its own
    // (1 for exactly one call).
    let env_log = root.join("env.jsonl");
    let _ = std::fs::remove_file(&env_log);
    let environment = rlhf_tests::python_program(&root, "env.py", ENVIRONMENT, &[&env_log]);
    let env_out = root.join("grpo-env");
    ppo::train::run(&ppo_args(
        "grpo",
        &env_out,
        &[
            "--environment-command",
            &environment,
            "--environment-reward",
        ],
    ))
    .unwrap();
    let lines = rlhf_tests::read_jsonl(&env_log);
    let mut open = std::collections::BTreeMap::new(); // episode → calls so far
    let mut rewards = vec![];
    for line in &lines {
        if let Some(e) = line.get("reset") {
            assert_eq!(line["answer"], "12", "{line}");
            assert!(
                line["prompt"].as_str().unwrap().contains("35 heads"),
                "{line}"
            );
            assert!(open.insert(e.as_u64().unwrap(), 0).is_none(), "{line}");
        } else if let Some(e) = line.get("get_reward") {
            let calls = open.remove(&e.as_u64().unwrap()).expect("a begun episode");
            rewards.push(f64::from(u8::from(calls == 1)));
        } else {
            let calls = open.get_mut(&line["episode"].as_u64().unwrap());
            *calls.expect("a call of an episode begun and not yet scored") += 1;
            assert_eq!(line["name"], "calc", "{line}");
        }
    }
    assert!(open.is_empty());
    assert_eq!(
        rewards.len(),
        64,
        "32 responses a step, 2 steps, one reward each"
    );
    let em = rlhf_tests::read_jsonl(&env_out.join("metrics.jsonl"));
    for (step, r) in em.iter().enumerate() {
        let mean = rewards[32 * step..32 * (step + 1)].iter().sum::<f64>() / 32.0;
        let logged = r["rewards/environment/mean"].as_f64().unwrap();
        assert!(
            (logged - mean).abs() < 1e-9,
            "step {step}: {logged} logged, {mean} given"
        );
    }
    // Before any update the environment samples what the plain tool program did.
    assert_eq!(em[0]["tools/call_frequency"], m[0]["tools/call_frequency"]);

    // Text a reset returns (TRL's observation) is appended to the prompt's last message:
    // the even episodes' prompts (rows 0, 2, … of each step) read it.
    let observed_out = root.join("grpo-observed");
    let observed = format!("{environment} ' Count the legs.'");
    ppo::train::run(&ppo_args(
        "grpo",
        &observed_out,
        &[
            "--environment-command",
            &observed,
            "--sample-every",
            "1",
            "--num-samples",
            "32",
        ],
    ))
    .unwrap();
    let samples = rlhf_tests::read_jsonl(&observed_out.join("samples.jsonl"));
    assert_eq!(samples.len(), 64, "every response of both steps");
    for (i, sample) in samples.iter().enumerate() {
        let row = i % 32; // episode 32 · step + row
        let prompt = sample["prompt"].as_str().unwrap();
        assert_eq!(
            prompt.contains("rabbits? Count the legs.\nassistant"),
            row % 2 == 0,
            "row {row}: {prompt}"
        );
    }
    // An observation that is not text ends the run in one line.
    let observing = rlhf_tests::python_program(&root, "observing.py", OBSERVING, &[]);
    let e = ppo::train::run(&ppo_args(
        "grpo",
        &root.join("grpo-observing"),
        &["--environment-command", &observing],
    ))
    .unwrap_err();
    assert!(
        format!("{e:#}")
            .contains("the reset of episode 0: its observation must be a string or null, got 3"),
        "{e:#}"
    );
}
