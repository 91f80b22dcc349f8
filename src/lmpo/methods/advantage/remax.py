"""ReMax: REINFORCE with the greedy reply's reward as the baseline.

Paper: Li et al. 2024, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large
Language Models", arXiv:2310.10505, Algorithm 1 / Eq. 6: for each prompt x a sampled reply y ~ pi and the greedy reply
y_bar = argmax decoding; the gradient is sum_t grad log pi(y_t | x, y_<t) * (r(x, y) - r(x, y_bar)), i.e.
    A_{i,t} = G_{i,t} - b(x_i),     b(x) = r(x, y_bar(x)),
with G the return (the outcome reward plus the reward-to-go of token rewards, e.g. a KL penalty in the rewards).
Differs from GRPO: the baseline is one extra *greedy* rollout per prompt instead of the group's statistics (no std
division), so it works with one sample per prompt and needs no value model.

In lmpo the greedy replies are made in collection: this component is also a ``CollectObserver`` whose
``after_collect`` decodes each distinct prompt text of the step's raw batches greedily with the sampler (same
length limit), scores it with the run's reward functions and keeps b(x) by prompt text. A batch may instead carry
``extras["reward_baselines"]`` (B,) (verl's ``reward_baselines``, tests). A collected row whose prompt has no
baseline is an error; a batch with neither (made outside collection, without prompt texts) gets b = 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.advantage.reinforce_pp import returns_to_go
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES

KEEP = 4096  # baselines kept (the latest prompts); a step reads only its own


@ADVANTAGES.register("remax", paper="ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for "
                     "Aligning Large Language Models", arxiv="2310.10505")
@dataclass
class ReMaxAdvantage:
    """A_t = G_t - r(x, greedy reply) (arXiv:2310.10505 Eq. 6); the greedy replies are decoded in ``after_collect``.

    Args:
        greedy_max_new_tokens: length limit of the greedy replies; ``None`` = the rollout's.
    """

    greedy_max_new_tokens: int | None = hp(None, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()
    # prompt text -> reward of its greedy reply; made and read within one step, so not checkpointed (a resumed run
    # collects its step again)
    _baselines: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def after_collect(self, ctx, batch: RolloutBatch) -> None:  # CollectObserver
        from lmpo.tasks.base import columns_of

        first: dict[str, dict[str, Any]] = {}
        for m in batch.meta:
            if "prompt" in m and m["prompt"] not in first:
                first[m["prompt"]] = m.get("row", {})
        if not first:
            return
        prompts = list(first)
        params = dataclasses.replace(ctx.params, greedy=True)
        if self.greedy_max_new_tokens is not None:
            params = dataclasses.replace(params, max_new_tokens=self.greedy_max_new_tokens)
        out = ctx.generator.generate(prompts, params)
        rows = list(first.values())
        prefixes = [r.get("response_prefix") or "" for r in rows]
        scored = [p + c for p, c in zip(prefixes, out.completions)]
        rewards = ctx.reward_set(prompts, scored, columns_of(rows))[0]
        base = self._baselines
        for p, r in zip(prompts, rewards.tolist()):
            base.pop(p, None)
            base[p] = float(r)
        for p in list(base)[: max(0, len(base) - KEEP)]:
            del base[p]

    def baselines(self, batch: RolloutBatch) -> Tensor:
        if "reward_baselines" in batch.extras:
            return batch.extras["reward_baselines"].to(torch.float32)
        texts = [m.get("prompt") for m in batch.meta] if batch.meta else []
        if not texts or any(t is None for t in texts):
            return torch.zeros(batch.batch_size)
        known = self._baselines
        missing = [t for t in texts if t not in known]
        if missing:
            raise DataError(f"advantage remax: no greedy baseline for {len(missing)} row(s) (e.g. prompt "
                            f"{missing[0][:60]!r}); the baselines are made by its after_collect during collection.")
        return torch.tensor([known[t] for t in texts], dtype=torch.float32)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        g = returns_to_go(batch, batch.rewards.float())
        b = self.baselines(batch).to(g.device)
        return ops.zero_outside(g - b[:, None], batch.response_mask)


PRESETS = {
    # ReMax (arXiv:2310.10505): one greedy reply per prompt as the baseline, the REINFORCE loss, token sums averaged
    # over sequences (the paper's sequence-level objective), no KL in the copy-task setting.
    "remax": {
        "advantage": {"name": "remax"},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
