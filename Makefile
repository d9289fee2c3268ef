PY := .venv/bin/python

.PHONY: setup demo test test-fast bench-op bench-e2e profile-backend

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m vllm_pfa.demo

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench-op: setup
	$(PY) benchmarks/bench_op.py

bench-e2e: setup
	$(PY) benchmarks/bench_e2e.py

profile-backend: setup
	$(PY) benchmarks/profile_backend.py
