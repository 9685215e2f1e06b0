//! lm-eval's filters: a pipeline turns a document's responses (one per repeat) into the one
//! answer that is scored. `regex` is Python's `findall(...)[group_select]` (a tuple of
//! groups gives its first non-empty one), stripped, or the fallback; `majority_vote` picks
//! the most frequent answer, a tie going to the one seen first (`Counter.most_common`);
//! `take_first` keeps the first.

use fancy_regex::Regex;

use super::yaml::{Keys, SUBSET};
use crate::error::Result;

#[derive(Debug, Clone)]
pub enum Filter {
    Regex {
        regex: Regex,
        group_select: i64,
        fallback: String,
    },
    RemoveWhitespace,
    Lowercase,
    Uppercase,
    TakeFirst,
    MajorityVote,
}

impl Filter {
    pub fn read(mut k: Keys) -> Result<Filter> {
        let function = k
            .string("function")?
            .ok_or_else(|| k.error("function", "missing"))?;
        let filter = match function.as_str() {
            "regex" => {
                let pattern = k
                    .string("regex_pattern")?
                    .unwrap_or_else(|| r"#### (\-?[0-9\.\,]+)".to_string());
                let regex = python_regex(&pattern).map_err(|e| k.error("regex_pattern", e))?;
                Filter::Regex {
                    regex,
                    group_select: k.int("group_select")?.unwrap_or(0),
                    fallback: k.string("fallback")?.unwrap_or_else(|| "[invalid]".into()),
                }
            }
            "remove_whitespace" => Filter::RemoveWhitespace,
            "lowercase" => Filter::Lowercase,
            "uppercase" => Filter::Uppercase,
            "take_first" => Filter::TakeFirst,
            "majority_vote" => Filter::MajorityVote,
            other => {
                return Err(k.error(
                    "function",
                    format!("'{other}' is not supported (regex, remove_whitespace, lowercase, uppercase, take_first, majority_vote); {SUBSET}"),
                ))
            }
        };
        k.finish()?;
        Ok(filter)
    }

    fn reduces(&self) -> bool {
        matches!(self, Filter::TakeFirst | Filter::MajorityVote)
    }

    fn apply(&self, resps: Vec<String>) -> Vec<String> {
        match self {
            Filter::Regex {
                regex,
                group_select,
                fallback,
            } => resps
                .iter()
                .map(|r| regex_extract(regex, r, *group_select).unwrap_or_else(|| fallback.clone()))
                .collect(),
            Filter::RemoveWhitespace => resps.iter().map(|r| python_strip(r).to_string()).collect(),
            Filter::Lowercase => resps.iter().map(|r| r.to_lowercase()).collect(),
            Filter::Uppercase => resps.iter().map(|r| r.to_uppercase()).collect(),
            Filter::TakeFirst => resps.into_iter().take(1).collect(),
            Filter::MajorityVote => majority_vote(&resps).into_iter().collect(),
        }
    }
}

/// A Python `re` pattern for `fancy_regex` (look-arounds included). Python's `\Z` is the
/// absolute end, `fancy_regex`'s `\z`.
pub fn python_regex(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(&pattern.replace(r"\Z", r"\z"))
        .map_err(|e| format!("invalid regular expression: {e}"))
}

/// Python's `str.strip()` (Unicode whitespace).
pub fn python_strip(s: &str) -> &str {
    s.trim_matches(char::is_whitespace)
}

