# Two commands do everything on a fresh machine:
#   make quickstart   create .venv (pinned stack + llama.cpp tools, cached) and run the quickstart recipe
#   make test         same environment, then lint and the whole test suite (unit + end-to-end with real servers)
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
LINTED := src tests bench recipes

.PHONY: setup quickstart test test-unit lint bench clean
setup:
	@bash scripts/setup_env.sh

quickstart: setup
	.venv/bin/ftx recipe run recipes/quickstart.yaml

lint: setup
	.venv/bin/ruff check $(LINTED)
	.venv/bin/ruff format --check $(LINTED)

# everything: the unit tier and the end-to-end tier (real model, llama.cpp, vLLM); prints the 15 slowest tests
test: lint
	$(PY) -m pytest -v -rs --durations=15 -m "e2e or not e2e" tests

# the unit tier alone (what plain `pytest` runs): seconds to a few minutes, no servers
test-unit: setup
	$(PY) -m pytest -v -rs tests

# every benchmark measures against the quickstart run (cached: a re-run costs seconds), then one summary table
BENCHES := train_throughput plan_accuracy export_speed serve_slots serve_overhead multi_lora edge_multi_lora quant_search bench_agreement server_timings eval_throughput
bench: quickstart
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done
	@$(PY) bench/summary.py

clean:
	rm -rf runs .pytest_cache
