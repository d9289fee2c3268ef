PY := .venv/bin/python

.PHONY: setup setup-vllm030 demo check test test-fast bench-op bench-e2e profile-backend

setup:
	@bash scripts/bootstrap.sh

# vllm-ascend's paired vLLM (0.30.0) with this package installed as users install it: the Ascend contract suite's
# second stack (tests/test_ascend_contract.py)
setup-vllm030: setup
	@bash scripts/bootstrap_vllm030.sh

demo: setup
	$(PY) -m vllm_pfa.demo

# the one-command check users run on their own machine (README "First run on an Atlas server"), in its quick mode
check: setup
	$(PY) -m vllm_pfa.check --quick

test: setup setup-vllm030
	$(PY) -m pytest -q tests

test-fast: setup setup-vllm030
	$(PY) -m pytest -q -m "not slow" tests

bench-op: setup
	$(PY) benchmarks/bench_op.py

bench-e2e: setup
	$(PY) benchmarks/bench_e2e.py

profile-backend: setup
	$(PY) benchmarks/profile_backend.py
