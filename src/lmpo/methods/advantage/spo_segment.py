"""SPO-chain: segment-level advantages from Monte-Carlo values at low-probability cut points, applied only to the
low-probability tokens (the probability mask).

Paper: "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language Models", Guo
et al., 2025, arXiv:2505.23564 (NeurIPS 2025), Sec. 4 (SPO-chain); code AIFrameResearch/SPO
(``src/treetune/episode_generators/math_episode_generator_with_mc_advantages.py``: ``_create_value_estimation_
requests``, ``_compute_token_advantages``, ``_compute_mc_value``; configs ``polIter_*_spo_chain_*.jsonnet``).

For reply y (tokens y_0..y_{n-1}, sampling probabilities p_t):
  cut points   C = {t - 1 : p_t < rho}, every ``interval``-th kept (C[::interval], the code's ``cutpoint_interval``),
               at most ``max_cuts``; c = -1 is the prompt state (the first token is low-probability)       (Sec. 4.1)
  values       V(c) = (1/N) sum_{n=1..N} R(x, y_{<=c} + z_n),  z_n ~ pi(. | x, y_{<=c})  (N MC rollouts), and
               V(n-1) = R(x, y) at the last token                                                         (Eq. 4)
  advantages   walking the valued positions c_0 < c_1 < ... < c_K = n - 1:  A_k = V(c_k) - V(c_{k-1}) on every
               token of segment k = (c_{k-1}, c_k]; a first segment without a prompt-state value gets 0  (Eq. 5)
  mask         A_t = 0 where p_t > rho (only cut-point tokens learn; the probability mask, Sec. 4.3)
so sum_k A_k = R - V(c_0) (telescoping, the card's property), and with one segment from the prompt state
A = R - V(s_0): a Monte-Carlo-baseline REINFORCE. Differs from GRPO: no group statistics; the baseline of each
segment is the value of the state it starts from, estimated by extra rollouts.

In lmpo the values are estimated during collection by this component's ``after_score`` hook: for each cut point the
prompt plus the decoded reply prefix is continued ``num_rollouts`` times by the rollout generator (at most the
remaining token budget), scored by the run's reward functions on prefix + continuation, and stored in
``extras["cut_values"]`` / ``extras["cut_mask"]`` (B, horizon + 1; column c + 1 holds V(c)).

Gaps filled (fidelity "reconstructed"): the code continues the *decoded* prefix (so do we: the prefix is re-tokenised
by the generator); an unfinished continuation gets the task's "unfinished response penalty" there, here whatever
the run's reward functions give the truncated text; the code reads p_t from the trainer's log-probs of the reply,
lmpo from the sampler's (``sampler_logprobs``, known at collection; equal to the policy's at temperature 1 on-policy).
Defaults: rho = 0.9, interval 5 ("int5"), N = 9 (the
``9rolls`` config), at most 25 cut points (GSM8K's ``max_step_for_value_estimation``); loss PPO clip 0.2 with a KL
loss of 1e-4 (refKl0.0001 + klLoss). SPO-tree (fixed-length segments in a rollout tree) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def cut_points(probs: Tensor, n: int, rho: float, interval: int, max_cuts: int) -> list[int]:
    """C = {t - 1 : p_t < rho for t < n}[::interval][:max_cuts] (the code's cut points, -1 = the prompt state)."""
    low = [t - 1 for t in range(n) if float(probs[t]) < rho]
    return low[::interval][:max_cuts]


def segment_advantages(values: dict[int, float], n: int) -> list[float]:
    """Per-token advantages of one reply of ``n`` tokens from the values at positions (-1 .. n-1, the last = R)."""
    adv: list[float | None] = [None] * n
    base = values.get(-1)
    for t in range(n):
        if t in values:
            adv[t] = 0.0 if base is None else values[t] - base
            base = values[t]
    for t in range(n - 2, -1, -1):  # a token takes the advantage of the segment it belongs to (the next value)
        if adv[t] is None:
            adv[t] = adv[t + 1]
    return [float(a) for a in adv]


@ADVANTAGES.register("spo_segment", paper="Segment Policy Optimization: Effective Segment-Level Credit Assignment "
                     "in RL for Large Language Models (SPO-chain)", arxiv="2505.23564", fidelity="reconstructed")
@dataclass(frozen=True)
class SPOSegmentAdvantage:
    """Segment advantages V(c_k) - V(c_{k-1}) from MC values at low-probability cut points (module docstring).

    Args:
        rho: probability threshold of cut points and of the probability mask (0.9).
        interval: keep every ``interval``-th cut point (5). num_rollouts: N MC continuations per cut point (9).
        max_cuts: cut points per reply (25). horizon: filled from rollout.max_new_tokens.
    """

    rho: float = hp(0.9, gt=0, le=1)
    interval: int = hp(5, ge=1)
    num_rollouts: int = hp(9, ge=1)
    max_cuts: int = hp(25, ge=1)
    horizon: int = hp(64, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()

    def after_score(self, ctx: Any, batch: RolloutBatch) -> RolloutBatch:  # ScoreAugmenter: MC values at cut points
        from lmpo.tasks.base import columns_of

        if len(batch.meta) != batch.batch_size:
            raise DataError("advantage: spo_segment needs each row's prompt text and task row (batch.meta).")
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        H = self.horizon
        values, mask = torch.zeros(batch.batch_size, H + 1), torch.zeros(batch.batch_size, H + 1)
        asks = []  # (row, cut, prompt text, decoded prefix, token budget left)
        for i, m in enumerate(batch.meta):
            n = int(attn[i].sum())
            probs = batch.sampler_logprobs[i, :n].exp()
            for c in cut_points(probs, n, self.rho, self.interval, self.max_cuts):
                prefix = ctx.tokenizer.decode(batch.response_ids[i, :c + 1].tolist(), skip_special_tokens=True)
                asks.append((i, c, m["prompt"], prefix, max(1, ctx.params.max_new_tokens - (c + 1))))
        if asks:
            reps = [a for a in asks for _ in range(self.num_rollouts)]
            out = ctx.generator.generate([p + pre for _, _, p, pre, _ in reps], ctx.params,
                                         max_new_tokens=[b for *_, b in reps])
            rows = [batch.meta[i].get("row") or {} for i, *_ in reps]
            scored = [pre + c for (_, _, _, pre, _), c in zip(reps, out.completions)]
            r = ctx.reward_set([p for _, _, p, _, _ in reps], scored, columns_of(rows))[0].float()
            r = r.view(len(asks), self.num_rollouts).mean(-1)
            for (i, c, *_), v in zip(asks, r.tolist()):
                if c + 1 <= H:
                    values[i, c + 1], mask[i, c + 1] = v, 1.0
        return batch.replace(extras={**batch.extras, "cut_values": values, "cut_mask": mask})

    def __call__(self, batch: RolloutBatch) -> Tensor:
        rmask = batch.response_mask
        B, T = rmask.shape
        out = torch.zeros(B, T, dtype=torch.float64)
        cv, cm = batch.extras.get("cut_values"), batch.extras.get("cut_mask")
        attn = batch.response_attn if batch.response_attn is not None else rmask
        for i in range(B):
            live = (attn[i] | rmask[i]).nonzero().flatten()
            if not len(live):
                continue
            n = int(live.max()) + 1
            vals: dict[int, float] = {}
            if cv is not None:
                for j in cm[i].nonzero().flatten().tolist():
                    if j - 1 < n - 1:
                        vals[j - 1] = float(cv[i, j])
            vals[n - 1] = float(batch.rewards[i])
            out[i, :n] = torch.tensor(segment_advantages(vals, n), dtype=torch.float64)
        low = batch.sampler_logprobs.double().exp() <= self.rho  # the probability mask
        return torch.where(rmask & low, out, torch.zeros_like(out)).to(torch.float32)


PRESETS = {
    "spo_segment": {
        "advantage": {"name": "spo_segment", "rho": 0.9, "interval": 5, "num_rollouts": 9, "max_cuts": 25},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 1.0e-4, "mode": "loss"},
    },
}
