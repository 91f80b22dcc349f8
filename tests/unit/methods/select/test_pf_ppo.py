"""PF-PPO (arXiv:2409.06957): best-worst / best-random / best-of-N policy filtration per prompt group, and R^2.

A selector returns a boolean mask, so there is no gradient to check; the filtered batch then goes through the usual
advantage and loss (covered by their own tests).
"""

from __future__ import annotations

import pytest
import torch

from lmpo.errors import ConfigError
from lmpo.methods.select.pf_ppo import PolicyFiltration, r_squared
from factories import from_config, make_batch, random_groups


def batch(R, groups=None, seed=0):
    b = make_batch(R, groups, T=3)
    ids = torch.randint(0, 50, (b.batch_size, 3), generator=torch.Generator().manual_seed(seed))
    return b.replace(response_ids=ids)


def test_hand_card_example():
    # rewards [0.1, 0.9, 0.5, 0.3]: best = 1 (0.9), worst = 0 (0.1)
    b = batch([0.1, 0.9, 0.5, 0.3])
    assert PolicyFiltration("best_worst")(b).tolist() == [True, True, False, False]
    assert PolicyFiltration("best_of_n")(b).tolist() == [False, True, False, False]
    keep = PolicyFiltration("best_random")(b)
    assert keep[1] and int(keep.sum()) == 2 and int(keep[[0, 2, 3]].sum()) == 1


def test_hand_groups_and_singletons():
    # group 5: [1, 0, 0.5] -> keep rows 0 (best) and 1 (worst); group 2: singleton -> kept (best = worst)
    b = batch([1.0, 0.0, 0.5, 0.7], [5, 5, 5, 2])
    assert PolicyFiltration()(b).tolist() == [True, True, False, True]


def test_hand_r_squared():
    # exact affine relation s = 2 r + 1 -> R^2 = 1; s = (1, 0, 1, 0) vs r = (0, 1, 2, 3): slope -0.2 on centred
    # r = (-1.5, -0.5, 0.5, 1.5), s - 0.5 = (0.5, -0.5, 0.5, -0.5): SS_tot = 1,
    # fitted -0.2 r_c = (0.3, 0.1, -0.1, -0.3),
    # residuals (0.2, -0.6, 0.6, -0.2): SS_res = 0.8 -> R^2 = 0.2
    r = torch.tensor([0.0, 1, 2, 3])
    assert r_squared(r, 2 * r + 1).item() == pytest.approx(1.0)
    assert r_squared(r, torch.tensor([1.0, 0, 1, 0])).item() == pytest.approx(0.2)


def test_property_best_always_kept_counts_and_equal_rewards():
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        ids = random_groups(g)
        R = torch.randint(0, 3, (ids.numel(),), generator=g).float()  # many ties
        b = batch(R, ids, seed)
        for strat, per_group in (("best_worst", 2), ("best_random", 2), ("best_of_n", 1)):
            keep = PolicyFiltration(strat)(b)
            for gid in ids.unique():
                rows = ids == gid
                n = int(rows.sum())
                assert int(keep[rows].sum()) == min(per_group, n)
                assert R[rows][keep[rows]].max() == R[rows].max()
                if strat == "best_worst":
                    assert R[rows][keep[rows]].min() == R[rows].min()
            perm = torch.randperm(b.batch_size, generator=g)
            assert torch.equal(PolicyFiltration(strat)(b.select(perm)), keep[perm])


def test_bad_strategy():
    with pytest.raises(ConfigError, match="strategy"):
        from_config(PolicyFiltration, strategy="best_median")


# --------------------------------------------------------------------------- loop reference (distinct rewards)
@pytest.mark.parametrize("seed", range(8))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    ids = random_groups(g)
    R = torch.randperm(ids.numel(), generator=g).float() / 10  # distinct rewards: no tie-breaking involved
    b = batch(R, ids, seed)
    Rl, gl = R.tolist(), ids.tolist()
    exp_bw, exp_bon = [], []
    for i in range(len(Rl)):
        mem = [Rl[j] for j in range(len(Rl)) if gl[j] == gl[i]]
        exp_bw.append(Rl[i] == max(mem) or Rl[i] == min(mem))
        exp_bon.append(Rl[i] == max(mem))
    assert PolicyFiltration("best_worst")(b).tolist() == exp_bw
    assert PolicyFiltration("best_of_n")(b).tolist() == exp_bon
