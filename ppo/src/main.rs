//! `ppo`: Step 3 of InstructGPT: PPO against the reward model with a KL penalty.

use clap::Parser;

/// Step 3 of InstructGPT: PPO against the reward model with a KL penalty.
#[derive(Debug, Parser)]
#[command(name = "ppo", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    common::logging::init();
    eprintln!("ppo: no subcommand has landed yet; see the README for the stages that work today");
    std::process::exit(2)
}
