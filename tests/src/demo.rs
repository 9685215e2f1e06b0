//! The bundled example of `make demo`: chickens and rabbits in a cage (鸡兔同笼), the
//! chain-of-thought example of the lecture this project grew from.
//!
//! A problem: "Heads 11, legs 30." — a correct chain of thought: " 11*2=22, 30-22=8,
//! 8/2=4 rabbits, 11-4=7 chickens." Hurried labelers sometimes skip the halving step or
//! slip in a subtraction; SFT imitates them, the reward model learns to rank them lower, and
//! PPO should then make fewer of their mistakes. [`judge`] decides correctness.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const EOS: &str = "<|endoftext|>";
/// Numbers of chickens and of rabbits range over 0..=MAX.
pub const MAX: u32 = 20;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Problem {
    chickens: u32,
    rabbits: u32,
}

impl Problem {
    fn heads(self) -> u32 {
        self.chickens + self.rabbits
    }
    fn legs(self) -> u32 {
        2 * self.chickens + 4 * self.rabbits
    }
    fn prompt(self) -> String {
        format!("Heads {}, legs {}.", self.heads(), self.legs())
    }
    /// The careful labeler.
    fn correct(self) -> String {
        let (h, l) = (self.heads(), self.legs());
        let extra = l - 2 * h;
        format!(
            " {h}*2={}, {l}-{}={extra}, {extra}/2={} rabbits, {h}-{}={} chickens.",
            2 * h,
            2 * h,
            extra / 2,
            extra / 2,
            h - extra / 2
        )
    }
    /// Skips the halving: the extra legs are taken for rabbits.
    fn missing_step(self) -> Option<String> {
        let (h, l) = (self.heads(), self.legs());
        let extra = l - 2 * h;
        (extra > 0 && extra <= h).then(|| {
            format!(
                " {h}*2={}, {l}-{}={extra} rabbits, {h}-{extra}={} chickens.",
                2 * h,
                2 * h,
                h - extra
            )
        })
    }
    /// Slips by 1 in the halving, then carries on consistently.
    fn wrong_arithmetic(self, rng: &mut impl Rng) -> Option<String> {
        let (h, l) = (self.heads(), self.legs());
        let extra = l - 2 * h;
        let half = extra / 2;
        let wrong = if rng.random_bool(0.5) {
            half + 1
        } else {
            half.checked_sub(1)?
        };
        (wrong <= h).then(|| {
            format!(
                " {h}*2={}, {l}-{}={extra}, {extra}/2={wrong} rabbits, {h}-{wrong}={} chickens.",
                2 * h,
                2 * h,
                h - wrong
            )
        })
    }

    /// The answer alone (a standard exemplar).
    fn answer(self) -> String {
        format!("{} rabbits, {} chickens.", self.rabbits, self.chickens)
    }
    /// The ablation "equation only": one equation, then the answer.
    fn equation(self) -> String {
        let (h, l) = (self.heads(), self.legs());
        format!(
            "({l}-2*{h})/2={} rabbits, {h}-{}={} chickens.",
            self.rabbits, self.rabbits, self.chickens
        )
    }
    /// The ablation "reasoning after the answer": the answer, then the chain of thought.
    fn answer_first(self) -> String {
        let (h, l) = (self.heads(), self.legs());
        let extra = l - 2 * h;
        format!(
            "{} {h}*2={}, {l}-{}={extra}, {extra}/2={}.",
            self.answer(),
            2 * h,
            2 * h,
            self.rabbits
        )
    }

    /// A guess with no reasoning.
    fn guess(self, rng: &mut impl Rng) -> String {
        let r = rng.random_range(0..=self.heads());
        let r = if r == self.rabbits {
            (r + 1) % (self.heads() + 1)
        } else {
            r
        };
        format!(" {} rabbits, {} chickens.", r, self.heads() - r)
    }
}

/// The judge: the answer is the last "N rabbits, M chickens" of the response.
pub fn judge(prompt: &str, response: &str) -> Option<bool> {
    let nums = |s: &str| -> Vec<u32> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|t| !t.is_empty())
            .filter_map(|t| t.parse().ok())
            .collect()
    };
    let p = nums(prompt);
    let (heads, legs) = (*p.first()?, *p.get(1)?);
    // "… =R rabbits, … =C chickens": the numbers right before the two words.
    let last_number =
        |s: &str| -> Option<u32> { s.rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok() };
    let (before, after) = response.rsplit_once(" rabbits, ")?;
    let rabbits = last_number(before)?;
    let chickens = last_number(after.rsplit_once(" chickens")?.0)?;
    Some(chickens + rabbits == heads && 2 * chickens + 4 * rabbits == legs)
}

