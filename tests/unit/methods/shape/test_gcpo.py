"""GCPO / GeometryZero (arXiv:2506.07160, reconstructed): group-contrastive masked construction and length rewards."""

from __future__ import annotations

import random
import re

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.shape.gcpo import GroupContrastiveShaper
from factories import from_config, make_batch, random_groups

AUX = "<aux>draw AD</aux> so x=3"
PLAIN = "x=3"


def batch(acc, aux, groups=None, lengths=None, T=4, dtype=torch.float32):
    b = make_batch(acc, groups, lengths, T=T, dtype=dtype)
    return b.replace(meta=[{"prompt": "p", "completion": AUX if a else PLAIN} for a in aux])


NO_LEN = dict(length_weight=0.0)


def test_hand_card_examples():
    # (aux, correct) = (1,1),(1,1),(0,0),(0,1): a_aux = 1, a_no = 0.5 -> 0.5 > 0.1 -> M = +1 -> aux rows + 1
    sh = GroupContrastiveShaper(**NO_LEN)
    out = sh(batch([1.0, 1, 0, 1], [1, 1, 0, 0]))
    assert_close(out.rewards, torch.tensor([2.0, 2, 0, 1]))
    # (1,0),(1,0),(0,1),(0,1): a_aux = 0, a_no = 1 -> M = -1 -> aux rows - 1
    out = sh(batch([0.0, 0, 1, 1], [1, 1, 0, 0]))
    assert_close(out.rewards, torch.tensor([-1.0, -1, 1, 1]))
    # (1,1),(0,1): a_aux = a_no = 1 -> M = 0 -> unchanged (GRPO)
    out = sh(batch([1.0, 1], [1, 0]))
    assert_close(out.rewards, torch.tensor([1.0, 1]))


def test_hand_margin_groups_and_empty_subsets():
    # group 0: a_aux = 0.5, a_no = 0.45 (diff 0.05 <= eps) -> 0; group 1: every rollout constructs -> S_no empty -> 0;
    # group 2: a_aux = 0.6, a_no = 0.4 -> +1 on its aux row
    acc = [1.0, 0, 0.45, 1, 1, 0.6, 0.4]
    aux = [1, 1, 0, 1, 1, 1, 0]
    out = GroupContrastiveShaper(**NO_LEN)(batch(acc, aux, [0, 0, 0, 1, 1, 2, 2]))
    assert_close(out.rewards, torch.tensor([1.0, 0, 0.45, 1, 1, 1.6, 0.4]))


def test_hand_length_reward_and_components():
    # accuracy from component 0 ([1, 0]); rewards (task total) [1.5, 0.5]; L = 4, lengths [2, 4]:
    # R_len = 0.1 * min(L_i / 4, 1) on correct rows only -> [0.05, 0]; no construction -> M R_aux = 0
    b = batch([1.5, 0.5], [0, 0], lengths=[2, 4]).replace(reward_components=torch.tensor([[1.0, 0.5], [0.0, 0.5]]))
    out = GroupContrastiveShaper(horizon=4)(b)
    assert_close(out.rewards, torch.tensor([1.55, 0.5]))


def test_no_text_means_no_construction_reward():
    b = make_batch([1.0, 0.0], None, T=2)
    assert_close(GroupContrastiveShaper(**NO_LEN)(b).rewards, b.rewards)


def test_bad_config():
    with pytest.raises(ConfigError, match="eps"):
        from_config(GroupContrastiveShaper, eps=-1)
    with pytest.raises(ConfigError, match="aux_pattern"):
        from_config(GroupContrastiveShaper, aux_pattern="(")
    with pytest.raises(ConfigError, match="horizon"):
        GroupContrastiveShaper()(batch([1.0], [0]))
    with pytest.raises(ConfigError, match="accuracy_index"):
        b = batch([1.0], [0]).replace(reward_components=torch.ones(1, 2))
        GroupContrastiveShaper(accuracy_index=3, **NO_LEN)(b)


# --------------------------------------------------------------------------- loop reference
def loop_gcpo(R, groups, texts, lengths, eps=0.1, w=1.0, lw=0.1, L=6):
    B = len(R)
    aux = [1.0 if re.search(r"<aux>.*?</aux>", t, re.DOTALL) else 0.0 for t in texts]
    out = []
    for i in range(B):
        mem = [j for j in range(B) if groups[j] == groups[i]]
        ya = [R[j] for j in mem if aux[j]]
        no = [R[j] for j in mem if not aux[j]]
        m = 0.0
        if ya and no:
            d = sum(ya) / len(ya) - sum(no) / len(no)
            m = 1.0 if d > eps else (-1.0 if d < -eps else 0.0)
        r = R[i] + w * m * aux[i]
        if R[i] > 0.5:
            r += lw * min(lengths[i] / L, 1.0)
        out.append(r)
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(8))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    ids = random_groups(g, max_size=6)
    B = ids.numel()
    R = torch.randint(0, 2, (B,), generator=g).float()
    lengths = torch.randint(1, 7, (B,), generator=g)
    rng = random.Random(seed)
    texts = [rng.choice([AUX, PLAIN, "<aux>\nline</aux>", "<aux> unclosed"]) for _ in range(B)]
    b = make_batch(R, ids, lengths, T=6).replace(meta=[{"completion": t} for t in texts])
    out = GroupContrastiveShaper(horizon=6)(b)
    assert_close(out.rewards, loop_gcpo(R.tolist(), ids.tolist(), texts, lengths.tolist()))
    assert torch.equal(out.response_mask, b.response_mask)


# --------------------------------------------------------------------------- gradient
def test_jacobian_is_identity_away_from_thresholds():
    # the mask M and the correctness gate are piecewise constant in the rewards, so dR'/dR = I there
    # (accuracy read from the components, the task reward passes through)
    R = torch.tensor([0.9, 0.2, 0.7, 0.1], dtype=torch.float64)
    comps = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64)

    def f(r):
        b = batch(r, [1, 1, 0, 0], [0, 0, 1, 0], dtype=torch.float64).replace(reward_components=comps)
        return GroupContrastiveShaper(horizon=4)(b).rewards

    assert_close(torch.autograd.functional.jacobian(f, R), torch.eye(4, dtype=torch.float64))
