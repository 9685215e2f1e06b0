//! Helpers for the workspace tests: the reference Python (with `transformers`) that the
//! bootstrap installs, and small tensor comparisons.

pub mod demo;

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Tensor;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Python interpreter holding `transformers`: `RLHF_PYTHON`, else `.venv/bin/python`.
pub fn python() -> PathBuf {
    std::env::var_os("RLHF_PYTHON")
        .map(PathBuf::from)
        .or_else(|| option_env!("RLHF_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// Runs `tests/python/<script>` with `args`, returning its stdout parsed as JSON.
/// Panics with the script's stderr when it fails: a broken reference is a test failure.
pub fn run_python(script: &str, args: &[&str]) -> serde_json::Value {
    let path = repo_root().join("tests/python").join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference script printed invalid JSON")
}

/// A `[B, T]` i64 tensor from nested JSON arrays.
pub fn tensor_2d_i64(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_slice2(&rows)
}

/// A `[B, T]` f32 tensor from nested JSON arrays.
pub fn tensor_2d_f32(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_slice2(&rows)
}

/// Largest absolute difference between `a` and `b` where `mask` is 1.
pub fn max_masked_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    ((a - b).abs() * mask.to_kind(tch::Kind::Float))
        .max()
        .double_value(&[])
}

/// Runs a stage binary (`env!("CARGO_BIN_EXE_…")`) with `args` and extra environment; a
/// crash point inherited from the caller's environment is cleared first.
pub fn run_bin(exe: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(exe);
    cmd.args(args).env_remove("RLHF_CRASH_AT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"))
}

/// Training options for a data-parallel test: a rank's rows in two micro-batches of 2, the
/// gradient exchange overlapped with the second's backward in buckets of 10 kB (several a
/// block of the tests' models).
pub const OVERLAPPED: [&str; 7] = [
    "--batch-size",
    "2",
    "--grad-accum",
    "2",
    "--overlap-grad-reduce",
    "--bucket-cap-mb",
    "0.01",
];

/// Runs a stage binary as `ranks` data-parallel processes under torch's own launcher
/// (`python -m torch.distributed.run --standalone`, its agent hosting the c10d store).
pub fn torchrun(
    exe: &str,
    ranks: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let ranks = ranks.to_string();
    let mut cmd = Command::new(python());
    cmd.args([
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
    ])
    .args([ranks.as_str(), "--no-python", exe])
    .args(args)
    .env_remove("RLHF_CRASH_AT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run torchrun: {e}"))
}

/// Runs a stage binary as `nodes` torchrun agents of one process each on this machine, as
/// separate machines would run it (`--nnodes N --node-rank i --rdzv-backend c10d
/// --rdzv-endpoint`, the endpoint a free local port); each agent's output, in node order.
pub fn torchrun_nodes(exe: &str, nodes: usize, args: &[&str]) -> Vec<std::process::Output> {
    let port = common::dist::free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let nnodes = nodes.to_string();
    let agents: Vec<_> = (0..nodes)
        .map(|node| {
            let rank = node.to_string();
            Command::new(python())
                .args(["-m", "torch.distributed.run", "--nnodes", nnodes.as_str()])
                .args(["--nproc-per-node", "1", "--node-rank", rank.as_str()])
                .args([
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    endpoint.as_str(),
                ])
                .args(["--rdzv-id", "nodes", "--no-python", exe])
                .args(args)
                .env_remove("RLHF_CRASH_AT")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run torchrun: {e}"))
        })
        .collect();
    agents
        .into_iter()
        .map(|a| a.wait_with_output().expect("torchrun agent"))
        .collect()
}

/// The JSON summary a successful command printed; panics with its stderr otherwise.
pub fn ok(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON summary line on stdout")
}

