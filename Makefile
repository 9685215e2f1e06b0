# Entry points. Each one bootstraps what it needs (scripts/bootstrap.sh: torch into .venv).
CARGO ?= cargo

.PHONY: bootstrap build test bench bench-trl demo demo-adapters demo-prompting fmt clean

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --release --workspace --bins

test: bootstrap
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

# Throughput of every stage on a fixed workload (ppo/benches/stages.rs); a table at the end.
bench: bootstrap
	$(CARGO) bench -p ppo --bench stages

# The same workload run by TRL (installed for the benchmark only); our/TRL ratios.
bench-trl: bootstrap
	bench/trl_compare.sh

# The whole pipeline on the bundled chickens-and-rabbits task (scripts/demo.sh), runs/demo/.
demo: bootstrap
	$(CARGO) build --release --workspace --bins
	scripts/demo.sh

# Full fine-tuning vs LoRA vs prompt tuning for the demo's SFT step (scripts/demo_adapters.sh).
demo-adapters: bootstrap
	$(CARGO) build --release --workspace --bins
	scripts/demo_adapters.sh

# The lecture's chain-of-thought table: SFT with four kinds of demonstrations, evaluated with
# the bundled lm-eval task files (scripts/demo_prompting.sh), runs/demo-prompting/report.md.
demo-prompting: bootstrap
	$(CARGO) build --release --workspace --bins
	scripts/demo_prompting.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
