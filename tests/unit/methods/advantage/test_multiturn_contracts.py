"""The advantage contract (tests/contracts) on multi-turn tool episodes, for the advantages whose episode paths the
contract batches (single-turn, no tool data) do not reach: shape and masking, padding, row permutation, finiteness."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.registry import ADVANTAGES
from factories import permute, tool_episode_batch

NAMES = ["aspo", "adasearch", "r3l", "prorag", "epo_strategic"]


def random_episodes(seed: int, equal: bool = False):
    g = torch.Generator().manual_seed(seed)
    B = 12
    turns, calls, tr = [], [], []
    for _ in range(B):
        n = int(torch.randint(1, 4, (1,), generator=g))
        turns.append([(int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g)))
                      for _ in range(n)])
        calls.append((torch.rand(n, generator=g) > 0.5).float().tolist())
        tr.append(([0.0] * (n - 1)) + [float(torch.randint(0, 2, (1,), generator=g))])
    rewards = [1.0] * B if equal else [sum(r) for r in tr]
    b = tool_episode_batch(turns, rewards=rewards, group_ids=torch.arange(3).repeat_interleave(4),
                           turn_rewards=tr, turn_tool_calls=calls, max_turns=3)
    return b.replace(extras={**b.extras, "pivot_turn": torch.tensor([1.0 if i % 5 == 0 else -1.0 for i in range(B)])})


def pad(b, extra: int):
    f = {k: torch.nn.functional.pad(getattr(b, k), (0, extra))
         for k in ("response_ids", "response_mask", "response_attn", "sampler_logprobs", "turn_ids")}
    ex = {k: torch.nn.functional.pad(v, (0, extra)) if k == "policy_mask" else v for k, v in b.extras.items()}
    return b.replace(extras=ex, **f)


@pytest.mark.parametrize("name", NAMES)
def test_multiturn_advantage_contract(name):
    for seed in range(3):
        b = random_episodes(seed)
        fn = ADVANTAGES.build(name, where="advantage")
        adv = fn(b)
        assert adv.shape == b.response_ids.shape and adv.dtype == torch.float32
        assert torch.all(adv[~b.response_mask] == 0) and torch.isfinite(adv).all()
        assert adv.abs().sum() > 0
        padded = ADVANTAGES.build(name, where="advantage")(pad(b, 3))
        assert_close(padded[:, : adv.shape[1]], adv)
        assert torch.all(padded[:, adv.shape[1]:] == 0)
        pb, perm = permute(b, seed=seed + 1)
        assert_close(ADVANTAGES.build(name, where="advantage")(pb), adv[perm])
        same = ADVANTAGES.build(name, where="advantage")(random_episodes(seed, equal=True))
        assert torch.isfinite(same).all()
