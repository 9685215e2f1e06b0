//! Distillation from a teacher with another tokenizer, `sft train --teacher-model DIR
//! --use-uld-loss`: TRL's experimental `GOLDTrainer` (General Online Logit Distillation,
//! Hugging Face 2025) with its ULD loss (Boizard et al. 2024, "Towards Cross-Tokenizer
//! Distillation: the Universal Logit Distillation Loss for LLMs").
//!
//! Each completion (the data's, or the student's sample on an on-policy step) is read back
//! as text and tokenized again by the teacher's tokenizer, after the prompt's text: the
//! teacher reads its own tokens. The two tokenizations of the completion are aligned by the
//! bytes of text each token stands for ([`align_by_byte_offsets`]): a group closes where
//! both tokenizers split. Within a group of several tokens, one side's distributions are
//! merged into one ([`merge`]), and each aligned pair of distributions is compared without
//! a shared vocabulary: both sorted, the L1 distance between them ([`sorted_l1`]); or
//! (`--uld-use-hybrid-loss`) the generalized JSD over the tokens both vocabularies spell
//! alike plus the sorted L1 over the rest ([`hybrid`]). A row's loss is the mean over its
//! aligned groups; a step's is the mean over its rows.
//!
//! The student's completion is read as its text; a last token that is the student's EOS
//! stands for no text (zero bytes wide at the completion's end), as TRL reads a prompt-
//! completion row, and the teacher's EOS follows its tokens likewise. A prompt's leading
//! BOS is the student's own: the teacher's tokenizer adds its own special tokens.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use common::Model;
use data::sft::{SftBatch, TokenizedSft};
use data::tokenizer::ByteSpan;
use data::Tokenizer;
use serde::Serialize;
use tch::{Kind, Tensor};

/// GOLD's options of `sft train`, under TRL's `GOLDConfig` names.
#[derive(Debug, Clone, Args, Serialize)]
pub struct GoldArgs {
    /// The loss becomes ULD's, which needs no shared vocabulary: the teacher may have its
    /// own tokenizer (TRL's GOLD `use_uld_loss`).
    #[arg(long, requires = "teacher_model")]
    pub use_uld_loss: bool,
    /// The teacher's tokenizer: a directory with tokenizer.json (default: --teacher-model's
    /// own; TRL's `teacher_tokenizer_name_or_path`).
    #[arg(long, requires = "use_uld_loss")]
    pub teacher_tokenizer_name_or_path: Option<PathBuf>,
    /// Align the two tokenizations by the bytes each token stands for, merging split
    /// tokens (needs byte-level BPE tokenizers); false: position by position, the longer
    /// cut to the shorter, as the original ULD (TRL's `use_extended_uld`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub use_extended_uld: bool,
    /// observed: the distributions at the answer positions (each predicts the token after
    /// it); a group's first distribution times the probabilities of its later tokens.
    /// bayesian: the distributions one position earlier (each predicts its own token); a
    /// group's last distribution times the probabilities of its earlier tokens (TRL's
    /// `uld_token_merge_strategy`).
    #[arg(long, value_enum, default_value = "observed")]
    pub uld_token_merge_strategy: MergeStrategy,
    /// The generalized JSD (at --beta) over the tokens both vocabularies spell alike, the
    /// sorted L1 over the others (TRL's `uld_use_hybrid_loss`).
    #[arg(long)]
    pub uld_use_hybrid_loss: bool,
    /// The hybrid loss's weight of its matched-token part (with
    /// --uld-hybrid-unmatched-weight; default: the share of the teacher's vocabulary the
    /// student's spells alike, the rest to the unmatched part).
    #[arg(long)]
    pub uld_hybrid_matched_weight: Option<f64>,
    /// The hybrid loss's weight of its unmatched part.
    #[arg(long)]
    pub uld_hybrid_unmatched_weight: Option<f64>,
    /// Weight of the student's cross-entropy on the completion tokens, added to the loss
    /// (TRL's `uld_crossentropy_weight`).
    #[arg(long, default_value_t = 0.0)]
    pub uld_crossentropy_weight: f64,
    /// Weight of the ULD distillation loss (TRL's `uld_distillation_weight`).
    #[arg(long, default_value_t = 1.0)]
    pub uld_distillation_weight: f64,
    /// The student's logits are divided by it (TRL's `uld_student_temperature`).
    #[arg(long, default_value_t = 1.0)]
    pub uld_student_temperature: f64,
    /// The teacher's logits are divided by it (TRL's `uld_teacher_temperature`).
    #[arg(long, default_value_t = 1.0)]
    pub uld_teacher_temperature: f64,
    /// Leave the student's last completion token out (its EOS; TRL's
    /// `uld_skip_student_eos`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub uld_skip_student_eos: bool,
    /// Leave the teacher's EOS out (TRL's `uld_skip_teacher_eos`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub uld_skip_teacher_eos: bool,
}

