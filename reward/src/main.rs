//! `reward`: step 2 of InstructGPT, a reward model trained on human rankings.

use clap::{Parser, Subcommand};
use serde_json::json;

/// Reward-model training on rankings (InstructGPT step 2).
#[derive(Debug, Parser)]
#[command(name = "reward", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Train on pairs and rankings (all pairs of a ranking in one element), then normalise.
    Train(reward::train::TrainArgs),
    /// Rewards of rankings or single rows; a JSON summary line on stdout.
    Eval(reward::eval::EvalArgs),
}

fn main() {
    let cli: Cli = common::config_file::parse();
    common::logging::init();
    let result = match &cli.command {
        Command::Train(args) => reward::train::run(args).map(|s| {
            json!({"steps": s.steps, "train_loss": s.final_loss, "eval_accuracy": s.eval_accuracy, "stopped": s.stopped,
                   "reward_bias": s.normalization.bias, "reward_std": s.normalization.std,
                   "final": args.run.output_dir.join("final")})
        }),
        Command::Eval(args) => reward::eval::run(args).map(|s| {
            json!({"rows": s.rows, "pairs": s.pairs, "accuracy": s.accuracy,
                   "mean_margin": s.mean_margin, "mean_reward": s.mean_reward})
        }),
    };
    common::cli::finish(result)
}
