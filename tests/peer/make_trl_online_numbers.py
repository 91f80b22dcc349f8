"""Compute TRL's online DPO loss on fixed rollouts and store it as test data (tests/data/peer/trl_online_dpo.json).

TRL 1.16.0's ``trl.experimental.online_dpo.OnlineDPOTrainer`` has no standalone loss function: ``training_step``
generates two completions per prompt, runs the policy and the reference, scores the completions with the reward
functions, pairs completion i with completion i + B (the higher score chosen, a tie going to the first), and takes
``-logsigmoid(beta * margin)`` (or IPO's square) averaged over the prompts, then calls backward. This script calls
that method itself, unbound, on a minimal stand-in for the trainer whose ``_generate`` returns fixed token ids,
whose ``_forward`` returns fixed per-token log-probs (the policy's a leaf tensor with gradient, so the stored
gradient is TRL's), and whose reward function returns fixed scores. Everything between is TRL's code. Stored: the
inputs, the loss, the gradient with respect to the policy's per-token log-probs, and TRL's ``rewards/*`` stats.

    /work/venv-prefcore/bin/python tests/peer/make_trl_online_numbers.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl.experimental.online_dpo.online_dpo_trainer import OnlineDPOTrainer

OUT = Path(__file__).resolve().parents[1] / "data" / "peer" / "trl_online_dpo.json"
F64 = torch.float64
EOS = 2


def case(seed: int, rewards: list[float], beta: float, loss_type: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T = len(rewards) // 2, 4  # B prompts, completions i and i + B belong to prompt i
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, 16, (2 * B, T), generator=g) * mask
    policy = (-torch.rand(2 * B, T, generator=g, dtype=F64) * 2) * mask
    ref = (-torch.rand(2 * B, T, generator=g, dtype=F64) * 2) * mask
    leaf = policy.clone().requires_grad_(True)
    calls = iter([leaf, ref])

    class Acc:
        def gather_for_metrics(self, x):
            return x

        def backward(self, loss, **kw):
            loss.backward()

    stand_in = SimpleNamespace(
        args=SimpleNamespace(use_vllm=False, missing_eos_penalty=None, loss_type=loss_type, torch_empty_cache_steps=None,
                             optim="adamw_torch", n_gpu=1, gradient_accumulation_steps=1),
        eos_token_ids=[EOS], ref_model=object(), reward_funcs=[object()], beta=beta, stats=defaultdict(list),
        accelerator=Acc(), state=SimpleNamespace(global_step=1),
        processing_class=SimpleNamespace(batch_decode=lambda x, **kw: ["c"] * len(x)),
        _generate=lambda model, prompts, images: (torch.zeros(2 * B, 1, dtype=torch.long),
                                                  torch.ones(2 * B, 1, dtype=torch.long), ids, mask, None),
        _forward=lambda *a, **kw: next(calls),
        _calculate_rewards_from_functions=lambda **kw: torch.tensor(rewards, dtype=F64),
    )
    model = torch.nn.Linear(1, 1)
    loss = OnlineDPOTrainer.training_step(stand_in, model, {"prompt": [f"p{i}" for i in range(B)]})
    return {"seed": seed, "beta": beta, "loss_type": loss_type, "rewards": rewards, "mask": mask.tolist(),
            "policy": policy.tolist(), "ref": ref.tolist(), "loss": loss.item(), "grad": leaf.grad.tolist(),
            "stats": {k: v[-1] for k, v in stand_in.stats.items() if k.startswith("rewards/")}}


def main() -> None:
    cases = [case(0, [1.0, 0.0, 0.5, 0.0, 1.0, 0.7], 0.1, "sigmoid"),  # prompt 0: first wins; 1: second; 2: first
             case(1, [0.0, 2.0, 1.0, 3.0], 0.5, "sigmoid"),
             case(2, [1.0, 0.0, 0.2, 0.3, 0.5, 0.9], 0.1, "ipo")]
    OUT.write_text(json.dumps({"peer": "trl", "version": trl.__version__, "torch": torch.__version__,
                               "function": "trl.experimental.online_dpo.OnlineDPOTrainer.training_step",
                               "cases": cases}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
