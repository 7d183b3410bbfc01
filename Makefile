# The two commands the README gives: `make demo` (the main job) and `make test` (the whole suite).
# Both build the virtual environment first; nothing else needs preparing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# as pinned in pyproject.toml (dev extra)
LLAMA_CPP_VERSION ?= 0.3.36
# one folder per machine architecture: a shared home may serve several
WHEELS ?= $(HOME)/.cache/safety-monitor/wheels/$(shell uname -m)

.PHONY: demo test lint venv clean sae detectors

demo: $(VENV)/.installed
	$(BIN)/safety-monitor replay

test: $(VENV)/.installed
	bash scripts/test.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

venv: $(VENV)/.installed

# torch goes in first, pinned: pip then finds the local CPU wheel, and nothing later pulls a
# multi-GB CUDA build (see README, "GPU").
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check --quiet --upgrade pip
	$(BIN)/pip install --disable-pip-version-check --quiet torch==$(TORCH_VERSION)
	$(MAKE) --no-print-directory llama-wheel
	$(BIN)/pip install --disable-pip-version-check --quiet --force-reinstall --no-deps \
	  --no-index --find-links $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --disable-pip-version-check --quiet -c constraints.txt -e '.[dev,otel]'
	touch $@

# llama.cpp's server (the guard tests' and bench's upstream) is compiled from source. Built for
# the machine's own CPU (pip's default, GGML_NATIVE) it uses AMX where the CPU reports it, and
# AMX faults (general protection, the server dies on its first token) on virtual machines that
# report it without allowing it. So: a portable build (AVX2), once per machine, kept in WHEELS
# (pip's own wheel cache would hand back a native build made earlier); installed over whatever
# build an older .venv holds. Part of the venv recipe (it needs .venv's pip).
.PHONY: llama-wheel
llama-wheel:
	@if ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then :; else \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (portable, once: ~5 minutes on 2 cores)"; \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip wheel --disable-pip-version-check --quiet \
	    --no-cache-dir --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); fi

# constraints.txt from what .venv holds now: after a change to pyproject.toml's dependencies, or
# to take newer releases (keep only its comment lines, make test on a fresh clone, then this).
.PHONY: constraints
constraints: $(VENV)/.installed
	$(BIN)/pip list --disable-pip-version-check --format=freeze --exclude-editable > constraints.txt.new
	{ sed -n '/^#/p' constraints.txt; grep -v -e '^torch==' -e '^pip==' -e '^setuptools==' constraints.txt.new; } \
	  > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm constraints.txt.new
	touch $(VENV)/.installed

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# The whole dictionary-learning run: corpus -> capture -> train -> eval -> atlas -> ship.
# Each step skips or resumes what an interrupted earlier run finished (see docs/sae.md).
SM := $(BIN)/safety-monitor
sae: $(VENV)/.installed
	test -f work/corpus/manifest.json || $(SM) corpus build --out work/corpus
	$(SM) sae capture --corpus work/corpus --out work/activations
	$(SM) sae train --activations work/activations --out work/sae-run --epochs 3
	$(SM) sae eval --sae work/sae-run/sae --activations work/activations/heldout --json \
		> work/sae-run/metrics-heldout.json.tmp
	mv work/sae-run/metrics-heldout.json.tmp work/sae-run/metrics-heldout.json
	$(SM) features atlas --sae work/sae-run/sae --activations work/activations/heldout
	$(SM) sae ship

# The curated detectors, rebuilt against real traffic: labelled sets → draft each rule → set its
# operating point on the calibration bucket (alert budget) → fit and calibrate its probes →
# report on the held-out sets (docs/detectors.md). Encodings are cached per example.
DD := work/detector-data
BUDGET ?= 0.005
CURATED := scam_email prompt_injection deception sycophancy backdoor_code
detectors: $(VENV)/.installed
	$(SM) detectors data --out $(DD)
	for d in $(CURATED); do \
	  $(SM) detectors draft $$d --update --train $(DD)/$$d.train.jsonl --dev $(DD)/$$d.dev.jsonl \
	    --select-fpr $(BUDGET) --method l1 && \
	  $(SM) detectors calibrate $$d --traffic $(DD)/traffic.calibration.jsonl --budget $(BUDGET) \
	    --data $(DD)/$$d.dev.jsonl && \
	  $(SM) detectors train-probe $$d --train $(DD)/$$d.train.jsonl --dev $(DD)/$$d.dev.jsonl \
	    --scope $$($(SM) detectors list --json | $(BIN)/python -c \
	      "import json,sys; print(next(s['scope'] for s in json.load(sys.stdin) if s['id']=='$$d'))") && \
	  for p in $${d}_sae_probe $${d}_dense_probe; do \
	    $(SM) detectors calibrate $$p --traffic $(DD)/traffic.calibration.jsonl --budget $(BUDGET) \
	      --data $(DD)/$$d.dev.jsonl || exit 1; \
	  done || exit 1; \
	done
	$(SM) detectors report --data $(DD) --json > work/detector-report.json.tmp
	mv work/detector-report.json.tmp work/detector-report.json