/// `--uld-token-merge-strategy`, under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MergeStrategy {
    Observed,
    Bayesian,
}

impl GoldArgs {
    pub fn validate(&self) -> Result<()> {
        let on = self.use_uld_loss;
        let given = |b: bool| !on && b;
        common::cli::require(&[
            (
                self.uld_crossentropy_weight >= 0.0 && self.uld_crossentropy_weight.is_finite(),
                "--uld-crossentropy-weight must be ≥ 0",
            ),
            (
                self.uld_distillation_weight >= 0.0 && self.uld_distillation_weight.is_finite(),
                "--uld-distillation-weight must be ≥ 0",
            ),
            (
                self.uld_student_temperature > 0.0 && self.uld_teacher_temperature > 0.0,
                "--uld-student-temperature and --uld-teacher-temperature must be > 0",
            ),
            (
                self.uld_hybrid_matched_weight.is_some() == self.uld_hybrid_unmatched_weight.is_some(),
                "--uld-hybrid-matched-weight and --uld-hybrid-unmatched-weight go together (neither: weights by the vocabularies' overlap)",
            ),
            (
                [self.uld_hybrid_matched_weight, self.uld_hybrid_unmatched_weight]
                    .iter()
                    .flatten()
                    .all(|w| *w >= 0.0 && w.is_finite()),
                "--uld-hybrid-matched-weight and --uld-hybrid-unmatched-weight must be ≥ 0",
            ),
            (
                self.uld_use_hybrid_loss || self.uld_hybrid_matched_weight.is_none(),
                "--uld-hybrid-matched-weight and --uld-hybrid-unmatched-weight apply with --uld-use-hybrid-loss",
            ),
            (
                !given(
                    self.uld_use_hybrid_loss
                        || !self.use_extended_uld
                        || self.uld_token_merge_strategy != MergeStrategy::Observed
                        || self.uld_crossentropy_weight != 0.0
                        || self.uld_distillation_weight != 1.0
                        || self.uld_student_temperature != 1.0
                        || self.uld_teacher_temperature != 1.0
                        || !self.uld_skip_student_eos
                        || !self.uld_skip_teacher_eos,
                ),
                "the --uld-* and --use-extended-uld options apply with --use-uld-loss",
            ),
        ])?;
        Ok(())
    }
}

/// The teacher's side of GOLD: its tokenizer, and (hybrid) which of its tokens the
/// student's vocabulary spells alike.
pub struct Uld {
    tokenizer: Tokenizer,
    args: GoldArgs,
    /// The generalized JSD's β of the hybrid loss (--beta).
    beta: f64,
    /// Hybrid: which tokens the vocabularies spell alike.
    matched: Option<Matched>,
}

/// What [`Uld::losses`] gives of a micro-batch.
pub struct UldLosses {
    /// Each row's distillation loss (weighted by --uld-distillation-weight), `[B]`, with
    /// the student's gradient.
    pub rows: Tensor,
    /// With --uld-crossentropy-weight: the student's NLL summed over the completion tokens.
    pub nll_sum: Option<Tensor>,
    /// Hybrid: Σ over the rows of their matched and unmatched parts.
    pub matched: f64,
    pub unmatched: f64,
}

/// One tokenization of a row: its ids, where the answer (the completion) lies, and the
/// bytes of the completion's text each answer token stands for.
struct Side {
    ids: Vec<i64>,
    answer: Range<usize>,
    offsets: Vec<ByteSpan>,
}

