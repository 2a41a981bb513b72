# The two commands of the README: `make main` (quantize the bundled SmolLM2, report quality)
# and `make test` (every test). Both run the set-up first, once per change of pyproject.toml.
PY ?= python3
STAMP := .cache/setup-$(shell cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1).stamp

.PHONY: setup main test test-fast
setup: $(STAMP)
$(STAMP):
	PY=$(PY) bash scripts/setup.sh
	mkdir -p .cache && touch $@

main: setup
	$(PY) examples/quantize_smollm2.py --bits 4 --group-size 128 --sym --iters 50 --out out/smollm2-w4g128

test: setup
	$(PY) -m pytest tests integration_tests -m "not slow" -q

test-fast: setup
	$(PY) -m pytest tests -q
