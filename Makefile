# Two set-up commands (see README): `make demo` (or `make demo2d`) and `make test`. Each creates .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# Single-machine Ray and gloo stay on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export GLOO_SOCKET_IFNAME := lo

.PHONY: venv demo demo2d test lint bench gpu-check reproduce clean

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The tested versions of everything else (see the file's header).
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	# DeepSpeed's CPU Adam (ZeRO-Offload) is a C++ extension built on first use: build it once now (~1 min on 2
	# cores, cached in ~/.cache/torch_extensions) instead of inside the first offload run; without a compiler the
	# venv still works (offload runs then build it, or say why they cannot).
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null 2>&1 || \
		echo "note: DeepSpeed's CPU Adam was not built now (no C++ compiler?); ZeRO-Offload runs build it on first use"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m launch.demo

demo2d: venv
	$(PY) -m launch.demo --kind images2d

# Two pytest-xdist workers: most tests wait on process start-up, Ray and the launcher, so two share the 2 cores
# well; each test file (and tests/predict/ as a whole) stays on one worker (tests/conftest.py).
test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadgroup

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) tests/benchmarks/bench_preprocess.py
	$(PY) tests/benchmarks/bench_models.py
	$(PY) tests/benchmarks/bench_train.py
	$(PY) tests/benchmarks/bench_inference.py

# The results tables on the shared real data (../shared/data): convert, cross-validate, train the budget configs,
# evaluate (81 min on 2 cores). Output: reproduce_out/results.md.
reproduce: venv
	$(PY) -m launch.reproduce

# GPU benchmarks (inference, training step, models) on one CUDA GPU; says so and exits 0 without one.
gpu-check: venv
	$(PY) tests/benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache demo_out demo2d_out reproduce_out build dist