/// Where one row's loss reads each model: the positions whose distributions are compared
/// (`logits`, the answer positions or one before them) and, relative to them, the aligned
/// groups; the tokens at those answer positions.
struct Read {
    logits: Range<usize>,
    tokens: Vec<i64>,
    groups: Vec<Range<usize>>,
}

impl Uld {
    /// The teacher's tokenizer (--teacher-tokenizer-name-or-path, else `teacher_dir`'s),
    /// checked for what the options need.
    pub fn load(
        args: &GoldArgs,
        beta: f64,
        teacher_dir: &Path,
        (student_tok, student, teacher): (&Tokenizer, &Model, &Model),
    ) -> Result<Uld> {
        let dir = args
            .teacher_tokenizer_name_or_path
            .as_deref()
            .unwrap_or(teacher_dir);
        let tokenizer = Tokenizer::load(dir)
            .with_context(|| format!("loading the teacher's tokenizer from {}", dir.display()))?;
        for (tok, model, whose) in [
            (student_tok, student, "the student's"),
            (&tokenizer, teacher, "the teacher's"),
        ] {
            let (n, v) = (tok.vocab_size() as i64, model.config.vocab_size());
            if n > v {
                bail!("--use-uld-loss: {whose} tokenizer has {n} tokens, more than the {v} its model's vocabulary holds (is --teacher-tokenizer-name-or-path the teacher's?)");
            }
        }
        if args.use_extended_uld {
            for (tok, whose) in [
                (student_tok, "the student's"),
                (&tokenizer, "the teacher's"),
            ] {
                if !tok.is_byte_level() {
                    bail!("--use-uld-loss: {whose} tokenizer is not a byte-level BPE tokenizer, and extended ULD aligns the tokenizations by the bytes each token spells (TRL supports ByteLevel only); give --use-extended-uld false for positional alignment");
                }
            }
        }
        let matched = args.uld_use_hybrid_loss.then(|| {
            let (vs, vt) = (student.config.vocab_size(), teacher.config.vocab_size());
            let student_vocab = student_tok.vocabulary();
            let mut pairs: Vec<(i64, i64)> = tokenizer
                .vocabulary()
                .iter()
                .filter_map(|(text, &t)| Some((i64::from(t), i64::from(*student_vocab.get(text)?))))
                .filter(|&(t, s)| t < vt && s < vs)
                .collect();
            pairs.sort_unstable();
            let (t, s): (Vec<i64>, Vec<i64>) = pairs.into_iter().unzip();
            Matched::new((&s, vs), (&t, vt), student.device())
        });
        if let Some(m) = &matched {
            tracing::info!(
                "GOLD: {} of the teacher's {} tokens are spelled alike in the student's vocabulary",
                m.teacher.size()[0],
                teacher.config.vocab_size()
            );
        }
        Ok(Uld {
            tokenizer,
            args: args.clone(),
            beta,
            matched,
        })
    }

