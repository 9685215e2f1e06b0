//! `ppo`: step 3 of InstructGPT, PPO against the reward model with a KL penalty.

use clap::{Parser, Subcommand};
use serde_json::json;

/// PPO of the SFT policy against a reward model (InstructGPT step 3).
#[derive(Debug, Parser)]
#[command(name = "ppo", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Optimise a policy with PPO against a reward model.
    Train(ppo::train::TrainArgs),
    /// Sample completions for a file of prompts (as `sft generate`).
    Generate(common::generate::command::GenerateArgs),
}

fn main() {
    let cli: Cli = common::config_file::parse();
    common::logging::init();
    let result = match &cli.command {
        Command::Train(args) => ppo::train::run(args).map(|s| {
            json!({"steps": s.steps, "first_score": s.first_score, "last_score": s.last_score,
                   "kl": s.kl, "kl_coef": s.kl_coef, "stopped": s.stopped, "final": args.run.output_dir.join("final")})
        }),
        Command::Generate(args) => common::generate::command::run(args)
            .map(|s| s.to_json(args))
            .map_err(anyhow::Error::from),
    };
    common::cli::finish(result)
}