/// A character-level byte-level-BPE tokenizer: every printable ASCII character is a token,
/// no merges. Digits are single tokens, which is what arithmetic wants.
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert(EOS.into(), json!(0));
    vocab.insert("Ġ".into(), json!(1)); // space, as ByteLevel maps it
    vocab.insert("Ċ".into(), json!(2)); // newline
    for (i, c) in (33u8..=126).enumerate() {
        vocab.insert((c as char).to_string(), json!(i + 3));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": EOS, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// Rankings per training problem (each one draws its own slips and guesses).
const RANKINGS_PER_PROBLEM: usize = 2;

/// The base model's "pretraining" corpus: arithmetic tables (doubling, halving, and the
/// differences the task's numbers can need) in shuffled order, packed into rows of up to
/// `PACKED` characters ("7*2=14, 30-12=18, ..."), so that rows are about as long as the
/// demonstrations and batches carry little padding. Generic facts, not problems: the
/// stand-in for what a pretrained LM knows before SFT.
fn arithmetic_tables(max: u32, seed: u64) -> Vec<Value> {
    const PACKED: usize = 72;
    let mut facts = arithmetic_facts(max);
    facts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut rows: Vec<String> = vec![];
    for fact in facts {
        match rows.last_mut() {
            Some(row) if row.len() + 2 + fact.len() <= PACKED => {
                row.push_str(", ");
                row.push_str(&fact);
            }
            _ => rows.push(fact),
        }
    }
    rows.into_iter().map(|r| json!({"text": r})).collect()
}

fn arithmetic_facts(max: u32) -> Vec<String> {
    let (max_heads, max_legs) = (2 * max, 6 * max);
    let mut facts = vec![];
    for n in 0..=max_heads {
        facts.push(format!("{n}*2={}", 2 * n));
        facts.push(format!("{}/2={n}", 2 * n));
        for m in 0..=n {
            facts.push(format!("{n}-{m}={}", n - m));
        }
    }
    for a in (0..=max_legs).step_by(2) {
        for b in (0..=a.min(2 * max_heads)).step_by(2) {
            if a > max_heads {
                facts.push(format!("{a}-{b}={}", a - b));
            }
        }
    }
    facts
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Every problem with 0..=`max` chickens and rabbits (and at least one head), shuffled.
fn shuffled_problems(rng: &mut rand::rngs::StdRng, max: u32) -> Vec<Problem> {
    let mut problems: Vec<Problem> = (0..=max)
        .flat_map(|c| {
            (0..=max).map(move |r| Problem {
                chickens: c,
                rabbits: r,
            })
        })
        .filter(|p| p.heads() > 0)
        .collect();
    problems.shuffle(rng);
    problems
}

/// The documents of the bundled lm-eval tasks (`tasks/cage/`): the 48 problems `data`
/// holds out for `seed`, and 8 of its training problems as the shots. Each carries every
/// form of its answer (standard, chain of thought, equation only, answer first) and the
/// choices of the multiple-choice pair (up to four consecutive numbers of rabbits).
pub fn task_docs(seed: u64, max: u32) -> (Vec<Value>, Vec<Value>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let problems = shuffled_problems(&mut rng, max);
    let (eval, train) = problems.split_at(48.min(problems.len() / 4));
    let doc = |(i, p): (usize, &Problem)| {
        let (h, r) = (p.heads(), p.rabbits);
        let start = r.saturating_sub(i as u32 % 4).min(h.saturating_sub(3));
        let candidates: Vec<u32> = (start..=(start + 3).min(h)).collect();
        json!({
            "prompt": p.prompt(), "heads": h, "legs": p.legs(), "rabbits": r, "chickens": p.chickens,
            "answer": p.answer(), "cot": p.correct().trim_start(), "equation": p.equation(),
            "answer_first": p.answer_first(),
            "choices": candidates.iter().map(|n| format!("{n} rabbits, {} chickens.", h - n)).collect::<Vec<_>>(),
            "cloze": candidates.iter().map(|n| format!("There are {n}")).collect::<Vec<_>>(),
            "label": candidates.iter().position(|&n| n == r).expect("r is a candidate"),
        })
    };
    let docs = |ps: &[Problem]| ps.iter().enumerate().map(doc).collect();
    (docs(eval), docs(&train[..8]))
}

/// The SFT sets of `make demo-prompting`: every training problem of `data(…, seed, max)`
/// once, demonstrated in each of the four styles of the lecture's chain-of-thought table
/// (all correct: only the form differs), as `sft_<style>.jsonl` in `out`.
pub fn prompting_data(out: &Path, seed: u64, max: u32) -> Value {
    std::fs::create_dir_all(out).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let problems = shuffled_problems(&mut rng, max);
    let (_, train) = problems.split_at(48.min(problems.len() / 4));
    type Style = (&'static str, fn(Problem) -> String);
    let styles: [Style; 4] = [
        ("standard", Problem::answer),
        ("cot", |p| p.correct().trim_start().to_string()),
        ("equation", Problem::equation),
        ("answer_first", Problem::answer_first),
    ];
    for (style, form) in styles {
        let rows: Vec<Value> = train
            .iter()
            .map(|&p| json!({"prompt": p.prompt(), "completion": format!(" {}", form(p))}))
            .collect();
        write_jsonl(&out.join(format!("sft_{style}.jsonl")), &rows);
    }
    json!({"train_problems": train.len(), "styles": styles.map(|s| s.0)})
}

/// Writes the task's data, tokenizer and from-scratch base model into `out`, for problems
/// with 0..=`max` chickens and rabbits (48 held out for evaluation).
pub fn data(out: &Path, seed: u64, max: u32) -> Value {
    std::fs::create_dir_all(out.join("base")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let problems = shuffled_problems(&mut rng, max);
    // 48 held out (a quarter of the problems at most, for small tests).
    let (eval, train) = problems.split_at(48.min(problems.len() / 4));

    // SFT: 4 demonstrations per problem; half from hurried labelers (40 % skip the
    // halving step, 10 % slip by one in it): flaws SFT imitates and a reward model learns
    // to see.
    let mut sft = vec![];
    for p in train {
        for _ in 0..4 {
            let completion = match rng.random_range(0..10) {
                0..=3 => p.missing_step(),
                4 => p.wrong_arithmetic(&mut rng),
                _ => None,
            }
            .unwrap_or_else(|| p.correct());
            sft.push(json!({"prompt": p.prompt(), "completion": completion}));
        }
    }
    // Rankings of K = 4, best first: correct, slipped arithmetic, skipped step, guess.
    let ranking = |p: &Problem, rng: &mut rand::rngs::StdRng| -> Value {
        let mut responses = vec![p.correct()];
        responses.extend(p.wrong_arithmetic(rng));
        responses.extend(p.missing_step());
        responses.push(p.guess(rng));
        json!({"prompt": p.prompt(), "responses": responses})
    };
    let rankings: Vec<Value> = train
        .iter()
        .flat_map(|p| {
            (0..RANKINGS_PER_PROBLEM)
                .map(|_| ranking(p, &mut rng))
                .collect::<Vec<_>>()
        })
        .collect();
    let rankings_eval: Vec<Value> = eval.iter().map(|p| ranking(p, &mut rng)).collect();
    // The answer (the number of rabbits) rides along for GRPO's exact-answer verifier;
    // every other stage reads the prompt only.
    let prompts = |ps: &[Problem]| -> Vec<Value> {
        ps.iter()
            .map(|p| json!({"prompt": p.prompt(), "answer": p.rabbits.to_string()}))
            .collect()
    };
    write_jsonl(
        &out.join("pretrain.jsonl"),
        &arithmetic_tables(max, seed.wrapping_add(1)),
    );
    write_jsonl(&out.join("sft.jsonl"), &sft);
    write_jsonl(&out.join("rankings.jsonl"), &rankings);
    write_jsonl(&out.join("rankings_eval.jsonl"), &rankings_eval);
    write_jsonl(&out.join("prompts.jsonl"), &prompts(train));
    write_jsonl(&out.join("eval_prompts.jsonl"), &prompts(eval));

    // The base model: a small Llama, initialised from scratch.
    let base = out.join("base");
    std::fs::write(base.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(
        base.join("tokenizer_config.json"),
        json!({"eos_token": EOS, "pad_token": EOS}).to_string(),
    )
    .unwrap();
    std::fs::write(
        base.join("generation_config.json"),
        json!({"eos_token_id": 0, "pad_token_id": 0}).to_string(),
    )
    .unwrap();
    let config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 97,
        "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "initializer_range": 0.02
    });
    tch::manual_seed(seed as i64);
    let config = common::ModelConfig::from_json(config, Path::new("config.json")).unwrap();
    common::Model::new(config, &common::ModelOptions::cpu(common::Head::Lm))
        .save(&base, None)
        .unwrap();
    json!({"train_problems": train.len(), "eval_problems": eval.len(), "sft_rows": sft.len(),
           "rankings": rankings.len(), "out": out})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tasks/cage/` holds what `demo tasks-data` writes: the demo's held-out problems.
    #[test]
    fn the_bundled_task_documents_are_the_generators() {
        let (test, shots) = task_docs(1, MAX);
        for (name, docs) in [("test.jsonl", test), ("shots.jsonl", shots)] {
            let path = crate::repo_root().join("tasks/cage").join(name);
            let stored: Vec<Value> = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(
                stored,
                docs,
                "{}: run `demo tasks-data --out tasks/cage`",
                path.display()
            );
        }
        // Every form of an answer is one the judge accepts.
        let (test, _) = task_docs(1, MAX);
        for d in &test {
            let p = d["prompt"].as_str().unwrap();
            for form in ["answer", "cot", "equation", "answer_first"] {
                assert_eq!(
                    judge(p, &format!(" {}", d[form].as_str().unwrap())),
                    Some(true),
                    "{form}: {d}"
                );
            }
        }
    }

    /// The bundled tasks score a response as the demo's judge does: the regex filter and
    /// exact_match of `tasks/cage/_cage.yaml` agree with [`judge`] on every kind of answer
    /// (correct, a skipped step, a slip, a guess, and the ablations' forms).
    #[test]
    fn the_task_files_score_as_the_judge() {
        use data::lmeval::metrics::Metric;
        let path = crate::repo_root().join("tasks/cage/cage_zero_shot.yaml");
        let task = data::lmeval::Task::load(&path, &Default::default()).unwrap();
        let pipeline = &task.config.filters[0];
        let Metric::ExactMatch(em) = &task.config.metrics[0] else {
            panic!("exact_match")
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (mut right, mut wrong) = (0, 0);
        for doc in &task.docs {
            let (h, r) = (
                doc["heads"].as_u64().unwrap() as u32,
                doc["rabbits"].as_u64().unwrap() as u32,
            );
            let p = Problem {
                chickens: h - r,
                rabbits: r,
            };
            let gold = &task.gold_texts(doc).unwrap()[0];
            let mut responses = vec![
                p.correct(),
                p.guess(&mut rng),
                format!(" {}", p.equation()),
                format!(" {}", p.answer_first()),
            ];
            responses.extend(p.missing_step());
            responses.extend(p.wrong_arithmetic(&mut rng));
            for resp in responses {
                let scored = em.score(&pipeline.apply(std::slice::from_ref(&resp)), gold) == 1.0;
                assert_eq!(Some(scored), judge(&p.prompt(), &resp), "{resp:?}");
                if scored {
                    right += 1
                } else {
                    wrong += 1
                }
            }
        }
        assert!(right > 100 && wrong > 100, "{right} {wrong}");
    }

    #[test]
    fn the_judge_accepts_correct_and_rejects_flawed_answers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for c in 0..=MAX {
            for r in 0..=MAX {
                let p = Problem {
                    chickens: c,
                    rabbits: r,
                };
                if p.heads() == 0 {
                    continue;
                }
                assert_eq!(
                    judge(&p.prompt(), &p.correct()),
                    Some(true),
                    "{}",
                    p.correct()
                );
                if let Some(m) = p.missing_step() {
                    assert_eq!(judge(&p.prompt(), &m), Some(false), "{m}");
                }
                if let Some(w) = p.wrong_arithmetic(&mut rng) {
                    assert_eq!(judge(&p.prompt(), &w), Some(false), "{w}");
                }
                assert_eq!(judge(&p.prompt(), &p.guess(&mut rng)), Some(false));
            }
        }
        assert_eq!(judge("Heads 3, legs 10.", " no idea"), None);
    }
}
