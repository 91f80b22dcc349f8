"""ASPO: Advantage Shaping Policy Optimization, a clipped, group-relative tool-use bias on the GRPO advantage.

Paper: Lin & Xu 2025, "Understanding Tool-Integrated Reasoning", arXiv:2508.19201 (Sec. 3.3 / 4.5, Eq. 2).

Reward shaping for tool use (a bonus for calling code early) is unstable under group normalisation: the bonus is
rescaled with the correctness reward and can flip the sign of a correct answer's advantage. ASPO leaves rewards
alone and adds a bounded bias to the already normalised advantage of *eligible* responses:

  A_i     = GRPO advantage of the outcome reward (arXiv:2402.03300)
  E_g     = {i in group g : R_i correct and i called a tool}           (optionally: and every call was valid)
  z_i     = (p_i - mean_{j in E_g} p_j) / std_{j in E_g} p_j          (p_i = position of the first tool call)
  A'_i    = A_i + clip(delta * z_i, -k |A_i|, +k |A_i|)               for i in E_g; A'_i = A_i otherwise

broadcast to the response's trained tokens. With delta < 0 an earlier-than-average first call gets a positive bias;
with k < 1 the bias never changes the sign of A_i, so correctness always dominates. delta = 0 is exactly GRPO.

Differs from GRPO: correct, tool-using responses are re-ranked inside their group by how early they call the tool.

Gaps filled (fidelity "reconstructed": the paper's text was not retrieved; the structure is the card's, confirmed by
the documentation of a public VERL port of the recipe, which cites the paper's Eq. 2):
- std is the sample std (Bessel) over the eligible set; a group with fewer than 2 eligible responses or a zero std
  of positions is left unshaped (the port: "degenerate statistics are skipped");
- "correct" is ``R_i >= correct_threshold`` on the outcome reward (1.0: a fully solved episode);
- the position p_i. The paper's p is the token index of the first code call in a single-stream TIR response. In a
  multi-turn episode batch (``rollout.mode: episodes``) the call is what ends a policy turn, so p_i is read from
  ``extras["turn_tool_calls"]`` (tool calls per policy turn) and ``turn_ids``: ``position="token"`` takes the response
  index of the last policy token of the first turn that called a tool (where the call is emitted),
  ``position="turn"`` the turn's index. A rollout or reward that knows the exact token index can put it in
  ``extras["first_tool_pos"]`` (B,), -1 for no call; it then takes precedence;
- ``require_code_pass`` (the port's option) reads ``extras["invalid_tool_calls"]``: an episode with any invalid call
  is not eligible;
- a batch without any tool information has no eligible response, and ASPO returns the GRPO advantage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage, broadcast
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def first_tool_position(batch: RolloutBatch, position: str = "token") -> Tensor | None:
    """(B,) float position of each row's first tool call (-1: no call), or None when the batch has no tool data.

    ``extras["first_tool_pos"]`` wins; otherwise the first policy turn with ``extras["turn_tool_calls"] > 0`` gives
    its index (``position="turn"``) or the response index of its last policy token (``position="token"``).
    """
    ex = batch.extras
    if "first_tool_pos" in ex:
        return ex["first_tool_pos"].double().reshape(-1)
    calls = ex.get("turn_tool_calls")
    if calls is None or batch.turn_ids is None:
        return None
    calls = calls.reshape(calls.shape[0], -1)
    has = calls > 0
    K = calls.shape[1]
    first = torch.where(has, torch.arange(K, device=calls.device).expand_as(has), torch.full_like(has, K, dtype=torch.long))
    turn = first.min(-1).values  # K: no call
    used = turn < K
    if position == "turn":
        return torch.where(used, turn.double(), torch.full_like(turn, -1, dtype=torch.float64))
    T = batch.turn_ids.shape[1]
    at = batch.response_mask & (batch.turn_ids == turn[:, None])
    idx = torch.where(at, torch.arange(T, device=at.device).expand_as(at), torch.full_like(batch.turn_ids, -1))
    last = idx.max(-1).values  # -1 when the calling turn has no trained token
    return torch.where(used & (last >= 0), last.double(), torch.full_like(last, -1, dtype=torch.float64))


def shaped(adv: Tensor, pos: Tensor, eligible: Tensor, group_ids: Tensor, delta: float, k: float) -> Tensor:
    """A' = A + clip(delta z, -k|A|, k|A|) on eligible rows (z over each group's eligible rows), A elsewhere (B,)."""
    out = adv.double().clone()
    if not eligible.any():
        return out
    g, p, a = group_ids[eligible], pos[eligible].double(), out[eligible]
    n = ops.group_count(g, torch.float64)
    sd = ops.group_std(p, g)
    ok = (n >= 2) & (sd > 0)
    z = torch.where(ok, ops.group_centered(p, g) / torch.where(ok, sd, torch.ones_like(sd)), torch.zeros_like(p))
    bound = k * a.abs()
    bias = torch.maximum(torch.minimum(delta * z, bound), -bound)
    out[eligible] = a + torch.where(ok, bias, torch.zeros_like(bias))
    return out


@ADVANTAGES.register("aspo", paper="Understanding Tool-Integrated Reasoning (ASPO)", arxiv="2508.19201",
                     fidelity="reconstructed")
@dataclass(frozen=True)
class ASPOAdvantage:
    """GRPO advantage plus a clipped bias for correct responses that call a tool earlier than their group's others.

    Args:
        delta: bias per standard deviation of the first-call position (negative: earlier is better).
        k: the bias is clipped to +-k |A_i|; k < 1 keeps the sign of every advantage.
        correct_threshold: a response is correct when its outcome reward reaches this.
        require_code_pass: only responses whose tool calls were all valid are eligible.
        position: "token" (response index where the first call is emitted) or "turn" (its policy-turn index).
        scale_by_std: GRPO's std normalisation of the base advantage.
    """

    delta: float = -2.0
    k: float = hp(0.7, ge=0, lt=1)
    correct_threshold: float = 1.0
    require_code_pass: bool = False
    position: str = hp("token", choices=("token", "turn"))
    scale_by_std: bool = True
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        base = GRPOAdvantage(scale_by_std=self.scale_by_std)(batch)
        pos = first_tool_position(batch, self.position)
        if pos is None or self.delta == 0:
            return base
        adv = (base.double() * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # A_i (constant over the row's tokens)
        eligible = (batch.rewards >= self.correct_threshold) & (pos >= 0)
        if self.require_code_pass:
            bad = batch.extras.get("invalid_tool_calls")
            if bad is None:
                raise DataError("advantage.require_code_pass needs batch.extras['invalid_tool_calls'] "
                                "(rollout.mode: episodes provides it).")
            eligible &= bad.reshape(-1) == 0
        return broadcast(shaped(adv, pos, eligible, batch.group_ids, self.delta, self.k), mask)


# The port's "conservative" setting (delta -2, k 0.7) on GRPO; the loss and aggregation are GRPO's (DAPO-style clip
# and token-mean in the port's run script: clip 0.2 / 0.28, no KL).
PRESETS = {
    "aspo": {
        "advantage": {"name": "aspo", "delta": -2.0, "k": 0.7},
        "loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
