"""RM-Ensemble: Coste, Anwar, Kirk, Krueger, "Reward Model Ensembles Help Mitigate Overoptimization" (ICLR 2024),
arXiv:2310.02743, Section 3 (the three ensemble objectives).

k proxy reward models R_1..R_k (the paper: the same RM trained with k seeds) score each (x, y); the policy optimises
a combination instead of one proxy:

    mean:  R_mean = (1/k) sum_j R_j
    WCO:   R_WCO  = min_j R_j                                    (worst-case optimisation)
    UWO:   R_UWO  = R_mean - lam * Var_j(R_j)                    (uncertainty-weighted optimisation)

What differs from a single RM + GRPO: only the reward; the rest of the run (PPO or GRPO, the KL penalty 0.01 the
paper pairs with the ensemble) is the preset's. Gaps filled: the paper's two code bases disagree on the variance
(the PPO code: ``torch.var``, unbiased 1/(k-1); the best-of-n code: numpy's population 1/k); we default to the
unbiased one (this is an RL trainer) and expose ``variance: population``. The members are any reward specs
(``reward_model`` with a trained RM's path, or any other reward), so a CPU test can use k tiny scorers.

A member that returns a non-finite score for a sample makes that sample a failure (masked to its group's mean and
counted in ``reward/rm_ensemble/failures``, or an error with ``on_failure: error``). The mean ensemble variance of
each batch is logged as ``reward/<name>/variance``: the disagreement the conservative objectives penalise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lmpo.errors import ConfigError
from lmpo.methods.params import hp
from lmpo.registry import REWARDS
from lmpo.rewards.scorer_base import ON_FAILURE, FailureLog, mask_failures

COMBINES = ("mean", "wco", "uwo")
VARIANCES = ("unbiased", "population")


def combine(scores: torch.Tensor, how: str, lam: float = 1.0, variance: str = "unbiased") -> torch.Tensor:
    """(B, k) member scores -> (B,) combined reward (module docstring)."""
    mean = scores.mean(-1)
    if how == "mean":
        return mean
    if how == "wco":
        return scores.min(-1).values
    k = scores.shape[-1]
    var = scores.var(-1, correction=1 if variance == "unbiased" and k > 1 else 0)
    return mean - lam * var


@REWARDS.register("rm_ensemble", paper="Reward Model Ensembles Help Mitigate Overoptimization", arxiv="2310.02743",
                  fidelity="exact")
@dataclass(frozen=True, eq=False)
class RMEnsemble:
    """The combined reward of k member rewards (module docstring).

    Attributes:
        members: Reward specs, like entries of ``rewards:`` (``{name: reward_model, path: runs/rm-seed1}``, ...).
        combine: ``mean`` | ``wco`` | ``uwo``.
        lam: UWO's variance coefficient (the released code's default 1; the paper finds UWO robust to it).
        variance: ``unbiased`` (1/(k-1), the PPO code) | ``population`` (1/k, the best-of-n code).
        on_failure: ``mask`` | ``error`` for a sample a member scored non-finite.
    """

    members: list
    combine: str = hp("wco", choices=COMBINES)
    lam: float = hp(1.0, ge=0)
    variance: str = hp("unbiased", choices=VARIANCES)
    on_failure: str = hp("mask", choices=ON_FAILURE)

    def __post_init__(self) -> None:
        from lmpo.rewards.reward_set import RewardSpec, resolve_reward

        if not isinstance(self.members, (list, tuple)) or len(self.members) < 2:
            raise ConfigError(f"rm_ensemble: members must list at least 2 reward specs (the paper uses 4-5 RMs "
                              f"trained with different seeds), got {self.members!r}.")
        fns = []
        for i, m in enumerate(self.members):
            if isinstance(m, dict) and "name" in m:  # the flat form of rewards: entries
                m = {"name": m["name"], "kwargs": {k: v for k, v in m.items() if k not in ("name", "kwargs")}
                     | dict(m.get("kwargs") or {})}
            spec = RewardSpec.coerce(m, where=f"rm_ensemble.members[{i}]")
            fns.append(resolve_reward(spec.name, spec.kwargs, where=f"rm_ensemble.members[{i}]"))
        object.__setattr__(self, "fns", fns)
        object.__setattr__(self, "failures", FailureLog())
        object.__setattr__(self, "_stats", {})

    def member_scores(self, prompts: list, completions: list[str], **columns: Any) -> torch.Tensor:
        """(B, k) raw member scores (NaN where a member gave none)."""
        cols = []
        for j, fn in enumerate(self.fns):
            got = fn(prompts=prompts, completions=completions, **columns)
            got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
            if len(got) != len(completions):
                raise ConfigError(f"rm_ensemble: member {j} returned {len(got)} scores for {len(completions)} samples.")
            cols.append([float(v) if v is not None else math.nan for v in got])
        return torch.tensor(cols, dtype=torch.float64).T

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        s = self.member_scores(prompts, completions, **columns)
        ok = torch.isfinite(s).all(-1)
        out = combine(s, self.combine, self.lam, self.variance)
        if ok.any() and s.shape[-1] > 1:
            self._stats["variance"] = float(s[ok].var(-1, correction=1).mean())
        raw = [float(v) if k else None for v, k in zip(out.tolist(), ok.tolist())]
        return mask_failures("rm_ensemble", prompts, completions, raw, self.on_failure, self.failures)

    def pop_metrics(self) -> dict[str, float]:
        out = {**self.failures.pop(), **self._stats}
        self._stats.clear()
        for fn in self.fns:  # the members' own counts (a reward model's failures) under the ensemble's name
            out.update({f"member_{k}": v for k, v in (getattr(fn, "pop_metrics", lambda: {})()).items()})
        return out
