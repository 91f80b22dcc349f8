"""MatchTIR: turn rewards from bipartite matching of tool calls, and a dual-level (trajectory + turn) advantage.

Paper: Qu, Dai, Cai, Xu, Wang, Yin, "MatchTIR: Fine-Grained Supervision for Tool-Integrated Reasoning via Bipartite
Matching", ACL 2026, arXiv:2601.10712 (official code: quchangle1/MatchTIR).

Turn rewards (the matching; :func:`call_similarity`, :func:`match_calls`, :func:`matched_turn_rewards`). A
trajectory's predicted tool calls p_1..p_P are matched against the ground-truth trace g_1..g_G. Similarity:

  s(p, g) = 0 if the names differ, else [1 + J(keys_p, keys_g) + #{k : p[k] = g[k]}] / (2 + |params_g|)

with J the Jaccard index of the parameter names (1 when both have none). Hard assignment: the one-to-one matching
sigma maximising sum_i s(p_i, g_sigma(i)) (Kuhn-Munkres, ``scipy.optimize.linear_sum_assignment``); a matched call
earns s(p_i, g_sigma(i)), an unmatched one (or one matched at similarity 0) the penalty. Soft assignment: the
entropic optimal transport plan T = Sinkhorn(mu = 1/P, nu = 1/G, cost -S, reg 0.1) and r(p_i) = sum_j T_ij S_ij
(each call carries mass 1/P, so a duplicated call splits its gold call's credit; P exact calls earn 1/P each).
A turn's reward is the mean of its calls' rewards (0 for a turn without calls); the environment adds the final
answer's score (token F1 in the paper) to the answer turn. An environment with a gold trace returns these as its
per-turn rewards, which ``rollout.mode: episodes`` records in ``extras["turn_rewards"]``.

Advantage (this component, ``matchtir``): with r_{i,k} the turn rewards of trajectory i in its group,

  A^traj_i   = (R_i - mean_j R_j) / (std_j R_j + eps),  R_i = sum_k r_{i,k} (the episode return)
  G_{i,k}    = sum_{m >= k} lambda^{m - k} r_{i,m}                             (discounted turn return)
  A^turn_{i,k} = (G_{i,k} - mean_j G_{j,k}) / (std_j G_{j,k} + eps)            (same group, same turn index k)
  A_{i,k}    = (A^traj_i + A^turn_{i,k}) / 2                                   on every token of turn k

then the standard clipped surrogate with token-mean aggregation. Differs from GRPO: turns of one trajectory get
different advantages (a redundant or wrong call inside a successful trajectory is still penalised); with one turn
per trajectory A^turn = A^traj and it is GRPO.

Choices: R_i is ``batch.rewards`` (plus summed ``token_rewards``) so a configured outcome reward may differ from the
turn sum; stds use Bessel's correction (``torch.std``, as verl) and eps = 1e-6; a (group, turn) set of one gets
A^turn = 0; turns are ``turn_ids`` with per-turn rewards from ``extras["turn_rewards"]`` (without them: one turn
whose reward is the outcome, i.e. GRPO). The released code matches greedily (highest score first, s > 0); the paper's
Kuhn-Munkres assignment is implemented. Hard matching needs scipy (``pip install 'lmpo[agents]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import outcome_returns
from lmpo.methods.params import hp
from lmpo.methods.turns import discounted_turn_returns, played, turn_layout, turns_to_tokens
from lmpo.registry import ADVANTAGES


# --------------------------------------------------------------------------- matching (turn rewards)
def _call_parts(call: dict) -> tuple[str, dict]:
    if not isinstance(call, dict) or "name" not in call:
        raise ValueError(f"a tool call must be a mapping with a 'name' (and 'arguments'), got {call!r}")
    args = call.get("arguments") or {}
    if not isinstance(args, dict):
        raise ValueError(f"tool call {call['name']!r}: 'arguments' must be a mapping, got {args!r}")
    return str(call["name"]), args


def call_similarity(pred: dict, gold: dict) -> float:
    """s(p, g) = 0 if the names differ, else (1 + Jaccard(param names) + #equal values) / (2 + |params_g|)."""
    (pn, pa), (gn, ga) = _call_parts(pred), _call_parts(gold)
    if pn != gn:
        return 0.0
    kp, kg = set(pa), set(ga)
    jaccard = len(kp & kg) / len(kp | kg) if kp | kg else 1.0
    same = sum(1 for k in kg if k in pa and pa[k] == ga[k])
    return (1.0 + jaccard + same) / (2.0 + len(ga))


def similarity_matrix(pred: list[dict], gold: list[dict]) -> list[list[float]]:
    return [[call_similarity(p, g) for g in gold] for p in pred]


def sinkhorn(S: Tensor, reg: float = 0.1, iters: int = 1000, tol: float = 1e-9) -> Tensor:
    """Entropic OT plan (P, G) between uniform marginals 1/P and 1/G for the cost -S (log-domain Sinkhorn)."""
    P, G = S.shape
    logK = S.double() / reg  # -cost / reg
    log_mu = torch.full((P,), -math.log(P), dtype=torch.float64)
    log_nu = torch.full((G,), -math.log(G), dtype=torch.float64)
    f = torch.zeros(P, dtype=torch.float64)
    g = torch.zeros(G, dtype=torch.float64)
    for _ in range(iters):
        f_new = log_mu - torch.logsumexp(logK + g[None, :], dim=1)
        g = log_nu - torch.logsumexp(logK + f_new[:, None], dim=0)
        done = bool((f_new - f).abs().max() < tol)
        f = f_new
        if done:
            break
    return torch.exp(f[:, None] + logK + g[None, :])


def match_calls(pred: list[dict], gold: list[dict], mode: str = "hard", penalty: float = 0.0,
                reg: float = 0.1) -> list[float]:
    """The reward r(p_i) of every predicted call against the gold trace (hard: Kuhn-Munkres; soft: Sinkhorn OT)."""
    if mode not in ("hard", "soft"):
        raise ConfigError(f'MatchTIR matching mode must be "hard" or "soft", got {mode!r}.')
    if not pred:
        return []
    if not gold:
        return [penalty if mode == "hard" else 0.0 for _ in pred]
    S = similarity_matrix(pred, gold)
    if mode == "soft":
        St = torch.tensor(S, dtype=torch.float64)
        return (sinkhorn(St, reg) * St).sum(-1).tolist()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ConfigError("MatchTIR's hard matching uses scipy.optimize.linear_sum_assignment; install scipy "
                          "(pip install 'lmpo[agents]') or use the soft (optimal transport) assignment.") from None
    rows, cols = linear_sum_assignment([[-s for s in row] for row in S])
    out = [penalty] * len(pred)
    for i, j in zip(rows.tolist(), cols.tolist()):
        if S[i][j] > 0:
            out[i] = S[i][j]
    return out


def matched_turn_rewards(turn_calls: list[list[dict]], gold: list[dict], mode: str = "hard", penalty: float = 0.0,
                         reg: float = 0.1) -> list[float]:
    """Per-turn rewards of one trajectory: its calls (grouped by turn) matched jointly against the gold trace, each
    turn the mean of its calls' rewards (0 for a turn without calls)."""
    flat = [c for calls in turn_calls for c in calls]
    scores = match_calls(flat, gold, mode, penalty, reg)
    out, at = [], 0
    for calls in turn_calls:
        part = scores[at:at + len(calls)]
        at += len(calls)
        out.append(sum(part) / len(part) if part else 0.0)
    return out


# --------------------------------------------------------------------------- dual-level advantage
def _zscore(values: Tensor, ids: Tensor, eps: float) -> Tensor:
    dev = ops.group_centered(values, ids)
    den = ops.group_std(values, ids) + eps
    return dev / torch.where(den > 0, den, torch.ones_like(den))  # a zero std means zero deviations


@ADVANTAGES.register("matchtir", paper="MatchTIR: Fine-Grained Supervision for Tool-Integrated Reasoning via "
                     "Bipartite Matching", arxiv="2601.10712")
@dataclass(frozen=True)
class MatchTIRAdvantage:
    """(A^traj_i + A^turn_{i,k}) / 2: trajectory z-score plus z-score of the discounted turn return among the group's
    turns of the same index (arXiv:2601.10712).

    Args:
        discount: lambda of the turn returns (paper: 0.9). traj_weight: the weight of A^traj (paper: 1/2; the turn
            part gets 1 - traj_weight). eps: added to the stds.
    """

    discount: float = hp(0.9, ge=0, le=1)
    traj_weight: float = hp(0.5, ge=0, le=1)
    eps: float = hp(1e-6, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def components(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """(A^traj (B,), A^turn (B, M)) in float64."""
        R = outcome_returns(batch).double()
        n, rewards = turn_layout(batch, R)
        a_traj = _zscore(R, batch.group_ids, self.eps)
        B, M = rewards.shape
        G = discounted_turn_returns(rewards, n, self.discount)
        live = played(n, M)
        turn_index = torch.arange(M, device=G.device)[None, :].expand(B, M)
        keys = torch.stack([batch.group_ids[:, None].expand(B, M)[live].long(), turn_index[live]])
        a_turn = torch.zeros_like(G)
        if keys.shape[1]:
            _, sets = torch.unique(keys, dim=1, return_inverse=True)
            a_turn[live] = _zscore(G[live], sets, self.eps)
        return a_traj, a_turn

    def __call__(self, batch: RolloutBatch) -> Tensor:
        a_traj, a_turn = self.components(batch)
        return turns_to_tokens(self.traj_weight * a_traj[:, None] + (1 - self.traj_weight) * a_turn, batch)


# Released config (card): lambda = 0.9, equal weights, PPO clip 0.2 with verl's token-mean aggregation. The KL
# setting was not recovered: none here.
PRESETS: dict[str, Any] = {
    "matchtir": {
        "advantage": {"name": "matchtir", "discount": 0.9},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
