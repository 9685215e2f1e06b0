//! lm-eval's per-document metrics and their aggregation: `exact_match` (HF evaluate's, as
//! lm-eval ports it), `acc` and `acc_norm` of multiple choice, the mean, and the standard
//! error of the mean (sample standard deviation / √n).

use fancy_regex::Regex;
use serde_json::Value;

use super::filters::python_regex;
use super::yaml::Keys;
use crate::error::Result;

#[derive(Debug, Clone, Default)]
pub struct ExactMatch {
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
    pub ignore_numbers: bool,
    pub regexes_to_ignore: Vec<Regex>,
}

impl ExactMatch {
    pub fn read(k: &mut Keys) -> Result<ExactMatch> {
        let regexes_to_ignore = match k.take("regexes_to_ignore") {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| match p {
                    Value::String(s) => {
                        python_regex(s).map_err(|e| k.error("regexes_to_ignore", e))
                    }
                    other => Err(k.error(
                        "regexes_to_ignore",
                        format!("expected patterns, got {other}"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(k.error("regexes_to_ignore", format!("expected a list, got {other}")))
            }
        };
        Ok(ExactMatch {
            ignore_case: k.bool("ignore_case")?.unwrap_or(false),
            ignore_punctuation: k.bool("ignore_punctuation")?.unwrap_or(false),
            ignore_numbers: k.bool("ignore_numbers")?.unwrap_or(false),
            regexes_to_ignore,
        })
    }

    /// 1 when the prediction equals the reference after the same normalisation of both:
    /// the ignored patterns removed, then lower-cased, then ASCII punctuation and digits
    /// removed.
    pub fn score(&self, prediction: &str, reference: &str) -> f64 {
        let norm = |s: &str| {
            let mut s = s.to_string();
            for re in &self.regexes_to_ignore {
                s = re.replace_all(&s, "").into_owned();
            }
            if self.ignore_case {
                s = s.to_lowercase();
            }
            if self.ignore_punctuation {
                s.retain(|c| !c.is_ascii_punctuation());
            }
            if self.ignore_numbers {
                s.retain(|c| !c.is_ascii_digit());
            }
            s
        };
        f64::from(u8::from(norm(prediction) == norm(reference)))
    }
}

#[derive(Debug, Clone)]
pub enum Metric {
    ExactMatch(ExactMatch),
    /// Multiple choice: the gold choice has the highest log-likelihood. Loglikelihood: the
    /// continuation is the greedy one.
    Acc,
    /// Multiple choice: highest log-likelihood per character of the choice.
    AccNorm,
}

impl Metric {
    pub fn name(&self) -> &'static str {
        match self {
            Metric::ExactMatch(_) => "exact_match",
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
        }
    }
}

/// numpy's argmax: the first index of the largest value (NaN counts as largest).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `(acc, acc_norm)` of one multiple-choice document: `golds` are the indices that count
/// as right (several for a multiple-target document; none for a gold outside the choices).
pub fn multiple_choice(lls: &[f64], choices: &[String], golds: &[usize]) -> (f64, f64) {
    let pred = argmax(lls);
    let per_char: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(ll, c)| ll / c.chars().count() as f64)
        .collect();
    let pred_norm = argmax(&per_char);
    let hit = |p: usize| f64::from(u8::from(golds.contains(&p)));
    (hit(pred), hit(pred_norm))
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The standard error of the mean, as lm-eval's `mean_stderr`; `None` for fewer than two
/// values (lm-eval reports "N/A").
pub fn mean_stderr(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let mu = mean(xs);
    let var = xs.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some(var.sqrt() / (n as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_normalises_as_hf_evaluate() {
        let em = ExactMatch {
            ignore_case: true,
            ignore_punctuation: true,
            regexes_to_ignore: vec![python_regex(r"\s*rabbits?").unwrap()],
            ..ExactMatch::default()
        };
        assert_eq!(
            em.score("12 Rabbits.", "12"),
            0.0,
            "patterns go before lower-casing"
        );
        assert_eq!(em.score("12 rabbits.", "12"), 1.0);
        assert_eq!(ExactMatch::default().score("12", "12 "), 0.0);
    }

    #[test]
    fn choices_and_stderr() {
        let choices: Vec<String> = ["a", "bbbb", "cc"].iter().map(|s| s.to_string()).collect();
        // Raw: -1.0 wins; per character: -4/4 = -1 vs -1/1 = -1 tie → first (index 0).
        assert_eq!(
            multiple_choice(&[-1.0, -4.0, -3.0], &choices, &[0]),
            (1.0, 1.0)
        );
        assert_eq!(
            multiple_choice(&[-2.0, -4.0, -3.0], &choices, &[1]),
            (0.0, 1.0)
        );
        assert_eq!(
            multiple_choice(&[-2.0, -4.0, -3.0], &choices, &[]),
            (0.0, 0.0)
        );
        let xs = [1.0, 0.0, 1.0, 1.0];
        let se = mean_stderr(&xs).unwrap();
        // mean 0.75, squared deviations sum to 0.75, sample sd = √(0.75/3) = 0.5, /√4.
        assert!((se - 0.25).abs() < 1e-12);
        assert_eq!(mean_stderr(&[1.0]), None);
    }
}
