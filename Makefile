# Entry points. Each one bootstraps what it needs (scripts/bootstrap.sh: torch into .venv).
CARGO ?= cargo

.PHONY: bootstrap build test bench bench-trl demo fmt clean

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

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
