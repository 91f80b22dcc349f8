"""The CUDA path on a real GPU (``make test-gpu``; marked ``gpu``: never part of ``make test``, skipped without CUDA).

A tiny run on the GPU: the device it resolved, bf16 autocast where supported, SDPA attention, the native CPU kernels
never loaded, finite metrics; the sampler's greedy tokens on the GPU equal the CPU's; an async run (k = 1) on the GPU.
benchmarks/gpu_smoke.sh runs these and the default-model checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[2]


def tiny_run(tmp_path, *overrides):
    from lmpo.config import load_config
    from lmpo.train.loop import train

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"output.dir={tmp_path}", "train.steps=3", "eval.every=0", "eval.num_prompts=8",
                       "output.checkpoint_every=0", "output.progress=false", "output.plot=false", "device=cuda",
                       "model.autocast=auto", *overrides])
    return train(cfg)


def test_tiny_run_on_cuda(tmp_path):
    from lmpo.engine import device as dev
    from lmpo.engine.kernels import rowdot

    result = tiny_run(tmp_path)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["peak_gpu_gb"] > 0
    assert summary["autocast"] == ("bfloat16" if torch.cuda.is_bf16_supported() else None)
    assert dev.cuda_run() and not rowdot.available()
    rows = result.history
    assert rows and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_greedy_tokens_on_cuda_equal_the_cpu(tmp_path):
    from lmpo.models.load import load_model
    from lmpo.rollout.base import SamplingParams
    from lmpo.rollout.hf import HFGenerator

    model, tok = load_model("tiny", attn_implementation="sdpa")
    prompts = ["1+2=", "33=", "4+5+6=", "7="]
    params = SamplingParams(greedy=True, max_new_tokens=8)
    cpu = HFGenerator(model, tok).generate(prompts, params)
    gpu = HFGenerator(model.to("cuda"), tok).generate(prompts, params)
    assert torch.equal(cpu.response_ids, gpu.response_ids.cpu())
    assert (cpu.sampler_logprobs - gpu.sampler_logprobs.cpu()).abs().max() < 1e-3


def test_async_run_on_cuda(tmp_path):
    result = tiny_run(tmp_path, "train.async.max_staleness=1")
    stale = [r["async/staleness"] for r in result.history if "async/staleness" in r]
    assert stale and max(stale) <= 1
