VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo adaptive defend-example attack-example lint bench

setup:
	./scripts/setup.sh

# The test command (README, CI). pytest exit 5 = "no tests collected": that is a failure, not a pass.
test: setup
	@$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The main job: align, defend with SEAM, attack both models, evaluate, report (quick preset, see README).
demo: setup
	$(VENV)/bin/seamlm demo --out runs/demo --preset quick

# Every adaptive attack recipe and an Optuna sweep against the demo's aligned and SEAM models (needs `make demo`).
adaptive: setup
	$(VENV)/bin/seamlm adaptive --out runs/adaptive

# A 5-step SEAM run on the bundled 16-row example files: the defence CLI in a minute.
defend-example: setup
	$(VENV)/bin/seamlm defend --model smollm2-135m-instruct \
		--harmful examples/data/harmful.jsonl --refusal examples/data/refusal.jsonl \
		--benign examples/data/benign.jsonl --out runs/demo-defend --steps 5 --batch_size 2 --max_length 128

# Attack SmolLM2 at two learning rates and evaluate HS, ZS, coherence and FS before and after (offline defaults).
attack-example: setup
	$(VENV)/bin/seamlm attack --model smollm2-135m-instruct --label smollm2 --out runs/attack-example \
		--learning_rates 5e-5,2e-4 --eval.fs true
	$(VENV)/bin/seamlm report runs/attack-example/results.jsonl --out runs/attack-example/report

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/generation_throughput.py
	$(PY) benchmarks/distributed_step.py
	$(PY) benchmarks/recipe_step_cost.py
	$(PY) benchmarks/coupling_precision.py
	$(PY) benchmarks/prompt_format.py
	$(PY) benchmarks/zero_shot_throughput.py