    /// The rows' ULD losses (and what the step logs of them) between `student`, reading
    /// `batch` (the collated `rows`, tokenized by `student_tok`), and `teacher`, reading
    /// the same prompts and completions in its own tokens.
    pub fn losses(
        &self,
        (student, student_tok): (&Model, &Tokenizer),
        teacher: &Model,
        rows: &[&TokenizedSft],
        batch: &SftBatch,
    ) -> Result<UldLosses> {
        let a = &self.args;
        let mut sides = vec![];
        for row in rows {
            let Some((student_side, prompt, completion)) = student_side(row, student_tok) else {
                sides.push(None);
                continue;
            };
            let teacher_side = self.teacher_side(&prompt, &completion, teacher)?;
            sides.push(Some((student_side, teacher_side)));
        }
        let reads: Vec<Option<(Read, Read)>> = sides
            .iter()
            .map(|s| s.as_ref().and_then(|(st, te)| self.reads(st, te)))
            .collect();

        // Both models' distributions at the positions each row's loss reads, in one pass
        // of each head.
        let device = student.device();
        let width = |b: &SftBatch| b.input_ids.size()[1] as usize;
        let positions = |which: fn(&(Read, Read)) -> &Read, t: usize| -> Vec<i64> {
            (reads.iter().enumerate())
                .flat_map(|(b, r)| {
                    r.as_ref()
                        .map_or(0..0, |r| which(r).logits.clone())
                        .map(move |p| (b * t + p) as i64)
                })
                .collect()
        };
        let probs_at = |m: &Model, b: &SftBatch, at: Vec<i64>, temperature: f64| {
            let h = m.hidden(&b.input_ids, &b.attention_mask, None);
            let hs = h.size();
            let rows = h
                .reshape([-1, hs[2]])
                .index_select(0, &Tensor::from_slice(&at).to_device(device));
            let logits = m.head_output(&rows).to_kind(Kind::Float) / temperature;
            (logits.softmax(-1, Kind::Float), h)
        };
        let teacher_rows: Vec<TokenizedSft> = sides
            .iter()
            .map(|s| {
                let ids = s
                    .as_ref()
                    .map_or(vec![self.tokenizer.pad_id], |(_, t)| t.ids.clone());
                let n = ids.len();
                TokenizedSft::new(ids, vec![0; n])
            })
            .collect();
        let teacher_batch = data::sft::collate(
            &teacher_rows.iter().collect::<Vec<_>>(),
            self.tokenizer.pad_id,
            device,
        );
        let teacher_at = positions(|r| &r.1, width(&teacher_batch));
        let (teacher_probs, _) = tch::no_grad(|| {
            probs_at(
                teacher,
                &teacher_batch,
                teacher_at,
                a.uld_teacher_temperature,
            )
        });
        let student_at = positions(|r| &r.0, width(batch));
        let (student_probs, hidden) =
            probs_at(student, batch, student_at, a.uld_student_temperature);

        let (mut losses, mut parts) = (vec![], vec![]);
        let (mut s_at, mut t_at) = (0, 0);
        for r in &reads {
            let Some((s, t)) = r else {
                // Nothing to compare: 0, on the student's graph (a step may have no other
                // row to backpropagate through).
                losses.push(student_probs.sum(Kind::Float) * 0.0);
                continue;
            };
            let (sn, tn) = (s.logits.len() as i64, t.logits.len() as i64);
            let sp = student_probs.narrow(0, s_at, sn);
            let tp = teacher_probs.narrow(0, t_at, tn);
            (s_at, t_at) = (s_at + sn, t_at + tn);
            let (sa, ta) = match a.use_extended_uld {
                true => (
                    merge(&sp, &s.groups, &s.tokens, a.uld_token_merge_strategy),
                    merge(&tp, &t.groups, &t.tokens, a.uld_token_merge_strategy),
                ),
                false => {
                    let n = sn.min(tn);
                    (sp.narrow(0, 0, n), tp.narrow(0, 0, n))
                }
            };
            let loss = match &self.matched {
                Some(m) => {
                    let weights = a
                        .uld_hybrid_matched_weight
                        .zip(a.uld_hybrid_unmatched_weight);
                    let h = hybrid(&sa, &ta, m, weights, self.beta);
                    parts.push(Tensor::stack(&[h.matched, h.unmatched], 0));
                    h.loss
                }
                None => sorted_l1(&sa, &ta),
            };
            losses.push(loss * a.uld_distillation_weight);
        }
        let nll_sum =
            (a.uld_crossentropy_weight > 0.0).then(|| completion_nll(student, &hidden, batch));
        // The hybrid parts' sums, read from the device once.
        let (matched, unmatched) = match parts.is_empty() {
            true => (0.0, 0.0),
            false => {
                let sums =
                    Tensor::stack(&parts, 0).sum_dim_intlist([0].as_slice(), false, Kind::Double);
                (sums.double_value(&[0]), sums.double_value(&[1]))
            }
        };
        Ok(UldLosses {
            rows: Tensor::stack(&losses, 0),
            nll_sum,
            matched,
            unmatched,
        })
    }

