//! `sft`: Step 1 of InstructGPT: supervised fine-tuning on demonstrations.

use clap::Parser;

/// Step 1 of InstructGPT: supervised fine-tuning on demonstrations.
#[derive(Debug, Parser)]
#[command(name = "sft", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    common::logging::init();
    eprintln!("sft: no subcommand has landed yet; see the README for the stages that work today");
    std::process::exit(2)
}