/// Asserts that two runs logged the same `keys` at every step (as many steps each):
/// |x − y| < `rel` · max(|x|, `floor`) — purely relative with `floor` 0.
pub fn assert_same_metrics(
    a: &[serde_json::Value],
    b: &[serde_json::Value],
    keys: &[&str],
    (rel, floor): (f64, f64),
) {
    assert_eq!(a.len(), b.len(), "steps logged");
    for (x, y) in a.iter().zip(b) {
        for key in keys {
            let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (x - y).abs() < rel * x.abs().max(floor),
                "{key}: {x} vs {y}"
            );
        }
    }
}

/// Asserts that the run written to `two` trained what the run in `one` trained (a data-
/// parallel run against one process with its whole batch): final weights within 1e-5
/// (loaded with `head`), each of `steps` steps once in `metrics.jsonl`, and the metrics
/// `keys` of every step within 1e-5 (relative, `floor` as [`assert_same_metrics`]).
pub fn assert_trains_like(
    one: &Path,
    two: &Path,
    head: common::Head,
    (keys, floor): (&[&str], f64),
    steps: usize,
) {
    let diff = max_weight_diff(&one.join("final"), &two.join("final"), head);
    assert!(
        diff < 1e-5,
        "{} vs {}: weights differ by {diff:e}",
        two.display(),
        one.display()
    );
    let metrics = |dir: &Path| read_jsonl(&dir.join("metrics.jsonl"));
    let (a, b) = (metrics(one), metrics(two));
    assert_eq!(b.len(), steps, "each step once in {}", two.display());
    assert_same_metrics(&a, &b, keys, (1e-5, floor));
}

/// A teacher for the distillation tests: `model` fine-tuned by the `sft` binary `exe` on
/// `data` (8 epochs of batches of 8 at lr 3e-3, CPU, seed 1) into `out`; its `final/`.
pub fn sft_teacher(exe: &str, model: &Path, data: &Path, out: &Path) -> PathBuf {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "train".into(),
        "--model".into(),
        path(model),
        "--data".into(),
        path(data),
        "--output-dir".into(),
        path(out),
    ];
    let rest = [
        "--overwrite",
        "--device",
        "cpu",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
        "--epochs",
        "8",
        "--seed",
        "1",
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).chain(rest).collect();
    ok(&run_bin(exe, &args, &[]));
    out.join("final")
}

/// The held-out NLL (`sft eval`'s `loss`, CPU) of `model` on `data`, by the `sft` binary
/// `exe`.
pub fn sft_eval_loss(exe: &str, model: &Path, data: &Path) -> f64 {
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let args = ["eval", "--model", model, "--data", data, "--device", "cpu"];
    ok(&run_bin(exe, &args, &[]))["loss"].as_f64().unwrap()
}

/// Writes the Python `source` to `root/name`; the command that runs it with `args` (for
/// the `--tool-command` and `--reward-command` tests).
pub fn python_program(root: &Path, name: &str, source: &str, args: &[&Path]) -> String {
    let script = root.join(name);
    std::fs::write(&script, source).unwrap();
    let quoted = |p: &Path| format!("'{}'", p.display());
    let mut words = vec![quoted(&python()), quoted(&script)];
    words.extend(args.iter().map(|a| quoted(a)));
    words.join(" ")
}

/// A tool program: `calc` evaluates its `expr` (digits, + - * / and brackets), anything
/// else is an error; every call is appended to the log (its first argument).
pub const CALC_PROGRAM: &str = r#"
import json, re, sys
log = open(sys.argv[1], "a")
for line in sys.stdin:
    call = json.loads(line)
    log.write(line); log.flush()
    expr = str(call["arguments"].get("expr", ""))
    if call["name"] == "calc" and re.fullmatch(r"[0-9+*/() -]+", expr):
        answer = {"result": str(eval(expr))}
    else:
        answer = {"error": f"Tool {call['name']} cannot do that."}
    print(json.dumps(answer), flush=True)
"#;