    /// TRL's `build_teacher_inputs_from_texts` for one row: the prompt's text in the
    /// teacher's tokens (its special tokens added, a trailing EOS dropped), the completion's
    /// with each token's bytes, then the teacher's EOS (zero bytes wide at the end). A
    /// sequence longer than the teacher reads loses prompt tokens from its front.
    fn teacher_side(&self, prompt: &str, completion: &str, teacher: &Model) -> Result<Side> {
        let tok = &self.tokenizer;
        let mut ids = tok.encode(prompt, true)?;
        if ids.last().is_some() && ids.last() == tok.eos_id.as_ref() {
            ids.pop();
        }
        let (completion_ids, mut offsets) = match self.args.use_extended_uld {
            true => tok.encode_with_byte_offsets(completion, false)?,
            false => {
                let ids = tok.encode(completion, false)?;
                let n = ids.len();
                (ids, vec![(0, 0); n])
            }
        };
        let mut answer = completion_ids;
        if let Some(eos) = tok.eos_id {
            answer.push(eos);
            let end = match self.args.use_extended_uld {
                true => completion.len(),
                false => 0,
            };
            offsets.push((end, end));
        }
        if let Some(max) = teacher.max_positions() {
            if answer.len() > max {
                bail!("--use-uld-loss: a completion of {} tokens in the teacher's tokenizer is longer than the {max} positions the teacher reads; lower --max-length or --max-new-tokens", answer.len());
            }
            let cut = (ids.len() + answer.len()).saturating_sub(max);
            ids.drain(..cut);
        }
        let start = ids.len();
        ids.extend(answer);
        Ok(Side {
            answer: start..ids.len(),
            ids,
            offsets,
        })
    }

    /// TRL's `ULDLoss._compute_distillation_loss` up to the distributions: which positions
    /// each side's loss reads, its tokens there and (extended) the aligned groups; `None`
    /// where a side has nothing left to compare (the row's loss is 0).
    fn reads(&self, student: &Side, teacher: &Side) -> Option<(Read, Read)> {
        let a = &self.args;
        let bayesian = a.uld_token_merge_strategy == MergeStrategy::Bayesian;
        // The answers, less each side's EOS where skipped: (start, size), the offsets
        // relative to the answer's start.
        let trimmed = |side: &Side, skip: bool| {
            let size = side.answer.len().saturating_sub(usize::from(skip));
            (side.answer.start, size)
        };
        let (mut s, mut t) = (
            trimmed(student, a.uld_skip_student_eos),
            trimmed(teacher, a.uld_skip_teacher_eos),
        );
        let offsets_of = |side: &Side, (start, size): (usize, usize)| {
            let from = start - side.answer.start;
            side.offsets[from..from + size].to_vec()
        };
        if s.1 == 0 || t.1 == 0 {
            return None;
        }
        // Bayesian reads the distribution before each token: an answer at position 0 has
        // none, so the first aligned group (or position) is left out on both sides.
        if bayesian && (s.0 == 0 || t.0 == 0) {
            let (ds, dt) = match a.use_extended_uld {
                true => {
                    let (sg, tg) =
                        align_by_byte_offsets(&offsets_of(student, s), &offsets_of(teacher, t));
                    (sg.first()?.len(), tg.first()?.len())
                }
                false => (1, 1),
            };
            s = (s.0 + ds, s.1.checked_sub(ds)?);
            t = (t.0 + dt, t.1.checked_sub(dt)?);
            if s.1 == 0 || t.1 == 0 {
                return None;
            }
        }
        let read = |side: &Side, (start, size): (usize, usize), groups: Vec<Range<usize>>| {
            let shift = usize::from(bayesian);
            Read {
                logits: start - shift..start + size - shift,
                tokens: side.ids[start..start + size].to_vec(),
                groups,
            }
        };
        let (sg, tg) = match a.use_extended_uld {
            true => {
                let (sg, tg) =
                    align_by_byte_offsets(&offsets_of(student, s), &offsets_of(teacher, t));
                // Pairs with an empty side (the teacher's zero-width EOS when kept) are
                // left out.
                (sg.into_iter().zip(tg))
                    .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                    .unzip()
            }
            false => (vec![], vec![]),
        };
        if a.use_extended_uld && sg.is_empty() {
            return None;
        }
        Some((read(student, s, sg), read(teacher, t, tg)))
    }
}

