//! `sft`: step 1 of InstructGPT, supervised fine-tuning on demonstrations.

use clap::{Parser, Subcommand};

use serde_json::json;

/// Supervised fine-tuning of a causal language model (InstructGPT step 1).
#[derive(Debug, Parser)]
#[command(name = "sft", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Fine-tune a model on demonstrations (loss on completions / assistant turns).
    Train(sft::train::TrainArgs),
    /// Per-row completion NLL of a model on SFT rows, or lm-evaluation-harness task files
    /// (--tasks); JSON summary lines on stdout.
    Eval(sft::eval::EvalArgs),
    /// Sample completions for a file of prompts.
    Generate(sft::generate::GenerateArgs),
}

fn main() {
    let cli: Cli = common::config_file::parse();
    common::logging::init();
    let result = match &cli.command {
        Command::Train(args) => sft::train::run(args).map(|s| {
            json!({"steps": s.steps, "train_loss": s.final_loss, "eval_loss": s.eval_loss, "stopped": s.stopped,
                   "trainable_parameters": s.trainable_parameters, "total_parameters": s.total_parameters,
                   "final": args.run.output_dir.join("final")})
        }),
        Command::Eval(args) => sft::eval::run(args).map(|outcome| match outcome {
            sft::eval::EvalOutcome::Nll(s) => json!({"rows": s.rows, "tokens": s.tokens, "loss": s.loss,
                   "perplexity": s.loss.exp(), "entropy": s.entropy,
                   "mean_token_accuracy": s.mean_token_accuracy, "dropped": s.dropped}),
            // One line per task; the last is printed by finish.
            sft::eval::EvalOutcome::Tasks(mut lines) => {
                let last = lines.pop().unwrap_or_default();
                lines.iter().for_each(|l| println!("{l}"));
                last
            }
        }),
        Command::Generate(args) => sft::generate::run(args)
            .map(|s| s.to_json(args))
            .map_err(anyhow::Error::from),
    };
    common::cli::finish(result)
}
