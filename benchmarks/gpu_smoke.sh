#!/usr/bin/env bash
# GPU smoke test of lmpo's CUDA path (docs/vllm.md "CUDA"): a few minutes on one GPU.
#
#   0. the tests marked gpu (tests/unit/test_cuda_run.py, the tiny model: `make test-gpu`);
#   1. the default run (configs/default.yaml) on CUDA for a few steps: finite metrics, held-out eval, bf16 autocast;
#   2. the HF sampler and the vLLM engine give the same greedy tokens on the default model (needs a vLLM with CUDA
#      in $VLLM_PYTHON's environment; skipped, not failed, when there is none);
#   3. one asynchronous run (train.async.max_staleness=1) on CUDA: versions and staleness as documented.
#
# Prints a small table and exits non-zero when a check fails (2 when there is no GPU at all).
#
#   bash benchmarks/gpu_smoke.sh                          # from the repository root
#   PYTHON=.venv/bin/python VLLM_PYTHON=.venv-gpu-vllm/bin/python STEPS=3 bash benchmarks/gpu_smoke.sh
#
# Settings (environment): PYTHON (lmpo's environment, default .venv/bin/python), VLLM_PYTHON (an environment with
# vLLM for CUDA and lmpo installed, default .venv-vllm/bin/python; none: check 2 is skipped), STEPS (3), OUT (where the
# runs go, default runs/gpu-smoke), DEVICE (cuda; "cpu" runs the same script on the CPU, to check the script itself,
# with CONFIG=configs/tiny.yaml), CONFIG (configs/default.yaml), MIN_GREEDY_MATCH (the share of rows whose greedy
# tokens must be identical, default 1.0; GPU kernels may break a near-tie differently).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
STEPS=${STEPS:-3}
OUT=${OUT:-runs/gpu-smoke}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/default.yaml}
MIN_GREEDY_MATCH=${MIN_GREEDY_MATCH:-1.0}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
ROWS="$OUT/table.tsv"
: > "$ROWS"
FAILED=0

row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$ROWS"; [ "$2" = FAIL ] && FAILED=1; return 0; }

if [ "$DEVICE" != cpu ]; then
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: torch.cuda.is_available() is False in $PYTHON: no GPU (or a CPU-only torch) here." >&2
    exit 2
  fi
  "$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}')"
fi

# one training run: name, then overrides; records wall time, step time, eval before -> after, what the run resolved
train_check() {
  local name=$1; shift
  local t0=$SECONDS
  if "$PYTHON" -m lmpo.cli train "$CONFIG" device="$DEVICE" train.steps="$STEPS" eval.num_prompts=16 \
       eval.every=0 output.dir="$OUT" output.run_name="$name" output.progress=false output.plot=false "$@" \
       --overwrite > "$OUT/$name.log" 2>&1; then
    local detail
    if detail=$("$PYTHON" benchmarks/gpu_smoke_check.py run "$OUT/$name" "$DEVICE" 2>&1); then
      row "$name" ok "$((SECONDS - t0))" "$detail"
    else
      row "$name" FAIL "$((SECONDS - t0))" "$detail"
    fi
  else
    row "$name" FAIL "$((SECONDS - t0))" "exit status $?; $(tail -n 3 "$OUT/$name.log" | tr '\n\t' '  ')"
  fi
}

if [ "$DEVICE" != cpu ]; then  # the gpu-marked tests (tiny model): device, bf16, SDPA, no native kernels, parity
  t0=$SECONDS
  if "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_cuda_run.py > "$OUT/pytest-gpu.log" 2>&1; then
    row pytest-gpu ok "$((SECONDS - t0))" "$(tail -n 1 "$OUT/pytest-gpu.log")"
  else
    row pytest-gpu FAIL "$((SECONDS - t0))" "$(grep -m 3 -E '^(FAILED|ERROR)' "$OUT/pytest-gpu.log" | tr '\n\t' '  ')"
  fi
fi

train_check default-"$DEVICE"
train_check async1-"$DEVICE" train.async.max_staleness=1

t0=$SECONDS
if [ -x "$VLLM_PYTHON" ] && "$VLLM_PYTHON" -c "import vllm" > /dev/null 2>&1; then
  if detail=$("$VLLM_PYTHON" benchmarks/gpu_smoke_check.py parity "$DEVICE" "$MIN_GREEDY_MATCH" 2> "$OUT/parity.log"); then
    row hf-vs-vllm-greedy ok "$((SECONDS - t0))" "$detail"
  else
    row hf-vs-vllm-greedy FAIL "$((SECONDS - t0))" "${detail:-$(tail -n 3 "$OUT/parity.log" | tr '\n\t' '  ')}"
  fi
else
  row hf-vs-vllm-greedy skipped 0 "no vLLM in $VLLM_PYTHON (pip install vllm into a CUDA environment with lmpo)"
fi

printf '\n| check | status | wall s | details |\n|---|---|---|---|\n'
while IFS=$'\t' read -r a b c d; do printf '| %s | %s | %s | %s |\n' "$a" "$b" "$c" "$d"; done < "$ROWS"
exit $FAILED
