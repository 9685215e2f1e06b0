# Entry points. Each one bootstraps what it needs (scripts/bootstrap.sh: torch into .venv).
CARGO ?= cargo

.PHONY: bootstrap build test fmt lint clean

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --release --workspace --bins

test: bootstrap
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
