//! `reward`: Step 2 of InstructGPT: a reward model trained on human rankings.

use clap::Parser;

/// Step 2 of InstructGPT: a reward model trained on human rankings.
#[derive(Debug, Parser)]
#[command(name = "reward", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    common::logging::init();
    eprintln!(
        "reward: no subcommand has landed yet; see the README for the stages that work today"
    );
    std::process::exit(2)
}
