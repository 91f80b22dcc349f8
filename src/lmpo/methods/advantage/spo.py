"""SPO: Single-stream Policy Optimization: a persistent per-prompt value tracker instead of a group baseline.

Paper: Xu & Ding 2025, "Single-stream Policy Optimization", arXiv:2509.13232 (Sec. 3; Alg. 1); the recipe details
below follow the authors' released verl recipe (``recipe/spo``), as issue 21 reviewed them.
- Tracker (Sec. 3.1): per prompt x a Beta(alpha_x, beta_x) belief over its success probability,
  v_x = alpha_x / (alpha_x + beta_x). After a step with rewards r in [0, 1] for x:
      alpha_x <- rho_x alpha_x + r,   beta_x <- rho_x beta_x + (1 - r)                          (Eq. 4)
  with KL-adaptive forgetting rho_x = clip(2^(-D_x / D_half), rho_min, rho_max)              (Eq. 5)
  and D_x = mean_t |log pi_prev(y_t) - log pi(y_t)| over the tokens of the last stored response y for x, where
  log pi_prev are the *actor* log-probs of y recomputed right after the update of x's previous visit and pi is the
  policy after the current update (the released recipe; until issue 21 lmpo used y's sampler log-probs, which mixes
  the sampler/trainer mismatch and the previous visit's own update into D).
- Offline initialisation (the released recipe): from N_eff = 8 offline samples of x with s successes,
      alpha_0 = N_init (s + 0.5) / (N_eff + 1),   beta_0 = N_init (N_eff - s + 0.5) / (N_eff + 1),
  N_init = 1 / (1 - rho_min) (the tracker's effective memory; 8 for rho_min = 0.875). ``offline_values`` names a
  JSON file {prompt key: [scores]} (the recipe's ``merge_offline_values`` output, keyed by lmpo's prompt key); N_eff
  is the number of scores (the recipe keeps at most 8), scores are clipped to [0, 1].
- Advantage (Sec. 3.2): A_hat = r - v_x (v_x read BEFORE the update), normalised over the whole batch
      A = (A_hat - mean_batch A_hat) / (std_batch A_hat + 1e-8)                                 (Eq. 6-7)
  and broadcast to every token; the loss is PPO-clip with the recipe's clip 0.2 / 0.28 and dual clip c = 10.
- Prioritised sampling (Sec. 3.3): prompts drawn with weight w_x = sqrt(v_x (1 - v_x)) + epsilon.
Differs from GRPO: the baseline is a tracked success probability, not the group mean, so a prompt whose samples all
agree still gets a non-zero advantage, and normalisation is over the batch, not the group.
Gaps filled: rho_min = 0.875 (N_init = 8). A prompt with no offline scores (no file, or missing from it) starts at
the Jeffreys prior alpha = beta = 0.5 (the formula's prior with no data, unscaled), and its first update uses rho_max
(no stored response to measure D on). Several samples of one prompt in a batch update its tracker once, with their
summed successes. Rewards outside [0, 1] are clipped for the tracker update only. Without a ``logprobs_fn`` (no
policy to query) the sampler log-probs are stored and rho = rho_max. Prompt identity is ``meta["prompt_key"]`` (the
prompt's token ids when a batch carries no meta).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.methods.base import Stateful
from lmpo.methods.params import Rule, hp, ordered
from lmpo.registry import ADVANTAGES

PRIOR = 0.5  # alpha_0 = beta_0 without offline estimates (N_eff = 0)


def row_keys(batch: RolloutBatch) -> list[str]:
    """Prompt identity per row: meta["prompt_key"], else the (unpadded) prompt token ids."""
    if batch.meta and all("prompt_key" in m for m in batch.meta):
        return [str(m["prompt_key"]) for m in batch.meta]
    mask = batch.prompt_mask if batch.prompt_mask is not None else torch.ones_like(batch.prompt_ids, dtype=torch.bool)
    return [",".join(map(str, ids[m].tolist())) for ids, m in zip(batch.prompt_ids, mask)]


def offline_prior(scores: list[float], rho_min: float) -> list[float]:
    """[alpha_0, beta_0] = N_init [(s + 0.5), (N_eff - s + 0.5)] / (N_eff + 1), N_init = 1 / (1 - rho_min)."""
    n_eff = len(scores)
    s = sum(min(1.0, max(0.0, float(x))) for x in scores)
    n_init = 1.0 / (1.0 - rho_min) if rho_min < 1 else float(n_eff + 1)
    return [n_init * (s + 0.5) / (n_eff + 1), n_init * (n_eff - s + 0.5) / (n_eff + 1)]


def forgetting(d: Tensor, d_half: float, rho_min: float, rho_max: float) -> Tensor:
    """rho = clip(2^(-D / D_half), rho_min, rho_max) (Eq. 5)."""
    return torch.pow(2.0, -d / d_half).clamp(rho_min, rho_max)


@ADVANTAGES.register("spo", paper="Single-stream Policy Optimization", arxiv="2509.13232")
@dataclass
class SPOAdvantage(Stateful):
    """A = batch-whiten(r - v_x) with v_x a KL-adaptive Beta tracker per prompt (arXiv:2509.13232 Eq. 4-7).

    Args:
        d_half: D_half, the policy change (mean |log-ratio|) that halves the tracker's memory.
        rho_min, rho_max: bounds of the forgetting factor rho.
        adaptive: False uses the constant rho = rho_max (the paper's constant-rho variant).
        prioritize: sample prompts with weight sqrt(v (1 - v)) + explore (Sec. 3.3).
        explore: epsilon of the sampling weight.
        eps: added to the batch std.
        offline_values: JSON file {prompt key: [offline scores]} for the tracker's initialisation (None: prior).
    """

    d_half: float = hp(0.06, gt=0)
    rho_min: float = hp(0.875, gt=0, le=1)
    rho_max: float = hp(0.96, gt=0, le=1)
    adaptive: bool = True
    prioritize: bool = True
    explore: float = hp(0.05, ge=0)
    eps: float = hp(1e-8, ge=0)
    offline_values: str | None = None
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("rho_min", "rho_max"),)

    def initial_state(self) -> dict[str, Any]:
        # prompt key -> [alpha, beta, prompt ids, last response ids, their actor log-probs after that visit's update]
        # (Beta tracker, Eq. 4-5); offline-initialised prompts start as [alpha_0, beta_0]
        tracker: dict[str, list] = {}
        if self.offline_values is not None:
            with open(self.offline_values) as f:
                for key, scores in json.load(f).items():
                    tracker[str(key)] = offline_prior(scores, self.rho_min)
        return {"tracker": tracker}

    def value(self, key: str) -> float:
        """v_x = alpha / (alpha + beta) (0.5 for an unseen prompt)."""
        a, b = self.state["tracker"].get(key, (PRIOR, PRIOR))[:2]
        return a / (a + b)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch).double()
        v = torch.tensor([self.value(k) for k in row_keys(batch)], dtype=torch.float64)
        adv = ops.masked_whiten(r - v, torch.ones_like(r, dtype=torch.bool), eps=self.eps)
        return broadcast(adv, batch.response_mask)

    def prompt_weights(self, keys: list[str]) -> list[float] | None:
        if not self.prioritize:
            return None
        return [math.sqrt(max(0.0, self.value(k) * (1 - self.value(k)))) + self.explore for k in keys]

    def observe(self, batch: RolloutBatch, logprobs_fn: Callable[[RolloutBatch], Tensor] | None = None) -> None:
        """Update the trackers of this batch's prompts after the policy step (Eq. 4-5); store each prompt's last
        response with its actor log-probs under the updated policy (the next visit's reference for D)."""
        keys = row_keys(batch)
        rows: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            rows.setdefault(k, []).append(i)
        stored = [k for k in rows if len(self.state["tracker"].get(k, ())) > 2]
        rho = {k: self.rho_max for k in rows}
        if self.adaptive and stored and logprobs_fn is not None:
            prev, cur, mask = self._replay(stored, logprobs_fn, batch.response_ids.device)
            d = ops.masked_mean((prev - cur).abs(), mask, dim=-1)
            rho.update(zip(stored, forgetting(d, self.d_half, self.rho_min, self.rho_max).tolist()))
        r = outcome_returns(batch).double().clamp(0.0, 1.0)
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        pmask = batch.prompt_mask if batch.prompt_mask is not None else torch.ones_like(batch.prompt_ids, dtype=torch.bool)
        # the actor's log-probs of the new responses after this update (the released recipe); sampler's without a policy
        lps = (logprobs_fn(batch) if self.adaptive and logprobs_fn is not None else batch.sampler_logprobs).float().cpu()
        for k, idx in rows.items():
            a, b = self.state["tracker"].get(k, (PRIOR, PRIOR))[:2]
            s = float(r[idx].sum())
            last = idx[-1]
            keep = attn[last].cpu()
            self.state["tracker"][k] = [rho[k] * a + s, rho[k] * b + (len(idx) - s),
                                        batch.prompt_ids[last][pmask[last]].tolist(),
                                        batch.response_ids[last][attn[last]].tolist(), lps[last][keep].tolist()]

    def _replay(self, keys: list[str], logprobs_fn: Callable, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Current-policy log-probs of the stored responses: (stored old log-probs, current, mask), each (K, T)."""
        prompts, resps, lps = zip(*(self.state["tracker"][k][2:] for k in keys))
        P, T = max(map(len, prompts)), max(1, max(map(len, resps)))
        pid = torch.tensor([[0] * (P - len(p)) + p for p in prompts], dtype=torch.long)
        pm = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
        rid = torch.tensor([y + [0] * (T - len(y)) for y in resps], dtype=torch.long)
        rm = torch.tensor([[True] * len(y) + [False] * (T - len(y)) for y in resps])
        old = torch.tensor([lp + [0.0] * (T - len(lp)) for lp in lps])
        replay = RolloutBatch(prompt_ids=pid, prompt_mask=pm, response_ids=rid, response_mask=rm, response_attn=rm,
                              group_ids=torch.arange(len(keys)), rewards=torch.zeros(len(keys)), sampler_logprobs=old)
        replay = replay.to(device)  # the policy's device
        return old, logprobs_fn(replay).float().cpu(), rm




PRESETS = {
    # SPO (arXiv:2509.13232, released recipe): one response per prompt, tracker baseline, batch-normalised advantage,
    # PPO-clip with clip 0.2 / 0.28 and dual clip 10, no KL.
    "spo": {
        "advantage": {"name": "spo", "d_half": 0.06, "rho_max": 0.96, "explore": 0.05},
        "loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28, "dual_clip": 10.0},
        "aggregator": {"name": "token_mean"},
        "rollout": {"num_generations": 1},
        "kl": {"beta": 0.0},
    },
}
