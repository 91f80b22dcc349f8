"""2 ranks = 1 process on the same global batch: the loss, the gradients and the weights after 3 AdamW steps.

tests/dist/update_worker.py runs under torchrun (gloo, 2 CPU processes, the tiny model); rank 0 also runs the
single-process reference. Cases: every normaliser kind (row counts, token counts, a constant), whole mini-batches
and micro-batches (DDP's no_sync / FSDP2's deferred reduce-scatter), the packed forward and the plain one, DDP and
FSDP2 (parameters, gradients and AdamW states sharded; gradients compared gathered), full fine-tuning and LoRA.
"""

from __future__ import annotations

import json

import pytest
import torch

from dist_launch import ROOT, run

pytestmark = pytest.mark.dist

# aggregator : micro_batch_size : forward (lmpo.engine.packed or the plain one) : strategy
CASES = ["token_mean:none:packed:ddp", "token_mean:3:plain:ddp", "seq_mean_token_mean:2:packed:ddp",
         "seq_mean_token_sum_norm:none:plain:ddp", "token_sum:5:packed:ddp",
         "token_mean:3:packed:fsdp2", "seq_mean_token_mean:none:plain:fsdp2", "token_sum:2:plain:fsdp2",
         "token_mean:2:packed:fsdp2:lora", "token_mean:none:plain:ddp:lora"]  # LoRA: adapters trained, base frozen


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("update") / "out.json"
    proc = run(2, str(ROOT / "tests/dist/update_worker.py"), str(out), *CASES, cwd=out.parent)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process(results, case):
    one, two = results[case]["single"], results[case]["sharded"]
    # the batch's loss (rank shares summed) and the gradient norm after DDP's sum, at each of the 3 steps
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 5
    for name in one["grads"]:  # the first step's gradient, parameter by parameter
        torch.testing.assert_close(torch.tensor(two["grads"][name]), torch.tensor(one["grads"][name]),
                                   rtol=1e-4, atol=1e-6, msg=name)
    for name in one["weights"]:  # after three optimizer steps
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(one["weights"][name]),
                                   rtol=1e-4, atol=1e-5, msg=name)
    assert min(one["grad_norm"]) > 1e-3  # a real gradient each step: the weights moved
