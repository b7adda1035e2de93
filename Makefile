# Two commands do everything on a fresh machine:
#   make quickstart   create .venv (pinned stack + llama.cpp tools, cached) and run the quickstart recipe
#   make test         same environment, then the whole test suite (unit + end-to-end with real servers)
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup quickstart test test-unit bench clean
setup:
	@bash scripts/setup_env.sh

quickstart: setup
	.venv/bin/ftx recipe run recipes/quickstart.yaml

test: setup
	$(PY) -m pytest -v -rs --durations=15 tests

test-unit: setup
	$(PY) -m pytest -v -m "not e2e" tests

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
