//! A task file's settings, with lm-eval 0.4's defaults (`TaskConfig`, `FewshotConfig`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::filters::{Filter, FilterPipeline};
use super::metrics::{ExactMatch, Metric};
use super::yaml::{self, Keys, SUBSET};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    GenerateUntil,
    MultipleChoice,
    Loglikelihood,
}

impl OutputType {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputType::GenerateUntil => "generate_until",
            OutputType::MultipleChoice => "multiple_choice",
            OutputType::Loglikelihood => "loglikelihood",
        }
    }
}

/// A `doc_to_text` / `doc_to_target` / `doc_to_choice` setting: a field name or a Jinja
/// template (told apart per document set, by whether the split has such a field), a
/// constant index, or a constant list.
#[derive(Debug, Clone, PartialEq)]
pub enum DocField {
    Text(String),
    Index(i64),
    List(Vec<Value>),
}

impl DocField {
    fn read(keys: &mut Keys, key: &str) -> Result<Option<DocField>> {
        Ok(match keys.take(key) {
            None => None,
            Some(Value::String(s)) => Some(DocField::Text(s)),
            Some(Value::Number(n)) if n.is_i64() => Some(DocField::Index(n.as_i64().unwrap_or(0))),
            Some(Value::Array(a)) => Some(DocField::List(a)),
            // lm-eval takes a mapping's values as the choices.
            Some(Value::Object(m)) if key == "doc_to_choice" => {
                Some(DocField::List(m.into_values().collect()))
            }
            Some(other) => {
                return Err(keys.error(
                    key,
                    format!("expected a field name or a template, got {other}"),
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// The first n documents of the pool, in order.
    FirstN,
    /// n documents drawn by a seeded generator (ours, not Python's `random`).
    Default,
}

/// Where the documents are: `split name → files`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFiles(pub Vec<(String, Vec<PathBuf>)>);

#[derive(Debug, Clone)]
pub struct FewshotConfig {
    pub sampler: Sampler,
    pub split: Option<String>,
    pub samples: Option<Vec<serde_json::Map<String, Value>>>,
    pub doc_to_text: DocField,
    pub doc_to_target: DocField,
    pub doc_to_choice: Option<DocField>,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationKwargs {
    pub until: Vec<String>,
    pub max_gen_toks: usize,
    pub do_sample: bool,
    pub temperature: f64,
}

#[derive(Debug, Clone)]
pub struct TaskConfig {
    pub file: PathBuf,
    pub task: String,
    pub data: DataFiles,
    pub test_split: Option<String>,
    pub validation_split: Option<String>,
    pub training_split: Option<String>,
    pub doc_to_text: DocField,
    pub doc_to_target: DocField,
    pub doc_to_choice: Option<DocField>,
    pub description: String,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    pub num_fewshot: usize,
    pub fewshot: FewshotConfig,
    pub output_type: OutputType,
    pub generation: GenerationKwargs,
    pub repeats: usize,
    pub filters: Vec<FilterPipeline>,
    pub metrics: Vec<Metric>,
}

impl TaskConfig {
    pub fn load(path: &Path) -> Result<TaskConfig> {
        let mut k = Keys::new(path, "", yaml::load(path)?);
        // Informational keys: they change no number.
        for key in ["tag", "group", "metadata", "dataset_name"] {
            if key == "dataset_name" && k.take(key).is_some() {
                return Err(k.error(
                    key,
                    "dataset configurations are not supported (local files only)",
                ));
            }
            k.take(key);
        }
        let task = k
            .string("task")?
            .ok_or_else(|| k.error("task", "missing (the task's name)"))?;
        let data = data_files(&mut k, path)?;
        let test_split = k.string("test_split")?;
        let validation_split = k.string("validation_split")?;
        let training_split = k.string("training_split")?;
        if test_split.is_none() && validation_split.is_none() {
            return Err(k.error(
                "test_split",
                "missing (give test_split or validation_split)",
            ));
        }
        let fewshot_split = k.string("fewshot_split")?;
        let output_type = match k.string("output_type")?.as_deref() {
            None | Some("generate_until") => OutputType::GenerateUntil,
            Some("multiple_choice") => OutputType::MultipleChoice,
            Some("loglikelihood") => OutputType::Loglikelihood,
            Some(other) => {
                return Err(k.error(
                    "output_type",
                    format!(
                    "'{other}' is not supported (generate_until, multiple_choice or loglikelihood)"
                ),
                ))
            }
        };
        let doc_to_text = DocField::read(&mut k, "doc_to_text")?
            .ok_or_else(|| k.error("doc_to_text", "missing"))?;
        let doc_to_target = DocField::read(&mut k, "doc_to_target")?
            .ok_or_else(|| k.error("doc_to_target", "missing"))?;
        let doc_to_choice = DocField::read(&mut k, "doc_to_choice")?;
        if output_type == OutputType::MultipleChoice && doc_to_choice.is_none() {
            return Err(k.error(
                "doc_to_choice",
                "missing (multiple_choice scores each choice)",
            ));
        }
        let description = k.string("description")?.unwrap_or_default();
        let target_delimiter = k.string("target_delimiter")?.unwrap_or_else(|| " ".into());
        let fewshot_delimiter = k
            .string("fewshot_delimiter")?
            .unwrap_or_else(|| "\n\n".into());
        let num_fewshot = k.count("num_fewshot")?.unwrap_or(0);
        let defaults = FewshotConfig {
            sampler: Sampler::Default,
            split: fewshot_split,
            samples: None,
            doc_to_text: doc_to_text.clone(),
            doc_to_target: doc_to_target.clone(),
            doc_to_choice: doc_to_choice.clone(),
            target_delimiter: target_delimiter.clone(),
            fewshot_delimiter: fewshot_delimiter.clone(),
        };
        let fewshot = fewshot_config(&mut k, defaults)?;
        let generation = generation_kwargs(&mut k, output_type, &fewshot_delimiter)?;
        let repeats = k.count("repeats")?.unwrap_or(1);
        if repeats == 0 {
            return Err(k.error("repeats", "must be at least 1"));
        }
        let filters = filter_list(&mut k, repeats)?;
        let metrics = metric_list(&mut k, output_type)?;
        k.finish()?;
        Ok(TaskConfig {
            file: path.to_path_buf(),
            task,
            data,
            test_split,
            validation_split,
            training_split,
            doc_to_text,
            doc_to_target,
            doc_to_choice,
            description,
            target_delimiter,
            fewshot_delimiter,
            num_fewshot,
            fewshot,
            output_type,
            generation,
            repeats,
            filters,
            metrics,
        })
    }

    /// The split evaluated: `test_split`, else `validation_split` (lm-eval's `eval_docs`).
    pub fn eval_split(&self) -> &str {
        self.test_split
            .as_deref()
            .or(self.validation_split.as_deref())
            .expect("checked at load")
    }
}

/// A relative data file: from the current directory as `datasets` reads it, else from the
/// task file's directory (so bundled tasks run from anywhere).
fn resolve(task_file: &Path, name: &str) -> PathBuf {
    let p = PathBuf::from(name);
    if p.is_absolute() || p.exists() {
        return p;
    }
    let beside = task_file.parent().unwrap_or(Path::new(".")).join(&p);
    if beside.exists() {
        beside
    } else {
        p
    }
}

fn data_files(k: &mut Keys, path: &Path) -> Result<DataFiles> {
    let dataset_path = k
        .string("dataset_path")?
        .ok_or_else(|| k.error("dataset_path", "missing"))?;
    let mut kwargs = k.mapping("dataset_kwargs")?;
    let files = kwargs
        .as_mut()
        .map(|kw| kw.take("data_files"))
        .unwrap_or_default();
    if let Some(kw) = kwargs {
        kw.finish()?;
    }
    let names = |v: Value, key: &str| -> Result<Vec<PathBuf>> {
        match v {
            Value::String(s) => Ok(vec![resolve(path, &s)]),
            Value::Array(a) => a
                .into_iter()
                .map(|x| match x {
                    Value::String(s) => Ok(resolve(path, &s)),
                    other => Err(k.error(key, format!("expected file names, got {other}"))),
                })
                .collect(),
            other => Err(k.error(key, format!("expected a file name or a list, got {other}"))),
        }
    };
    let key = "dataset_kwargs.data_files";
    // `datasets`' builders for local files; each file is read by its own kind (JSON Lines, a
    // JSON array, Parquet), as `crate::rows` reads every dataset file.
    let builder = matches!(dataset_path.as_str(), "json" | "parquet");
    let splits = match (dataset_path.as_str(), files) {
        (_, Some(Value::Object(m))) if builder => m
            .into_iter()
            .map(|(split, v)| Ok((split, names(v, key)?)))
            .collect::<Result<Vec<_>>>()?,
        // `datasets` names a split given without one `train`.
        (_, Some(v)) if builder => vec![("train".to_string(), names(v, key)?)],
        (b, None) if builder => {
            return Err(k.error(key, format!("missing (dataset_path: {b} reads local files)")))
        }
        (file, None) if [".jsonl", ".json", ".parquet"].iter().any(|e| file.ends_with(e)) => {
            vec![("train".to_string(), vec![resolve(path, file)])]
        }
        (other, _) => {
            return Err(k.error(
                "dataset_path",
                format!("'{other}': only local files are read (dataset_path: json or parquet with dataset_kwargs.data_files, or a .jsonl, .json or .parquet path)"),
            ))
        }
    };
    Ok(DataFiles(splits))
}

fn fewshot_config(k: &mut Keys, defaults: FewshotConfig) -> Result<FewshotConfig> {
    let Some(mut f) = k.mapping("fewshot_config")? else {
        return Ok(defaults);
    };
    let sampler = match f.string("sampler")?.as_deref() {
        None | Some("default") => Sampler::Default,
        Some("first_n") => Sampler::FirstN,
        Some(other) => {
            return Err(f.error(
                "sampler",
                format!("'{other}' is not supported (first_n or default)"),
            ))
        }
    };
    let samples = match f.list("samples")? {
        None => None,
        Some(list) => Some(
            list.into_iter()
                .map(|x| match x {
                    Value::Object(m) => Ok(m),
                    other => Err(f.error(
                        "samples",
                        format!("expected documents (mappings), got {other}"),
                    )),
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let out = FewshotConfig {
        sampler,
        split: f.string("split")?.or(defaults.split),
        samples,
        doc_to_text: DocField::read(&mut f, "doc_to_text")?.unwrap_or(defaults.doc_to_text),
        doc_to_target: DocField::read(&mut f, "doc_to_target")?.unwrap_or(defaults.doc_to_target),
        doc_to_choice: DocField::read(&mut f, "doc_to_choice")?.or(defaults.doc_to_choice),
        target_delimiter: f
            .string("target_delimiter")?
            .unwrap_or(defaults.target_delimiter),
        fewshot_delimiter: f
            .string("fewshot_delimiter")?
            .unwrap_or(defaults.fewshot_delimiter),
    };
    f.finish()?;
    Ok(out)
}

fn generation_kwargs(
    k: &mut Keys,
    output: OutputType,
    fewshot_delimiter: &str,
) -> Result<GenerationKwargs> {
    let mut out = GenerationKwargs {
        until: vec![fewshot_delimiter.to_string()],
        max_gen_toks: 256,
        do_sample: false,
        temperature: 0.0,
    };
    let Some(mut g) = k.mapping("generation_kwargs")? else {
        return Ok(out);
    };
    if output != OutputType::GenerateUntil {
        return Err(k.error("generation_kwargs", "only for output_type: generate_until"));
    }
    match g.take("until") {
        None => {}
        Some(Value::String(s)) => out.until = vec![s],
        Some(Value::Array(a)) => {
            out.until = a
                .into_iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s),
                    other => Err(g.error("until", format!("expected strings, got {other}"))),
                })
                .collect::<Result<_>>()?
        }
        Some(other) => {
            return Err(g.error("until", format!("expected a string or a list, got {other}")))
        }
    }
    for key in ["max_gen_toks", "max_new_tokens"] {
        if let Some(n) = g.count(key)? {
            out.max_gen_toks = n;
            break;
        }
    }
    out.temperature = g.float("temperature")?.unwrap_or(0.0);
    // lm-eval: greedy unless do_sample is set; a temperature of 0 alone means greedy.
    out.do_sample = g.bool("do_sample")?.unwrap_or(false);
    if out.do_sample && out.temperature == 0.0 {
        out.temperature = 1.0;
    }
    if out.temperature < 0.0 {
        return Err(g.error("temperature", "must be ≥ 0"));
    }
    g.finish()?;
    Ok(out)
}

fn filter_list(k: &mut Keys, repeats: usize) -> Result<Vec<FilterPipeline>> {
    let Some(list) = k.mappings("filter_list", "'name' and 'filter'")? else {
        return Ok(vec![FilterPipeline::new("none", vec![Filter::TakeFirst])]);
    };
    let mut out = vec![];
    for mut f in list {
        let name = f
            .string("name")?
            .ok_or_else(|| f.error("name", "missing"))?;
        let steps = f
            .mappings("filter", "'function'")?
            .ok_or_else(|| f.error("filter", "missing"))?;
        let filters = steps.into_iter().map(Filter::read).collect::<Result<_>>()?;
        let pipeline = FilterPipeline::new(&name, filters);
        pipeline.check(repeats).map_err(|m| f.error("filter", m))?;
        f.finish()?;
        out.push(pipeline);
    }
    Ok(out)
}

fn metric_list(k: &mut Keys, output: OutputType) -> Result<Vec<Metric>> {
    let Some(list) = k.mappings("metric_list", "'metric'")? else {
        return match output {
            OutputType::GenerateUntil => Ok(vec![Metric::ExactMatch(ExactMatch::default())]),
            OutputType::MultipleChoice => Ok(vec![Metric::Acc, Metric::AccNorm]),
            OutputType::Loglikelihood => Err(k.error(
                "metric_list",
                "missing: loglikelihood's default adds perplexity (bootstrapped, not supported); give metric_list: [{metric: acc}]",
            )),
        };
    };
    let mut out = vec![];
    for mut m in list {
        let name = m
            .string("metric")?
            .ok_or_else(|| m.error("metric", "missing"))?;
        if let Some(agg) = m.string("aggregation")? {
            if agg != "mean" {
                return Err(m.error("aggregation", format!("'{agg}' is not supported (mean)")));
            }
        }
        if m.bool("higher_is_better")? == Some(false) {
            return Err(m.error("higher_is_better", "these metrics are higher-is-better"));
        }
        let metric = match (name.as_str(), output) {
            ("exact_match", OutputType::GenerateUntil) => Metric::ExactMatch(ExactMatch::read(&mut m)?),
            ("acc", OutputType::MultipleChoice | OutputType::Loglikelihood) => Metric::Acc,
            ("acc_norm", OutputType::MultipleChoice) => Metric::AccNorm,
            (other, _) => {
                return Err(m.error("metric", format!("'{other}' is not supported for output_type {} (exact_match for generate_until; acc, acc_norm for multiple_choice; acc for loglikelihood); {SUBSET}", output.as_str())))
            }
        };
        m.finish()?;
        out.push(metric);
    }
    Ok(out)
}