/// `data`'s SFT rows as `sft train` reads them with `model`'s tokenizer by default: cut at
/// `max_length` tokens, an EOS appended, the loss on the completions.
pub fn sft_rows(model: &Path, data: &Path, max_length: usize) -> Vec<data::sft::TokenizedSft> {
    let tok = data::Tokenizer::load(model).unwrap();
    let examples = data::read_sft(data).unwrap();
    let limits = (max_length, Default::default());
    data::sft::prepare(&examples, &tok, limits, true, Default::default())
        .unwrap()
        .rows
}

/// `sft train`'s arguments (after `train`) that teach `model` to call `calc`
/// ([`CALC_PROGRAM`]) under the chat template `template`: 16 copies of one conversation (the
/// call, its result 12.0, the answer 12) written to `root/sft.jsonl`, 60 steps of 4 at lr
/// 1e-2 into `out`, on the CPU.
pub fn calc_teaching_args(root: &Path, model: &Path, template: &Path, out: &Path) -> Vec<String> {
    let conversation = serde_json::json!({"messages": [
        {"role": "user", "content": "35 heads, 94 legs: rabbits?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
            "function": {"name": "calc", "arguments": {"expr": "(94-70)/2"}}}]},
        {"role": "tool", "name": "calc", "content": "12.0"},
        {"role": "assistant", "content": "12"}]});
    let rows: String = (0..16).map(|_| format!("{conversation}\n")).collect();
    let data = root.join("sft.jsonl");
    std::fs::write(&data, rows).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let mut args = vec![
        "--model".to_string(),
        path(model),
        "--data".into(),
        path(&data),
        "--output-dir".into(),
        path(out),
        "--chat-template-path".into(),
        path(template),
    ];
    let rest = [
        "--overwrite",
        "--device",
        "cpu",
        "--max-steps",
        "60",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--schedule",
        "constant",
        "--seed",
        "3",
    ];
    args.extend(rest.map(str::to_string));
    args
}

/// Every line of a JSON Lines file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The share of a text's non-space characters that are digits: the rule reward the PPO and
/// GRPO tests (and `tests/python/digit_reward.py`) train towards.
pub fn digit_share(text: &str) -> f64 {
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    chars.iter().filter(|c| c.is_ascii_digit()).count() as f64 / chars.len().max(1) as f64
}

