# The two commands of the README: `make main` (quantize the bundled SmolLM2, report quality)
# and `make test` (every test). Both run the set-up first: it installs into the environment of
# $(PY), the `python3` first on PATH (an active venv's), once per change of pyproject.toml or
# scripts/setup.sh and once per environment.
PY ?= python3
STAMP := .cache/setup-$(shell (cat pyproject.toml scripts/setup.sh; $(PY) -c 'import sys; print(sys.prefix)') \
	| cksum | cut -d' ' -f1).stamp

.PHONY: setup main test test-fast
setup: $(STAMP)
$(STAMP):
	PY=$(PY) bash scripts/setup.sh
	mkdir -p .cache && touch $@

main: setup
	$(PY) examples/quantize_smollm2.py --bits 4 --group-size 128 --sym --iters 50 --out out/smollm2-w4g128

# Progress per test file as it runs; skipped tests with their reasons and the slowest tests at the end.
test: setup
	$(PY) -m pytest tests integration_tests -m "not slow" -ra --durations=15

test-fast: setup
	$(PY) -m pytest tests -ra --durations=15
