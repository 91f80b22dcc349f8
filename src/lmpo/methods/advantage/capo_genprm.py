"""CAPO (generative credit assignment): K critiques of a reply, each listing its wrong steps, voted into a per-token
penalty on top of the verifier's outcome reward.

Paper: "CAPO: Towards Enhancing LLM Reasoning through Verifiable Generative Credit Assignment", 2025,
arXiv:2508.02298 (code andyclsr/CAPO announced, not released). Reply i, verifier outcome r_i in {0, 1}, steps k:
  critiques   c_1..c_K, each a set S_j of wrong steps (a frozen LLM "GenPRM" reading the whole solution once)
  voting      intersection: E = cap_j S_j;  majority: E = {k : #{j : k in S_j} > K/2};
              average: e_k = #{j : k in S_j} / K (a soft penalty)
  token reward R_{i,t} = W_whole r_i - W_process e_{k(t)}   (e in {0, 1} for intersection / majority)   (Sec. 3)
so the tokens of flagged steps are penalised inside right answers, and correct steps inside wrong answers are not
punished beyond the outcome. The asymmetric weighting (W_whole > W_process) is the paper's recommendation.

Advantage (reconstructed: the paper's group normaliser of token rewards is not in the text we could read): every
token reward is centred and scaled by the group statistics of the outcome term (GRPO's, Bessel std):
  A_{i,t} = (R_{i,t} - mean_g(W_whole r)) / s_g,   s_g = std_g(W_whole r) + eps, or 1 when that std is 0
so with no flagged step A is GRPO's advantage exactly (the card's property), and a flagged token is lowered by
W_process e / s_g. The loss is GRPO's clipped surrogate.

Critiques are collected by this component's ``after_score`` hook: the reply is cut into steps
(:func:`lmpo.rewards.steps.split_steps`, ``separator``) and the critic is asked ``num_critiques`` times:
``critic(prompt, completion, steps, **columns) -> list of wrong step indices``. ``critic`` names a step critic
(:data:`CRITICS`, or ``module:attr``); the built-in ``rule`` critic flags the steps that the exact step scorer
``scorer`` scores below 0 (deterministic, so its K critiques agree; a sampled generative judge gives different
ones). ``extras["error_weight"]`` (B, horizon) holds e_{k(t)} per token. An invalid critique (not a list of valid
step indices) stops the run naming the row.
Gaps filled (fidelity "reconstructed"): the normaliser above; W_whole = 1, W_process = 0.5 and K = 3 (the paper studies
several asymmetric settings without one default we could find); the critique prompt and its parsing belong to the
judge, not to this component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES, Registry
from lmpo.rewards.steps import check_scorer_spec, place_steps, resolve_scorer, split_steps, step_end_tokens, token_char_ends

CRITICS: Registry = Registry("critic")
VOTES = ("intersection", "majority", "average")


@CRITICS.register("rule", paper="", arxiv="")
@dataclass(frozen=True)
class RuleCritic:
    """Flags the steps an exact step scorer (``lmpo.rewards.steps.STEP_SCORERS``) scores below 0."""

    scorer: str = "equation_steps"

    def __call__(self, prompt: str, completion: str, steps: list[str], **columns: Any) -> list[int]:
        scores = resolve_scorer(self.scorer)(prompt, completion, steps, **columns)
        return [k for k, s in enumerate(scores) if float(s) < 0]


def vote(critiques: list[list[int]], n_steps: int, rule: str) -> list[float]:
    """Per-step error weight e_k from K critiques (module docstring)."""
    K = len(critiques)
    counts = [sum(k in set(c) for c in critiques) for k in range(n_steps)]
    if rule == "intersection":
        return [float(K > 0 and c == K) for c in counts]
    if rule == "majority":
        return [float(c > K / 2) for c in counts]
    return [c / K if K else 0.0 for c in counts]


@ADVANTAGES.register("capo_genprm", paper="CAPO: Towards Enhancing LLM Reasoning through Verifiable Generative Credit "
                     "Assignment", arxiv="2508.02298", fidelity="reconstructed")
@dataclass(frozen=True)
class CAPOAdvantage:
    """(W_whole r - W_process e_t - mean_g W_whole r) / s_g, e from K voted critiques (module docstring).

    Args:
        w_whole / w_process: outcome and step-penalty weights. num_critiques: K. vote_rule: intersection, majority
        or average. critic: step critic name (``rule`` uses ``scorer``). separator: where steps are cut.
        horizon: width of ``extras["error_weight"]`` (filled from rollout.max_new_tokens).
    """

    w_whole: float = hp(1.0, gt=0)
    w_process: float = hp(0.5, ge=0)
    num_critiques: int = hp(3, ge=1)
    vote_rule: str = hp("majority", choices=VOTES)
    critic: str = "rule"
    scorer: str = "equation_steps"
    separator: str = "\n\n"
    eps: float = hp(1e-6, ge=0)
    horizon: int = hp(64, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if ":" not in self.critic:
            CRITICS.entry(self.critic, where="advantage: capo_genprm.critic")
        check_scorer_spec(self.scorer, "advantage: capo_genprm.scorer")

    def _critic(self) -> Callable[..., list[int]]:
        if "_critic_fn" not in self.__dict__:
            if ":" in self.critic:
                obj = resolve_scorer(self.critic)
            else:
                cls = CRITICS.get(self.critic, where="advantage.critic")
                obj = cls(scorer=self.scorer) if cls is RuleCritic else cls()
            self.__dict__["_critic_fn"] = obj
        return self.__dict__["_critic_fn"]

    def after_score(self, ctx: Any, batch: RolloutBatch) -> RolloutBatch:  # ScoreAugmenter: the critiques
        if len(batch.meta) != batch.batch_size:
            raise DataError("advantage: capo_genprm needs each row's reply text (batch.meta[i]['completion']).")
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        err = torch.zeros(batch.batch_size, self.horizon)
        for i, m in enumerate(batch.meta):
            pos = attn[i].nonzero().flatten()
            text = m["completion"]
            spans = split_steps(text, self.separator)
            if not len(pos) or not spans:
                continue
            steps = [text[s:e] for s, e in spans]
            row = dict(m.get("row") or {})
            prompt = row.pop("prompt", m.get("prompt", ""))
            critiques = []
            for _ in range(self.num_critiques):
                c = self._critic()(prompt if isinstance(prompt, str) else "", text, steps, **row)
                if not isinstance(c, (list, tuple, set)) or any(
                        not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(steps) for k in c):
                    raise DataError(f"advantage: capo_genprm critic {self.critic!r} on row {i} ({len(steps)} steps) "
                                    f"returned {c!r}; expected a list of wrong step indices in [0, {len(steps)}).")
                critiques.append(list(c))
            e = vote(critiques, len(steps), self.vote_rule)
            ends = step_end_tokens(token_char_ends(ctx.tokenizer, batch.response_ids[i, pos].tolist(), text), spans)
            _, turn, _ = place_steps(ends, e, len(pos))
            uniq = sorted(set(ends))
            per_step = [max(e[k] for k in range(len(e)) if ends[k] == u) for u in uniq]  # merged steps: worst
            for j, p in enumerate(pos.tolist()):
                if p < self.horizon:
                    err[i, p] = per_step[int(turn[j])]
        return batch.replace(extras={**batch.extras, "error_weight": err})

    def token_rewards(self, batch: RolloutBatch) -> Tensor:
        """R_{i,t} = W_whole r_i - W_process e_{k(t)} (B, T) float64, 0 off the mask."""
        mask = batch.response_mask
        e = torch.zeros(mask.shape, dtype=torch.float64)
        ew = batch.extras.get("error_weight")
        if ew is not None:
            e = ops.fit_width(ew, e)
        return ops.zero_outside(self.w_whole * batch.rewards.double()[:, None] - self.w_process * e, mask)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = self.w_whole * batch.rewards.double()
        mean = ops.group_mean(r, batch.group_ids)
        sd = ops.group_std(r, batch.group_ids)
        s = torch.where(sd > 0, sd + self.eps, torch.ones_like(sd))
        adv = (self.token_rewards(batch) - mean[:, None]) / s[:, None]
        return ops.zero_outside(adv, batch.response_mask).to(torch.float32)


PRESETS = {
    "capo_genprm": {
        "advantage": {"name": "capo_genprm", "w_whole": 1.0, "w_process": 0.5, "num_critiques": 3,
                      "vote_rule": "majority"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