/// Largest absolute difference between the weights of two model directories.
pub fn max_weight_diff(a: &Path, b: &Path, head: common::Head) -> f64 {
    let load = |d: &Path| {
        common::Model::load(d, &common::ModelOptions::cpu(head))
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .0
            .named_tensors()
    };
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, t)| (t - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// A fresh `root` holding `model/`: a tiny Llama with a BPE tokenizer (ChatML template,
/// pad == eos) made by `data_reference.py`, plus that script's data files. Returns the
/// script's reference outputs.
///
/// The script's output is made once per version of the script and copied from
/// `target/tmp/fixture-cache/` afterwards: it is the same files every time (seeded), and
/// making it (Python importing torch and transformers, training the tokenizer) took 8 s
/// of every test binary that uses it.
pub fn tiny_llama_fixture(root: &Path) -> serde_json::Value {
    let _ = std::fs::remove_dir_all(root);
    let script = repo_root().join("tests/python/data_reference.py");
    let source = std::fs::read(&script).unwrap();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&source, &mut hasher);
    let cache = repo_root().join(format!(
        "target/tmp/fixture-cache/tiny-llama-{:016x}",
        std::hash::Hasher::finish(&hasher)
    ));
    if !cache.join("reference.json").exists() {
        // Made beside and renamed into place: a cache entry is whole or absent. The name is
        // the thread's too: tests of one binary may make it at once.
        let thread = format!("{:?}", std::thread::current().id());
        let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
        let tmp = cache.with_extension(format!("tmp{}-{thread}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let reference = run_python(
            "data_reference.py",
            &["make", "--root", tmp.to_str().unwrap()],
        );
        std::fs::write(tmp.join("reference.json"), reference.to_string()).unwrap();
        if std::fs::rename(&tmp, &cache).is_err() {
            // Another process made it first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    copy_dir(&cache, root);
    let reference = std::fs::read_to_string(root.join("reference.json")).unwrap();
    std::fs::remove_file(root.join("reference.json")).unwrap();
    serde_json::from_str(&reference).unwrap()
}

/// A tiny Mixture-of-Experts model in `dir` (Qwen3-MoE's layout: 2 layers, 4 experts, top
/// 2 renormalised, the config's router_aux_loss_coef 0.001) with the tokenizer of the tiny
/// Llama in `llama` ([`tiny_llama_fixture`]), the same weights every time; its routers
/// are decisive (std 0.5), so that some experts start out favoured.
pub fn tiny_moe(llama: &Path, dir: &Path) {
    tiny_sparse(
        llama,
        dir,
        serde_json::json!({
            "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
            "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4,
            "norm_topk_prob": true,
        }),
    );
}

/// [`tiny_moe`] in gpt-oss's layout: attention sinks, biased projections and router,
/// fused experts with the clamped SwiGLU, a sliding layer (window 8) and a full one, YaRN.
pub fn tiny_gpt_oss(llama: &Path, dir: &Path) {
    tiny_sparse(
        llama,
        dir,
        serde_json::json!({
            "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
            "intermediate_size": 32, "num_local_experts": 4, "sliding_window": 8,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false,
                "original_max_position_embeddings": 64},
        }),
    );
}

/// [`tiny_moe`] in Mixtral's layout (`block_sparse_moe`, experts' `w1`/`w3`/`w2`) with
/// `router_jitter_noise` `jitter`.
pub fn tiny_mixtral(llama: &Path, dir: &Path, jitter: f64) {
    tiny_sparse(
        llama,
        dir,
        serde_json::json!({
            "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "intermediate_size": 32, "num_local_experts": 4, "router_jitter_noise": jitter,
        }),
    );
}

/// A stage's default for TRL's `disable_dropout`, checked: `train(name, extra)` trains a
/// short LoRA run under `name` with `extra` options and returns its final directory. When
/// the stage disables dropout by default, LoRA dropout 0.5 trains exactly the weights of
/// dropout 0 and `--disable-dropout false` other ones; otherwise the other way round.
pub fn check_dropout_default(
    train: impl Fn(&str, &[&str]) -> std::path::PathBuf,
    head: common::Head,
    disabled_by_default: bool,
) {
    let none = train("dropout-none", &[]);
    let flip = if disabled_by_default { "false" } else { "true" };
    let default = train("dropout-default", &["--lora-dropout", "0.5"]);
    let flipped = train(
        "dropout-flipped",
        &["--lora-dropout", "0.5", "--disable-dropout", flip],
    );
    let (off, on) = match disabled_by_default {
        true => (default, flipped),
        false => (flipped, default),
    };
    let off_diff = max_weight_diff(&none, &off, head);
    let on_diff = max_weight_diff(&none, &on, head);
    assert!(off_diff < 1e-7, "dropout off: {off_diff}");
    assert!(on_diff > 1e-4, "dropout on: {on_diff}");
}

/// A two-layer MoE model of 4 experts (top 2) with `arch`'s fields, on the tiny Llama
/// fixture's tokenizer.
fn tiny_sparse(llama: &Path, dir: &Path, arch: serde_json::Value) {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama.join("config.json")).unwrap()).unwrap();
    let mut config = serde_json::json!({
        "vocab_size": base["vocab_size"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts_per_tok": 2, "tie_word_embeddings": false,
        "router_aux_loss_coef": 0.001, "max_position_embeddings": 256,
        "initializer_range": 0.1, "bos_token_id": base["bos_token_id"],
        "eos_token_id": base["eos_token_id"], "pad_token_id": base["pad_token_id"],
    });
    for (k, v) in arch.as_object().unwrap() {
        config[k] = v.clone();
    }
    let config = common::models::ModelConfig::from_json(config, Path::new("config.json")).unwrap();
    let model = common::Model::new(config, &common::ModelOptions::cpu(common::Head::Lm));
    // The weights from a seeded generator of our own, not torch's global one (which the
    // tests running beside draw from too): uniform with std 0.1, the routers' 0.5, the
    // norms left at 1.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    tch::no_grad(|| {
        for (name, mut t) in model.named_tensors() {
            if name.contains("norm") {
                continue;
            }
            let std = if name.ends_with(".gate.weight") || name.ends_with(".router.weight") {
                0.5
            } else {
                0.1
            };
            let values: Vec<f32> = (0..t.numel())
                .map(|_| (uniform() * std * 3f64.sqrt()) as f32)
                .collect();
            t.copy_(&Tensor::from_slice(&values).view(t.size().as_slice()));
        }
    });
    model.save(dir, Some(llama)).unwrap();
}