/// The student's side of a row: its answer (the last completion span), each answer
/// token's bytes (a last token that is the EOS: zero wide at the end), and the prompt's
/// and the completion's text for the teacher. `None` for a row without a completion.
fn student_side(row: &TokenizedSft, tok: &Tokenizer) -> Option<(Side, String, String)> {
    let start = crate::distill::prompt_length(row)?;
    let end = row.loss_mask.iter().rposition(|&m| m == 1)? + 1;
    let answer = &row.ids[start..end];
    let eos_last = tok.eos_id.is_some() && answer.last() == tok.eos_id.as_ref();
    let content = &answer[..answer.len() - usize::from(eos_last)];
    let mut offsets = Vec::with_capacity(answer.len());
    let mut cursor = 0;
    for &id in content {
        let n = tok.piece_bytes(id);
        offsets.push((cursor, cursor + n));
        cursor += n;
    }
    if eos_last {
        offsets.push((cursor, cursor));
    }
    let bos =
        usize::from(start > 0 && tok.bos_id.is_some() && row.ids.first() == tok.bos_id.as_ref());
    let prompt = tok.decode(&row.ids[bos..start], false);
    let completion = tok.decode(content, false);
    let side = Side {
        ids: row.ids.clone(),
        answer: start..end,
        offsets,
    };
    Some((side, prompt, completion))
}

/// TRL's `ULDLoss._align_by_byte_offsets`: walk both tokenizations' byte spans, advancing
/// the side whose token ends first; a group closes where both end at the same byte. What
/// is left when one side runs out is one last group (one side of it possibly empty).
pub fn align_by_byte_offsets(
    s: &[ByteSpan],
    t: &[ByteSpan],
) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    let (mut sg, mut tg) = (vec![], vec![]);
    let (mut s0, mut t0, mut i, mut j) = (0, 0, 0, 0);
    while i < s.len() && j < t.len() {
        match s[i].1.cmp(&t[j].1) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
                sg.push(s0..i);
                tg.push(t0..j);
                (s0, t0) = (i, j);
            }
        }
    }
    if i < s.len() || j < t.len() {
        sg.push(s0..s.len());
        tg.push(t0..t.len());
    }
    (sg, tg)
}

/// TRL's `_merge_probabilities_with_alignment_groups`: one distribution per group of
/// `probs` `[N, V]` (at the positions of `tokens`). Observed: the group's first
/// distribution times the probabilities (at least 1e-8) of the group's later tokens where
/// they were read; Bayesian: its last distribution times those of its earlier tokens.
/// Unnormalised, with the gradient of every factor.
pub fn merge(
    probs: &Tensor,
    groups: &[Range<usize>],
    tokens: &[i64],
    strategy: MergeStrategy,
) -> Tensor {
    let device = probs.device();
    let n = tokens.len();
    let (base, factors): (Vec<i64>, Vec<Vec<f32>>) = groups
        .iter()
        .map(|g| {
            let (base, scalars) = match strategy {
                MergeStrategy::Observed => (g.start, g.start + 1..g.end),
                MergeStrategy::Bayesian => (g.end - 1, g.start..g.end - 1),
            };
            let mut row = vec![0f32; n];
            for p in scalars {
                row[p] = 1.0;
            }
            (base as i64, row)
        })
        .unzip();
    let ids = Tensor::from_slice(tokens).to_device(device).unsqueeze(1);
    let picked = probs
        .gather(1, &ids, false)
        .squeeze_dim(1)
        .clamp_min(1e-8)
        .log();
    let membership = Tensor::from_slice2(&factors).to_device(device);
    let factor = membership.matmul(&picked).exp();
    probs.index_select(0, &Tensor::from_slice(&base).to_device(device)) * factor.unsqueeze(1)
}

/// Both sides' distributions `[G, V]`, `[G, V']` sorted, the shorter padded with zeros:
/// the L1 distance summed, over G (ULD's loss).
pub fn sorted_l1(student: &Tensor, teacher: &Tensor) -> Tensor {
    let sorted = |t: &Tensor| t.sort(-1, true).0;
    let (s, t) = (sorted(student), sorted(teacher));
    let (vs, vt) = (s.size()[1], t.size()[1]);
    let pad = |x: Tensor, v: i64| match v < vs.max(vt) {
        true => x.constant_pad_nd([0, vs.max(vt) - v]),
        false => x,
    };
    let groups = student.size()[0].max(1) as f64;
    (pad(s, vs) - pad(t, vt)).abs().sum(Kind::Float) / groups
}

