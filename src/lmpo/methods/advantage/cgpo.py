"""CGPO's constrained optimizers (CRPG, CRRAFT, CODPO): Xu et al., "The Perfect Blend: Redefining RLHF with Mixture of Judges", arXiv:2409.20370
(Sec. 4: calibrated rewards, the mixture of judges, the constrained optimizers).

For prompt s with k responses a_i, a baseline response a-bar (the data set's answer), a reward model r and judges
h_j(s, a) in {0, 1} (rule checkers or LLM judges flagging constraint violations), ``cgpo_reward`` gives

    J_i = prod_j h_j(s, a_i),    R_cal(s, a_i) = sigmoid(r(s, a_i) - r(s, a-bar)),    reward_i = J_i * R_cal_i

and the ``crpg`` advantage turns it into the policy-gradient coefficient

    w_i = reward_i * max(0, 1 - KL_i / KL_max),    A_i = w_i - mean_batch(w)

with KL_i = sum_t (log pi_old - log pi_ref) over the reply (no KL gate when ``kl_max`` is unset). The loss is
REINFORCE on A with token-sum / total-token normalisation (the preset's ``reinforce`` + ``token_mean``). What differs
from GRPO: the judge-gated calibrated reward, a batch-mean baseline without std scaling, and the KL budget as a
weight instead of a penalty.

CRRAFT (``crraft`` advantage, Sec. 4.2's calibrated-regularized reward-ranked fine-tuning): with the same KL proxy,

    w_i = 1[KL_i <= KL_max] * reward_i,    A_i = w_i / n_best  on the group's best-weighted rows (w_i > 0), else 0

so REINFORCE + ``token_mean`` is the reward-weighted NLL of each prompt's best feasible response (a reward-ranked SFT
step); a prompt with no positive weight trains nothing. Ties for the best are averaged (weight / n_best), which keeps
the advantage row-permutation equivariant. With ``cgpo_reward`` a violating row has reward 0, so it is never picked.
CODPO (Sec. 4's constrained online DPO) is the ``codpo`` loss (``lmpo/methods/loss/cgpo_codpo.py``: ``online_pref``
with ``pairs: constrained`` and the ``dpo_nll`` preference loss; preset ``cgpo_codpo``): chosen = the best feasible row, rejected = the worst violating row (the
worst row when none violates), DPO + lambda x the chosen response's token-mean NLL.

Reconstructed (``fidelity="reconstructed"``; the paper's text could not be read here, the equations follow the TRL
port as summarised on the method card, so no equation numbers are given): CRRAFT's fallback to the baseline response
a-bar when no sample is positive (not a rollout row here: such prompts are skipped), CRRAFT's normaliser (all
response tokens of the batch, as CRPG), the multi-task
stratified updates (one RM, judge set and optimizer per task) and the paper's judge models; the batch mean as the
baseline follows the TRL port's description (the paper gives no code). A judge is any reward spec; it passes when
its score is >= ``judge_threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError, RewardError
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES, REWARDS


def sequence_kl(batch: RolloutBatch) -> Tensor:
    """(B,) KL_i = sum_t (log pi_old - log pi_ref) over the reply."""
    return ops.masked_sum(batch.old_logprobs - batch.ref_logprobs, batch.response_mask, -1)


def crpg_coefficients(reward: Tensor, kl: Tensor | None, kl_max: float | None) -> Tensor:
    """(B,) weights w_i = reward_i * max(0, 1 - KL_i / KL_max), centred on the batch mean."""
    w = reward.double()
    if kl_max is not None and kl is not None:
        w = w * torch.clamp(1 - kl.double() / kl_max, min=0.0)
    return w - w.mean()


@dataclass(frozen=True)
class _KLGated:
    """CGPO's two advantages share the sequence-KL budget ``kl_max`` (None: no gate) and what it needs."""

    kl_max: float | None = hp(None, gt=0)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"old_logprobs", "ref_logprobs"}) if self.kl_max is not None else frozenset()

    def kl(self, batch: RolloutBatch) -> Tensor | None:
        return sequence_kl(batch) if self.kl_max is not None else None


@ADVANTAGES.register("crpg", paper="The Perfect Blend: Redefining RLHF with Mixture of Judges (CGPO, CRPG)",
                     arxiv="2409.20370", fidelity="reconstructed")
@dataclass(frozen=True)
class CRPGAdvantage(_KLGated):
    """CRPG's coefficient (module docstring); ``kl_max``: the sequence-KL budget (None: no gate)."""

    def __call__(self, batch: RolloutBatch) -> Tensor:
        w = crpg_coefficients(outcome_returns(batch), self.kl(batch), self.kl_max)
        return broadcast(w.float(), batch.response_mask)


@REWARDS.register("cgpo_reward", paper="The Perfect Blend: Redefining RLHF with Mixture of Judges (calibrated "
                  "reward x mixture of judges)", arxiv="2409.20370", fidelity="reconstructed")