/// Copies the tree `from` into `to` (created).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// Runs `check_run.py` on `model_dir` for the token-id rows `rows` (written to
/// `scratch/ids.json`) with `extra` arguments (`--tb DIR`, `--score`).
pub fn check_run(
    scratch: &Path,
    model_dir: &Path,
    rows: &[Vec<i64>],
    extra: &[&str],
) -> serde_json::Value {
    let ids_path = scratch.join(format!("ids-{}.json", std::process::id()));
    std::fs::write(&ids_path, serde_json::to_string(rows).unwrap()).unwrap();
    let mut args = vec![
        "--model",
        model_dir.to_str().unwrap(),
        "--ids",
        ids_path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_python("check_run.py", &args)
}

/// Asserts that the command `out` was refused with `want` in the last line of its stderr:
/// one clear line, not a panic.
pub fn assert_refused(out: &std::process::Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        !out.status.success() && last.contains(want) && !err.contains("panicked"),
        "expected '{want}': {err}"
    );
}

/// A stage's argument struct parsed from `argv` (no program name), as its binary would.
pub fn parse_args<T: clap::Args, S: AsRef<str>>(argv: &[S]) -> T {
    #[derive(clap::Parser)]
    struct Wrapper<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    let argv = std::iter::once("test").chain(argv.iter().map(AsRef::as_ref));
    <Wrapper<T> as clap::Parser>::parse_from(argv).args
}

/// 鸡兔同笼 rows `{"prompt","completion"}` for `range`: "There are H heads and L legs. " →
/// "R rabbits and C chickens.", one JSON line each.
pub fn cage_rows(range: std::ops::Range<i64>) -> String {
    range
        .map(|i| {
            let (rabbits, chickens) = (i % 7 + 1, i % 5 + 2);
            let heads = rabbits + chickens;
            let legs = 4 * rabbits + 2 * chickens;
            serde_json::json!({"prompt": format!("There are {heads} heads and {legs} legs. "),
                   "completion": format!("{rabbits} rabbits and {chickens} chickens.")})
            .to_string()
                + "\n"
        })
        .collect()
}

/// Right-padded rows `(ids, mask)` of `lengths.len()` rows × `width` for the parity
/// fixtures: row `r`'s token `i` is `3 + (r·row_step + i·col_step) mod 297` (ids 3..300 of
/// the tiny fixtures' vocabulary of 320; 0 pads).
pub fn padded_rows(
    lengths: &[usize],
    width: usize,
    (row_step, col_step): (usize, usize),
) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    lengths
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            let id = |i: usize| 3 + ((r * row_step + i * col_step) % 297) as i64;
            (
                (0..width)
                    .map(|i| if i < len { id(i) } else { 0 })
                    .collect(),
                (0..width).map(|i| i64::from(i < len)).collect(),
            )
        })
        .unzip()
}
