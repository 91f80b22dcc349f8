"""The turn structure of a multi-turn batch, for turn-level credit methods (GiGPO, MatchTIR, IGPO, G-RA, ...).

``rollout.mode: episodes`` (:mod:`lmpo.rollout.episodes`) gives one row per episode with ``turn_ids`` (B, T) (policy
turn t and the observation answering it carry t) and the extras ``turn_rewards`` (B, M), ``num_turns`` (B,) and
``turn_observation_keys`` (B, M), M = ``max_turns``. These helpers read them and fall back, for batches without
them (single-turn text, hand-made batches), to "one turn per row whose reward is the outcome":

- :func:`token_turns` (B, T): the turn index of every token (0 without ``turn_ids``);
- :func:`turn_layout`: (number of turns (B,), per-turn rewards (B, M));
- :func:`discounted_turn_returns`: G_{i,t} = sum_{k >= t} gamma^{k - t} r_{i,k} over each row's played turns;
- :func:`turns_to_tokens`: per-turn values (B, M) broadcast to the tokens of each turn (0 off the mask).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError


def token_turns(batch: RolloutBatch) -> Tensor:
    """(B, T) long turn index of every token: ``turn_ids``, or 0 everywhere when the batch has none."""
    if batch.turn_ids is None:
        return torch.zeros_like(batch.response_ids, dtype=torch.long)
    return batch.turn_ids.long()


def turn_layout(batch: RolloutBatch, outcome: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(num_turns (B,) long, turn_rewards (B, M) float64) of a batch.

    With ``extras["turn_rewards"]`` (the episodes rollout) those are the per-turn rewards and ``extras["num_turns"]``
    the turns played (else one more than the largest turn id on a trained token). Without them every row has
    ``max turn id + 1`` turns and its whole ``outcome`` (default: ``batch.rewards``) is the reward of its last turn
    (the sparse-reward case).
    """
    mask = batch.response_mask
    turns = token_turns(batch)
    seen = (torch.where(mask, turns, torch.zeros_like(turns)).amax(-1) + 1) if turns.numel() else \
        torch.ones(mask.shape[0], dtype=torch.long, device=mask.device)
    rewards = batch.extras.get("turn_rewards")
    if rewards is not None:
        if rewards.dim() != 2:
            raise DataError(f"extras['turn_rewards'] must be (B, max_turns), got shape {tuple(rewards.shape)}.")
        counts = batch.extras.get("num_turns")
        n = counts.long().to(mask.device) if counts is not None else seen
        if bool((n > rewards.shape[1]).any()) or bool((seen > rewards.shape[1]).any()):
            raise DataError(f"a row has more turns ({int(torch.maximum(n, seen).max())}) than extras['turn_rewards'] "
                            f"has columns ({rewards.shape[1]}).")
        return n, rewards.double().to(mask.device)
    r = (batch.rewards if outcome is None else outcome).double()
    M = int(seen.max()) if seen.numel() else 1
    out = torch.zeros(mask.shape[0], M, dtype=torch.float64, device=mask.device)
    out.scatter_(1, (seen - 1)[:, None], r[:, None])
    return seen, out


def played(num_turns: Tensor, M: int) -> Tensor:
    """(B, M) bool: turn t of row i was played (t < num_turns[i])."""
    return torch.arange(M, device=num_turns.device)[None, :] < num_turns[:, None]


def discounted_turn_returns(turn_rewards: Tensor, num_turns: Tensor, gamma: float) -> Tensor:
    """G_{i,t} = sum_{k=t}^{n_i - 1} gamma^{k - t} r_{i,k} (B, M); 0 on turns not played."""
    live = played(num_turns, turn_rewards.shape[1])
    r = torch.where(live, turn_rewards, torch.zeros_like(turn_rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(live, out, torch.zeros_like(out))


def turns_to_tokens(values: Tensor, batch: RolloutBatch) -> Tensor:
    """Per-turn values (B, M) on the tokens of each turn (B, T) float32, 0 off ``response_mask``."""
    turns = token_turns(batch).clamp(0, values.shape[1] - 1)
    return ops.zero_outside(values.gather(1, turns).to(torch.float32), batch.response_mask)


def turn_token_counts(batch: RolloutBatch, M: int) -> Tensor:
    """(B, M) number of trained tokens in each turn."""
    turns = token_turns(batch).clamp(0, M - 1)
    counts = torch.zeros(turns.shape[0], M, dtype=torch.float64, device=turns.device)
    return counts.scatter_add(1, turns, batch.response_mask.double())
