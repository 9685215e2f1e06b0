//! Metrics of a run: TensorBoard event files in `OUT/tb/`, the same scalars in
//! `OUT/metrics.jsonl` (`{"step": N, "train/loss": …}` per logged step), and progress on
//! stderr — a bar on a terminal, a plain line every `log_every` steps otherwise.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use tensorboard_proto::summary::{
    Summary, SummaryMetadata, SummaryMetadata_PluginData, Summary_Value,
};
use tensorboard_proto::tensor::TensorProto;
use tensorboard_proto::types::DataType;
use tensorboard_rs::summary_writer::FileWriter;

use crate::error::{Error, Result};
use crate::run_dir::RunDir;

/// Removes the lines of a `{"step": N, …}` JSON Lines file whose step is after `step`.
fn drop_lines_after(path: &std::path::Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::checkpoint::write_atomic(path, kept.as_bytes())
}

pub struct Metrics {
    tb: FileWriter,
    jsonl: File,
    jsonl_path: std::path::PathBuf,
    bar: Option<ProgressBar>,
    log_every: u64,
    total_steps: u64,
    started: Instant,
    first_step: u64,
}

impl Metrics {
    /// Opens the run's metric streams. Resuming from `resumed_at`, lines of later steps
    /// (logged after that checkpoint, before the stop) are removed, so the stream has no
    /// duplicated steps.
    pub fn open(
        run: &RunDir,
        resumed_at: Option<u64>,
        total_steps: u64,
        log_every: u64,
    ) -> Result<Self> {
        let jsonl_path = run.root.join("metrics.jsonl");
        let keep_until = resumed_at.unwrap_or(0);
        for stream in [&jsonl_path, &run.root.join("samples.jsonl")] {
            drop_lines_after(stream, keep_until)?;
        }
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl_path)
            .map_err(|e| Error::io(&jsonl_path, e))?;
        let tb_dir = run.tb_dir();
        fs::create_dir_all(&tb_dir).map_err(|e| Error::io(&tb_dir, e))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
                    .unwrap(),
            );
            bar.set_position(keep_until);
            bar
        });
        Ok(Metrics {
            tb: FileWriter::new(&tb_dir),
            jsonl,
            jsonl_path,
            bar,
            log_every: log_every.max(1),
            total_steps,
            started: Instant::now(),
            first_step: keep_until,
        })
    }

    /// Records `scalars` at `step` in TensorBoard and `metrics.jsonl` and reports progress.
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let mut row = Map::new();
        row.insert("step".into(), Value::from(step));
        for &(tag, value) in scalars {
            self.tb.add_summary(
                tensorboard_rs::summary::scalar(tag, value as f32),
                step as usize,
            );
            row.insert(
                tag.into(),
                serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number),
            );
        }
        writeln!(self.jsonl, "{}", Value::Object(row))
            .map_err(|e| Error::io(&self.jsonl_path, e))?;
        self.jsonl
            .flush()
            .map_err(|e| Error::io(&self.jsonl_path, e))?;
        let summary: Vec<String> = scalars
            .iter()
            .filter(|(t, _)| {
                matches!(
                    *t,
                    "train/loss" | "objective/scores" | "objective/kl" | "train/accuracy"
                )
            })
            .map(|(t, v)| format!("{} {v:.4}", t.rsplit('/').next().unwrap_or(t)))
            .collect();
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(summary.join(" · "));
            }
            None if step.is_multiple_of(self.log_every) || step == self.total_steps => {
                let done = (step - self.first_step).max(1) as f64;
                let eta =
                    self.started.elapsed().as_secs_f64() / done * (self.total_steps - step) as f64;
                tracing::info!(
                    "step {step}/{} · {} · eta {eta:.0}s",
                    self.total_steps,
                    summary.join(" · ")
                );
            }
            None => {}
        }
        Ok(())
    }

    /// A text summary (TensorBoard's Text tab), e.g. sample responses as Markdown.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) {
        let mut plugin = SummaryMetadata_PluginData::new();
        plugin.set_plugin_name("text".into());
        let mut metadata = SummaryMetadata::new();
        metadata.set_plugin_data(plugin);
        let mut tensor = TensorProto::new();
        tensor.set_dtype(DataType::DT_STRING);
        tensor.mut_string_val().push(text.as_bytes().to_vec());
        let mut value = Summary_Value::new();
        value.set_tag(tag.into());
        value.set_metadata(metadata);
        value.set_tensor(tensor);
        let mut summary = Summary::new();
        summary.mut_value().push(value);
        self.tb.add_summary(summary, step as usize);
    }

    pub fn flush(&mut self) {
        self.tb.flush();
    }

    pub fn finish(&mut self) {
        self.flush();
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