/// The tokens two vocabularies spell alike: their ids in each (in pairs), and each side's
/// other ids.
pub struct Matched {
    pub student: Tensor,
    pub teacher: Tensor,
    student_rest: Tensor,
    teacher_rest: Tensor,
}

impl Matched {
    /// Pairs `student[i]`, `teacher[i]` of vocabularies of `vs` and `vt` tokens, on `device`.
    pub fn new(
        (student, vs): (&[i64], i64),
        (teacher, vt): (&[i64], i64),
        device: tch::Device,
    ) -> Matched {
        let rest = |ids: &[i64], v: i64| {
            let mut keep = vec![true; v as usize];
            for &i in ids {
                keep[i as usize] = false;
            }
            let rest: Vec<i64> = (0..v).filter(|&i| keep[i as usize]).collect();
            Tensor::from_slice(&rest).to_device(device)
        };
        Matched {
            student: Tensor::from_slice(student).to_device(device),
            teacher: Tensor::from_slice(teacher).to_device(device),
            student_rest: rest(student, vs),
            teacher_rest: rest(teacher, vt),
        }
    }
}

/// TRL's `_compute_hybrid_uld_loss`'s parts.
pub struct Hybrid {
    pub loss: Tensor,
    pub matched: Tensor,
    pub unmatched: Tensor,
}

/// TRL's `_compute_hybrid_uld_loss`: over the tokens both vocabularies spell alike
/// (`matched`), the generalized JSD at `beta` of the
/// (merged, unnormalised) probabilities' logs, summed over them and averaged over the
/// groups; over the other tokens of each side, [`sorted_l1`]. Weighted by `weights`
/// (matched, unmatched), else by the share of the teacher's vocabulary matched.
pub fn hybrid(
    student: &Tensor,
    teacher: &Tensor,
    matched: &Matched,
    weights: Option<(f64, f64)>,
    beta: f64,
) -> Hybrid {
    let (s_ids, t_ids) = (&matched.student, &matched.teacher);
    let groups = student.size()[0].max(1) as f64;
    let log = |p: Tensor| p.clamp_min(1e-8).log();
    let count = t_ids.size()[0];
    let zero = || Tensor::zeros([], (Kind::Float, student.device()));
    let matched_loss = match count {
        0 => zero(),
        _ => {
            common::ops::generalized_jsd_of_logprobs(
                &log(student.index_select(1, s_ids)),
                &log(teacher.index_select(1, t_ids)),
                beta,
            )
            .sum(Kind::Float)
                / groups
        }
    };
    let s_rest = student.index_select(1, &matched.student_rest);
    let t_rest = teacher.index_select(1, &matched.teacher_rest);
    let unmatched_loss = match s_rest.size()[1] > 0 && t_rest.size()[1] > 0 {
        true => sorted_l1(&s_rest, &t_rest),
        false => zero(),
    };
    let (wm, wu) = weights.unwrap_or_else(|| {
        let share = count as f64 / (teacher.size()[1].max(1) as f64);
        (share, 1.0 - share)
    });
    Hybrid {
        loss: &matched_loss * wm + &unmatched_loss * wu,
        matched: matched_loss.detach(),
        unmatched: unmatched_loss.detach(),
    }
}