/// `re.findall(text)[group_select]` as lm-eval's regex filter reads it; `None` (the
/// fallback) when nothing matches, or when `group_select` is out of range (where lm-eval
/// raises).
pub fn regex_extract(regex: &Regex, text: &str, group_select: i64) -> Option<String> {
    let groups = regex.captures_len() - 1;
    let matches: Vec<String> = regex
        .captures_iter(text)
        .filter_map(|c| c.ok())
        .map(|c| {
            let group = |i: usize| c.get(i).map_or("", |m| m.as_str()).to_string();
            match groups {
                0 => group(0),
                1 => group(1),
                // A tuple: its first non-empty group, or nothing.
                n => (1..=n)
                    .map(group)
                    .find(|g| !g.is_empty())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let n = matches.len() as i64;
    let i = if group_select < 0 {
        n + group_select
    } else {
        group_select
    };
    if n == 0 || i < 0 || i >= n {
        return None;
    }
    let m = &matches[i as usize];
    // A tuple with every group empty takes the fallback (before stripping).
    if groups > 1 && m.is_empty() {
        return None;
    }
    Some(python_strip(m).to_string())
}

/// The most frequent answer; ties go to the one seen first.
pub fn majority_vote(resps: &[String]) -> Option<String> {
    let mut counts: Vec<(&String, usize)> = vec![];
    for r in resps {
        match counts.iter_mut().find(|(x, _)| *x == r) {
            Some((_, n)) => *n += 1,
            None => counts.push((r, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max()?;
    counts
        .into_iter()
        .find(|(_, n)| *n == best)
        .map(|(r, _)| r.clone())
}

#[derive(Debug, Clone)]
pub struct FilterPipeline {
    pub name: String,
    pub steps: Vec<Filter>,
}

impl FilterPipeline {
    pub fn new(name: &str, steps: Vec<Filter>) -> Self {
        FilterPipeline {
            name: name.to_string(),
            steps,
        }
    }

    /// Per-response filters first, then `take_first` or `majority_vote` (optionally
    /// followed by `take_first`): what lm-eval's own pipelines look like, and the only
    /// shape whose result is one answer. With one response per document the reduction
    /// may be left out.
    pub fn check(&self, repeats: usize) -> std::result::Result<(), String> {
        let first_reduction = self.steps.iter().position(Filter::reduces);
        if let Some(i) = first_reduction {
            if let Some(after) = self.steps[i + 1..]
                .iter()
                .find(|f| !matches!(f, Filter::TakeFirst))
            {
                return Err(format!(
                    "{after:?} after {:?}: per-response filters must come before take_first / majority_vote",
                    self.steps[i]
                )
                .replace(['{', '}'], ""));
            }
        } else if repeats > 1 {
            return Err(format!(
                "with repeats: {repeats} the pipeline must end in take_first or majority_vote (one answer per document)"
            ));
        }
        Ok(())
    }

    /// The answer scored for a document's responses.
    pub fn apply(&self, resps: &[String]) -> String {
        let mut out = resps.to_vec();
        for f in &self.steps {
            out = f.apply(out);
        }
        out.into_iter().next().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx(p: &str) -> Regex {
        python_regex(p).unwrap()
    }

    #[test]
    fn regex_follows_pythons_findall() {
        // No group: the whole match; one group: the group; several: first non-empty.
        assert_eq!(
            regex_extract(&rx(r"\d+"), "a 12 b 34", 0).as_deref(),
            Some("12")
        );
        assert_eq!(
            regex_extract(&rx(r"\d+"), "a 12 b 34", -1).as_deref(),
            Some("34")
        );
        let gsm = rx(r"The answer is (\-?[0-9\.\,]+).");
        assert_eq!(
            regex_extract(&gsm, "So. The answer is 12.", 0).as_deref(),
            Some("12")
        );
        let flex = rx(r"(-?[$0-9.,]{2,})|(-?[0-9]+)");
        assert_eq!(
            regex_extract(&flex, "x 7 and 23 y", -1).as_deref(),
            Some("23")
        );
        assert_eq!(regex_extract(&flex, "only 7", -1).as_deref(), Some("7"));
        assert_eq!(
            regex_extract(&rx(r"answer: (.*)"), "answer:   12 \n", 0).as_deref(),
            Some("12")
        );
        assert_eq!(regex_extract(&gsm, "no number here", 0), None);
        // Look-arounds, which Rust's `regex` lacks.
        assert_eq!(
            regex_extract(&rx(r"(?<=rabbits: )\d+"), "rabbits: 12", 0).as_deref(),
            Some("12")
        );
    }

    #[test]
    fn pipelines_reduce_as_lm_eval() {
        let regex = Filter::Regex {
            regex: rx(r"(\d+)"),
            group_select: 0,
            fallback: "[invalid]".into(),
        };
        let sc = FilterPipeline::new(
            "maj",
            vec![regex.clone(), Filter::MajorityVote, Filter::TakeFirst],
        );
        let resps: Vec<String> = ["x 3", "5", "nothing", "5 y", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // 3 and 5 twice each: the first seen (3) wins the tie.
        assert_eq!(sc.apply(&resps), "3");
        assert_eq!(sc.apply(&resps[1..]), "5");
        let first = FilterPipeline::new("first", vec![regex, Filter::TakeFirst]);
        assert_eq!(first.apply(&resps[2..]), "[invalid]");
        assert!(
            FilterPipeline::new("bad", vec![Filter::TakeFirst, Filter::Lowercase])
                .check(1)
                .is_err()
        );
        assert!(FilterPipeline::new("open", vec![Filter::Lowercase])
            .check(4)
            .is_err());
        assert!(FilterPipeline::new("open", vec![Filter::Lowercase])
            .check(1)
            .is_ok());
    }
}
