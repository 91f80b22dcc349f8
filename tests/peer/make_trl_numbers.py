"""Compute TRL's GRPOTrainer losses on fixed inputs and store them as test data (tests/data/peer/trl_losses.json).

TRL computes its policy losses inside ``GRPOTrainer._compute_loss`` (no standalone function). This script calls that
method itself, unbound, on a minimal stand-in for the trainer: the stand-in returns fixed per-token log-probs (a leaf
tensor, so the gradient is TRL's own) instead of running a model, and carries only the attributes the method reads
(loss type, clip range, beta, the accumulation settings, a one-process accelerator). Everything else is TRL's code.

Run where ``trl`` imports (``make peer-numbers`` installs it into the scratch venv with ``--no-deps``):

    /tmp/verlvenv/bin/python tests/peer/make_trl_numbers.py
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl.trainer.grpo_trainer import GRPOTrainer

OUT = Path(__file__).resolve().parents[1] / "data" / "peer"
F64 = torch.float64
MAX_COMPLETION_LENGTH = 8


def lst(x):
    return x.detach().to(F64).tolist()


class Accelerator:
    num_processes = 1
    sync_gradients = False

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trainer(loss_type: str, beta: float, eps_low: float, eps_high: float, lp: torch.Tensor, **args):
    stub = SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, importance_sampling_level="token",
        off_policy_mask_threshold=None, top_entropy_quantile=1.0, aux_loss_enabled=False, use_vllm=False,
        vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH, model=SimpleNamespace(training=True), accelerator=Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1, **args),
    )
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
    return stub


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 6
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2.0 - 0.05
    lp = (old + torch.randn(B, T, generator=g, dtype=F64) * 0.4).clamp(max=-1e-3)
    ref = old + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    adv = torch.randn(B, generator=g, dtype=F64)
    lengths = torch.tensor([6, 3, 1, 5, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return {"logprobs": lp, "old_logprobs": old, "ref_logprobs": ref, "advantages": adv, "mask": mask}


CASES = [
    # (name, loss_type, beta, eps_low, eps_high, extra args, lmpo sections)
    ("grpo", "grpo", 0.04, 0.2, 0.2, {}, {"loss": {"name": "ppo_clip", "epsilon": 0.2},
                                          "aggregator": {"name": "seq_mean_token_mean"}}),
    ("bnpo", "bnpo", 0.0, 0.2, 0.28, {}, {"loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28},
                                          "aggregator": {"name": "token_mean"}}),
    ("dr_grpo", "dr_grpo", 0.0, 0.2, 0.2, {}, {"loss": {"name": "ppo_clip", "epsilon": 0.2},
                                               "aggregator": {"name": "seq_mean_token_sum_norm",
                                                              "horizon": MAX_COMPLETION_LENGTH}}),
    ("dapo", "dapo", 0.0, 0.2, 0.28, {}, {"loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28},
                                          "aggregator": {"name": "token_mean"}}),
    # TRL caps CISPO's weight at epsilon_high itself (5.0); lmpo's cap is 1 + epsilon_high
    ("cispo", "cispo", 0.0, 0.2, 5.0, {}, {"loss": {"name": "cispo", "epsilon": None, "epsilon_high": 4.0},
                                           "aggregator": {"name": "token_mean"}}),
    ("sapo", "sapo", 0.0, 0.2, 0.2, {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05},
     {"loss": {"name": "sapo", "tau_pos": 1.0, "tau_neg": 1.05}, "aggregator": {"name": "seq_mean_token_mean"}}),
]


def main() -> None:
    cases = []
    for i, (name, loss_type, beta, lo, hi, args, lmpo) in enumerate(CASES):
        x = inputs(100 + i)
        lp = x["logprobs"].clone().requires_grad_(True)
        B = lp.shape[0]
        batch = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
                 "completion_ids": torch.zeros_like(x["mask"]), "completion_mask": x["mask"],
                 "advantages": x["advantages"], "old_per_token_logps": x["old_logprobs"],
                 "ref_per_token_logps": x["ref_logprobs"], "num_items_in_batch": x["mask"].sum().to(F64)}
        loss = GRPOTrainer._compute_loss(trainer(loss_type, beta, lo, hi, lp, **args), None, batch)
        loss.backward()
        cases.append({"name": name, "trl": {"loss_type": loss_type, "beta": beta, "epsilon_low": lo,
                                            "epsilon_high": hi, "max_completion_length": MAX_COMPLETION_LENGTH,
                                            **args},
                      "lmpo": {**lmpo, "kl": {"beta": beta, "estimator": "k3"}},
                      "inputs": {k: lst(v) for k, v in x.items()}, "loss": loss.item(), "grad": lst(lp.grad)})
    path = OUT / "trl_losses.json"
    path.write_text(json.dumps({"peer": "trl", "version": trl.__version__,
                                "module": "trl.trainer.grpo_trainer.GRPOTrainer._compute_loss",
                                "torch": torch.__version__, "script": "tests/peer/make_trl_numbers.py",
                                "cases": cases}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
