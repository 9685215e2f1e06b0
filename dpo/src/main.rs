//! `dpo`: direct preference optimisation of a policy on preference pairs.

use clap::{Parser, Subcommand};
use serde_json::json;

/// Direct preference optimisation (Rafailov et al. 2023) on pairs and rankings, and KTO
/// (--loss-type kto) on unpaired feedback.
#[derive(Debug, Parser)]
#[command(name = "dpo", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Optimise a policy on preference pairs against a frozen reference.
    Train(dpo::train::TrainArgs),
    /// The DPO loss and metrics of a policy against a reference; one JSON row per pair.
    Eval(dpo::eval::EvalArgs),
}

fn main() {
    let cli: Cli = common::config_file::parse();
    common::logging::init();
    let result = match &cli.command {
        Command::Train(args) => dpo::train::run(args).map(|s| {
            json!({"steps": s.steps, "train_loss": s.final_loss, "eval_loss": s.eval_loss,
                   "eval_accuracy": s.eval_accuracy, "stopped": s.stopped,
                   "final": args.run.output_dir.join("final")})
        }),
        Command::Eval(args) => dpo::eval::run(args),
    };
    common::cli::finish(result)
}