@dataclass(frozen=True, eq=False)
class CGPOReward:
    """J * sigmoid(r(s, a) - r(s, a-bar)) (module docstring).

    Attributes:
        rm: The reward model, a reward spec (``{name: reward_model, path: ...}``).
        judges: Reward specs, each a constraint judge (pass: score >= ``judge_threshold``).
        baseline_column: The row column holding the baseline response a-bar (the data set's answer).
        judge_threshold: A judge's pass mark.
    """

    rm: dict
    judges: list = field(default_factory=list)
    baseline_column: str = "answer"
    judge_threshold: float = 0.5

    def __post_init__(self) -> None:
        from lmpo.rewards.reward_set import RewardSpec, resolve_reward

        def build(spec: Any, where: str):
            if isinstance(spec, dict) and "name" in spec and "kwargs" not in spec:
                spec = {"name": spec["name"], "kwargs": {k: v for k, v in spec.items() if k != "name"}}
            s = RewardSpec.coerce(spec, where=where)
            return resolve_reward(s.name, s.kwargs, where=where)

        if not isinstance(self.judges, (list, tuple)):
            raise ConfigError(f"cgpo_reward.judges must be a list of reward specs, got {self.judges!r}.")
        object.__setattr__(self, "_rm", build(self.rm, "cgpo_reward.rm"))
        object.__setattr__(self, "_judges", [build(j, f"cgpo_reward.judges[{i}]") for i, j in enumerate(self.judges)])
        object.__setattr__(self, "_stats", {})

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        base = columns.get(self.baseline_column)
        if base is None or any(b is None for b in base):
            raise RewardError(f'cgpo_reward calibrates against a baseline response in the "{self.baseline_column}" '
                              f"column; columns here: {', '.join(sorted(columns)) or '(none)'}.")
        b = len(completions)
        r = self._rm(prompts=prompts + prompts, completions=list(completions) + [str(x) for x in base], **{
            k: list(v) + list(v) for k, v in columns.items()})
        passed = [True] * b
        for judge in self._judges:
            for i, v in enumerate(judge(prompts=prompts, completions=completions, **columns)):
                passed[i] = passed[i] and float(v) >= self.judge_threshold
        self._stats["violations"] = float(b - sum(passed))
        return [(1 / (1 + math.exp(-(r[i] - r[b + i])))) if passed[i] else 0.0 for i in range(b)]

    def pop_metrics(self) -> dict[str, float]:
        out = dict(self._stats)
        self._stats.clear()
        return out


def crraft_coefficients(reward: Tensor, group_ids: Tensor, kl: Tensor | None, kl_max: float | None) -> Tensor:
    """(B,) CRRAFT weights: the KL-gated reward on each group's best row(s) (ties share it), 0 elsewhere."""
    w = reward.double()
    if kl_max is not None and kl is not None:
        w = w * (kl.double() <= kl_max)
    inv, n = ops.group_index(group_ids)
    best = torch.full((n,), -torch.inf, dtype=w.dtype).scatter_reduce(0, inv, w, "amax")
    top = (w == best[inv]) & (w > 0)
    n_top = torch.zeros(n, dtype=w.dtype).index_add(0, inv, top.to(w.dtype))
    return torch.where(top, w / n_top[inv].clamp_min(1.0), torch.zeros_like(w))


@ADVANTAGES.register("crraft", paper="The Perfect Blend: Redefining RLHF with Mixture of Judges (CGPO, CRRAFT)",
                     arxiv="2409.20370", fidelity="reconstructed")
@dataclass(frozen=True)
class CRRAFTAdvantage(_KLGated):
    """CRRAFT's reward-ranked weights (module docstring); ``kl_max``: the sequence-KL budget (None: no gate)."""

    def __call__(self, batch: RolloutBatch) -> Tensor:
        w = crraft_coefficients(outcome_returns(batch), batch.group_ids, self.kl(batch), self.kl_max)
        return broadcast(w.float(), batch.response_mask)


PRESETS = {
    # CGPO CRPG (arXiv:2409.20370; defaults of the TRL port): k = 4 generations, temperature 0.9, no KL penalty (the
    # KL budget gates the weight instead: set advantage.kl_max), token-sum / total-token REINFORCE. The reward is
    # the task's unless rewards: [{name: cgpo_reward, rm: ..., judges: [...]}] is set.
    "cgpo_crpg": {
        "advantage": {"name": "crpg"},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "token_mean"},
        "rollout": {"num_generations": 4, "temperature": 0.9},
        "kl": {"beta": 0.0},
    },
    # CGPO CRRAFT (TRL port's default optimizer): the KL-gated judged reward on each prompt's best rollout, trained
    # as a weighted NLL (REINFORCE on the crraft weights, token-sum / total tokens); k = 4, temperature 0.9.
    "cgpo_crraft": {
        "advantage": {"name": "crraft"},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "token_mean"},
        "rollout": {"num_generations": 4, "temperature": 0.9},
        "kl": {"beta": 0.0},
    },
    # CGPO CODPO (TRL port: beta 0.1, lambda 5.0): online DPO on (best feasible, worst violating) rollout pairs plus
    # lambda x the chosen reply's token-mean NLL; a row is feasible when its reward is above 0 (cgpo_reward's 0 marks
    # a judge violation).
    "cgpo_codpo": {
        "advantage": {"name": "grpo"},  # unused by the loss (the rewards rank the pairs)
        "loss": {"name": "codpo", "preference": {"name": "dpo_nll", "beta": 0.1, "alpha": 5.0},
                 "pairs": "constrained", "feasible_above": 0.0},
        "aggregator": {"name": "seq_mean_token_mean"},
        "rollout": {"num_generations": 4, "temperature": 0.9},
        "kl": {"beta": 0.0},
    },
}
