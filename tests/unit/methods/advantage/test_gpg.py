"""GPG (arXiv:2504.02546): A_i = alpha (R_i - mean_g R) / F_norm, alpha = B / (B - M) (accurate gradient estimation)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.gpg import GPGAdvantage
from factories import from_config, make_batch, random_batch


def test_hand():
    # R = [1, 0, 1, 1, 0.5], groups [0, 0, 1, 1, 2], T = 1, B = 5
    #   centred: [0.5, -0.5, 0, 0, 0 (singleton)]; informative rows: group 0 only -> B - M = 2, alpha = 5/2
    #   A = [1.25, -1.25, 0, 0, 0]
    #   verl's alpha: rows with a nonzero reward = 4 -> 5/4: A = [0.625, -0.625, 0, 0, 0.5 * 5/4 (raw singleton)]
    b = make_batch([1.0, 0.0, 1.0, 1.0, 0.5], [0, 0, 1, 1, 2], T=1)
    assert_close(GPGAdvantage()(b)[:, 0], torch.tensor([1.25, -1.25, 0.0, 0.0, 0.0]))
    verl = GPGAdvantage(alpha="nonzero_reward", singleton="raw")(b)[:, 0]
    assert_close(verl, torch.tensor([0.625, -0.625, 0.0, 0.0, 0.625]))
    assert_close(GPGAdvantage(alpha="none", f_norm=2.0)(b)[:, 0], torch.tensor([0.25, -0.25, 0.0, 0.0, 0.0]))


def test_card_property_batch_mean_over_informative_rows():
    # AGE: the batch mean of |A| equals the mean of |R - mean| over the informative rows only (alpha undoes the
    # dilution by zero-advantage groups), whatever the number of all-equal groups added.
    base = make_batch([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1], T=1)
    ref = GPGAdvantage()(base).abs().mean()
    for extra in (1, 3, 6):
        r = [1.0, 0.0, 0.0, 1.0] + [1.0] * (2 * extra)
        g = [0, 0, 1, 1] + [2 + i // 2 for i in range(2 * extra)]
        assert_close(GPGAdvantage()(make_batch(r, g, T=1)).abs().mean(), ref)


def loop_gpg(b, alpha_mode):
    R = b.rewards.tolist()
    g = b.group_ids.tolist()
    B = len(R)
    members = {k: [R[j] for j in range(B) if g[j] == k] for k in set(g)}
    mean = {k: sum(v) / len(v) for k, v in members.items()}
    spread = {k: max(v) > min(v) for k, v in members.items()}
    if alpha_mode == "valid":
        alpha = B / max(sum(1 for i in range(B) if spread[g[i]]), 1)
    else:
        alpha = B / max(sum(1 for x in R if x != 0), 1)
    return [alpha * (R[i] - mean[g[i]]) for i in range(B)]


@pytest.mark.parametrize("alpha", ["valid", "nonzero_reward"])
def test_matches_loop_reference(alpha):
    for seed in range(8):
        b = random_batch(seed, discrete_rewards=seed % 2 == 0)
        adv = GPGAdvantage(alpha=alpha)(b)
        exp = torch.tensor(loop_gpg(b, alpha))[:, None].expand_as(adv) * b.response_mask
        assert_close(adv, exp.float())


def test_config_errors():
    with pytest.raises(ConfigError, match="advantage.alpha"):
        from_config(GPGAdvantage, alpha="paper")
    with pytest.raises(ConfigError, match="advantage.f_norm"):
        from_config(GPGAdvantage, f_norm=0)