/// The student's NLL summed over `batch`'s completion tokens, from its hidden states
/// `[B, T, H]`.
fn completion_nll(student: &Model, hidden: &Tensor, batch: &SftBatch) -> Tensor {
    let t = batch.input_ids.size()[1];
    let h = hidden.size()[2];
    let mask = batch.loss_mask.narrow(1, 1, t - 1).reshape([-1]);
    let at = mask.nonzero().squeeze_dim(1);
    let rows = hidden
        .narrow(1, 0, t - 1)
        .reshape([-1, h])
        .index_select(0, &at);
    let labels = batch
        .input_ids
        .narrow(1, 1, t - 1)
        .reshape([-1])
        .index_select(0, &at);
    let logits = student.head_output(&rows).to_kind(Kind::Float);
    -common::ops::logprobs_of(&logits, &labels).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups close where both tokenizations end at the same byte; a tail left on one
    /// side is one last group.
    #[test]
    fn tokenizations_align_where_both_split() {
        // "rabbits": "rab|bits" against "r|abb|its".
        let s = [(0, 3), (3, 7)];
        let t = [(0, 1), (1, 4), (4, 7)];
        let (sg, tg) = align_by_byte_offsets(&s, &t);
        assert_eq!((sg.len(), tg.len()), (1, 1));
        assert_eq!((sg[0].clone(), tg[0].clone()), (0..2, 0..3));
        // " 2 rabbits": " 2| rabbits" against " 2| rab|bits", then the teacher's zero-width EOS
        // at the end: its own group with an empty student side.
        let s = [(0, 2), (2, 10)];
        let t = [(0, 2), (2, 6), (6, 10), (10, 10)];
        assert_eq!(
            align_by_byte_offsets(&s, &t),
            (vec![0..1, 1..2, 2..2], vec![0..1, 1..3, 3..4])
        );
    }

    /// A group's merged distribution: observed, the first position's times the later
    /// tokens' probabilities; Bayesian, the last position's times the earlier ones'.
    #[test]
    fn merging_multiplies_in_the_other_tokens_probabilities() {
        let probs = Tensor::from_slice2(&[[0.5f32, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]);
        let tokens = [1, 2, 0];
        let groups = [0..2, 2..3];
        let got = |s| Vec::<Vec<f32>>::try_from(merge(&probs, &groups, &tokens, s)).unwrap();
        let observed = got(MergeStrategy::Observed);
        // Group 0: row 0 × p(token 2 at row 1) = 0.3.
        let want = [[0.15f32, 0.09, 0.06], [0.25, 0.25, 0.5]];
        let bayesian = got(MergeStrategy::Bayesian);
        // Group 0: row 1 × p(token 1 at row 0) = 0.3.
        let want_b = [[0.03f32, 0.18, 0.09], [0.25, 0.25, 0.5]];
        for (g, w) in [(observed, want), (bayesian, want_b)] {
            for (a, b) in g.iter().flatten().zip(w.iter().flatten()) {
                assert!((a - b).abs() < 1e-6, "{g:?} vs {w:?}");
            }
        }
    }

    /// ULD's distance ignores which token is which: a permuted distribution is at 0, and
    /// a vocabulary's extra tokens count as zeros.
    #[test]
    fn sorted_l1_compares_distributions_whatever_their_vocabularies() {
        let s = Tensor::from_slice2(&[[0.7f32, 0.2, 0.1]]);
        let t = Tensor::from_slice2(&[[0.1f32, 0.7, 0.2, 0.0]]);
        assert!(sorted_l1(&s, &t).double_value(&[]).abs() < 1e-7);
        let t = Tensor::from_slice2(&[[0.5f32, 0.3, 0.1, 0.1]]);
        // |0.7-0.5| + |0.2-0.3| + |0.1-0.1| + |0-0.1|.
        assert!((sorted_l1(&s, &t).double_value(&[]) - 0.4).abs() < 1e-6);
    }

    /// The hybrid loss: token 0 of the student is token 1 of the teacher; the rest sorted.
    #[test]
    fn the_hybrid_loss_compares_matched_tokens_directly() {
        let s = Tensor::from_slice2(&[[0.6f32, 0.3, 0.1]]);
        let t = Tensor::from_slice2(&[[0.2f32, 0.6, 0.2]]);
        let m = Matched::new((&[0], 3), (&[1], 3), tch::Device::Cpu);
        let h = hybrid(&s, &t, &m, None, 0.5);
        // p = 0.6 on both sides: the JSD of single equal entries is 0.
        assert!(h.matched.double_value(&[]).abs() < 1e-7);
        // The rest: [0.3, 0.1] against [0.2, 0.2] sorted: 0.1 + 0.1.
        assert!((h.unmatched.double_value(&[]) - 0.2).abs() < 1e-6);
        // Adaptive weights: 1 of the teacher's 3 tokens matched.
        assert!((h.loss.double_value(&[]) - 0.2 * 2.0 / 3.0).abs() < 1e-6);
        let fixed = hybrid(&s, &t, &m, Some((1.0, 0.5)), 0.5);
        assert!((fixed.loss.double_value(&[]) - 0.1).abs() < 1e-6);
    }
}
