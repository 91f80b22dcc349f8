"""online_pref: a registered preference loss on pairs ranked by the rollouts' rewards, written back onto tokens so that
``seq_mean_token_mean`` gives the weighted mean of the per-pair losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.online_pref import OnlinePreference, build_pairs
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.registry import PREFERENCE_LOSSES
from factories import from_config, make_batch, permute, random_full_batch, random_groups, random_mask

F64 = torch.float64


def batch(rewards, groups, mask, ref, old=None):
    b = make_batch(rewards, groups, mask, advantages=torch.zeros(mask.shape), old_logprobs=old, dtype=F64)
    return b.replace(ref_logprobs=ref)


def agg_loss(loss_fn, lp, b):
    agg = SeqMeanTokenMean()
    return agg(loss_fn(lp, b).per_token, b.response_mask, agg.normaliser(b.response_mask, 0))


def test_hand_case_one_pair_and_a_tie():
    # Group 0: rewards [1, 0, 0.5] -> best_worst pair (row 0 chosen, row 1 rejected); row 2 is unpaired.
    # Group 1: rewards [1, 1] -> a tie: skipped and counted.
    # log pi - log pi_ref summed: row 0 = +1, row 1 = -1 (spread over its 2 tokens), beta = 0.5:
    #   h = 0.5 * (1 - (-1)) = 1, loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262.
    # The step loss is the mean over the single pair; d loss / d logp = -beta sigmoid(-h) = -0.5 * 0.268941 on every
    # token of row 0 and +0.134471 on row 1; 0 elsewhere.
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.bool)
    ref = -torch.rand(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * mask
    delta = torch.tensor([[0.25, 0.75], [-0.5, -0.5], [0.3, 0.0], [0.2, 0.1], [0.4, 0.0]], dtype=F64)
    b = batch([1.0, 0.0, 0.5, 1.0, 1.0], [0, 0, 0, 1, 1], mask, ref)
    lp = (ref + delta).requires_grad_(True)
    fn = from_config(OnlinePreference, preference={"name": "dpo", "beta": 0.5})
    out = fn(lp, b)
    assert out.metrics["loss/pairs"] == 1 and out.metrics["loss/pair_ties"] == 1
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.5)
    loss = agg_loss(fn, lp, b)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    loss.backward()
    g = 0.5 / (1 + math.e)  # beta * sigmoid(-1)
    expect = torch.tensor([[-g, -g], [g, g], [0, 0], [0, 0], [0, 0]], dtype=F64)
    assert_close(lp.grad, expect)


def dpo(h):
    return math.log1p(math.exp(-h))


def slow_reference(rewards, groups, member, lp, ref, mask, beta, mode):
    """Loops: list the pairs of each group, weigh them, mean of -log sigmoid(beta * margin)."""
    seq = [(float(((lp[i] - ref[i]) * mask[i]).sum())) for i in range(len(rewards))]
    terms = []
    for gid in sorted(set(groups)):
        rows = [i for i in range(len(rewards)) if groups[i] == gid and member[i]]
        if mode == "all":
            terms += [(1.0, seq[i] - seq[j]) for i in rows for j in rows if rewards[i] > rewards[j]]
        elif rows:
            hi, lo = max(rewards[i] for i in rows), min(rewards[i] for i in rows)
            top = [i for i in rows if rewards[i] == hi]
            bot = [j for j in rows if rewards[j] == lo]
            if hi > lo:
                terms += [(1.0 / (len(top) * len(bot)), seq[i] - seq[j]) for i in top for j in bot]
    if not terms:
        return 0.0
    return sum(w * dpo(beta * d) for w, d in terms) / sum(w for w, _ in terms)


@pytest.mark.parametrize("mode", ["best_worst", "all"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_a_loop_reference(mode, seed):
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g)
    B = groups.numel()
    mask = random_mask(g, B, 4)
    mask[0] = False  # an empty response: never paired (a counted skip, not a NaN)
    rewards = torch.randint(0, 3, (B,), generator=g).to(F64)  # many ties
    ref = -torch.rand(B, 4, generator=g, dtype=F64) * mask
    lp = (ref + 0.5 * torch.randn(B, 4, generator=g, dtype=F64)).requires_grad_(True)
    b = batch(rewards, groups, mask, ref)
    fn = from_config(OnlinePreference, preference={"name": "dpo", "beta": 0.3}, pairs=mode)
    assert fn(lp, b).metrics["loss/unpaired_empty"] == 1
    expect = slow_reference(rewards.tolist(), groups.tolist(), mask.any(-1).tolist(), lp.detach(), ref, mask, 0.3, mode)
    loss = agg_loss(fn, lp, b)
    assert loss.item() == pytest.approx(expect, rel=1e-9, abs=1e-12)
    loss.backward()
    assert torch.isfinite(lp.grad).all() and torch.all(lp.grad[~mask] == 0)


def test_gradient_against_gradcheck():
    g = torch.Generator().manual_seed(3)
    mask = random_mask(g, 6, 3)
    ref = -torch.rand(6, 3, generator=g, dtype=F64) * mask
    b = batch([2.0, 0.0, 1.0, 1.0, 0.5, 0.0], [0, 0, 0, 1, 1, 1], mask, ref)
    fn = from_config(OnlinePreference, preference={"name": "dpo", "beta": 0.2}, pairs="all")
    lp = (ref + 0.3 * torch.randn(6, 3, generator=g, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: agg_loss(fn, x * mask, b), (lp,))


def test_reward_offset_per_group_changes_nothing():
    g = torch.Generator().manual_seed(4)
    mask = random_mask(g, 6, 3)
    ref = -torch.rand(6, 3, generator=g, dtype=F64) * mask
    lp = ref + 0.3 * torch.randn(6, 3, generator=g, dtype=F64)
    r = torch.tensor([2.0, 0.0, 1.0, 1.0, 0.5, 0.0], dtype=F64)
    fn = from_config(OnlinePreference, pairs="all")
    a = fn(lp, batch(r, [0, 0, 0, 1, 1, 1], mask, ref)).per_token
    shifted = r + torch.tensor([5.0] * 3 + [-7.0] * 3, dtype=F64)
    assert_close(fn(lp, batch(shifted, [0, 0, 0, 1, 1, 1], mask, ref)).per_token, a)


def test_min_gap_turns_small_gaps_into_ties():
    p = build_pairs(torch.tensor([1.0, 0.95, 0.0]), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool),
                    "all", 0.1)
    assert sorted(zip(p.chosen.tolist(), p.rejected.tolist())) == [(0, 2), (1, 2)] and p.ties == 1


def test_no_pair_gives_zero_loss_and_gradient():
    mask = torch.ones(4, 2, dtype=torch.bool)
    ref = torch.full((4, 2), -1.0, dtype=F64)
    lp = torch.full((4, 2), -0.5, dtype=F64, requires_grad=True)
    b = batch([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], mask, ref)  # every group tied
    out = from_config(OnlinePreference)(lp, b)
    assert out.metrics["loss/pairs"] == 0 and out.metrics["loss/pair_ties"] == 2
    out.per_token.sum().backward()
    assert torch.all(out.per_token == 0) and torch.all(lp.grad == 0)


def test_mixed_with_an_rl_loss_adds_its_tokens():
    g = torch.Generator().manual_seed(5)
    mask = random_mask(g, 4, 3)
    ref = -torch.rand(4, 3, generator=g, dtype=F64) * mask
    old = -torch.rand(4, 3, generator=g, dtype=F64) * mask
    b = batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], mask, ref, old).replace(
        advantages=torch.randn(4, 3, generator=g, dtype=F64) * mask)
    lp = old + 0.1 * torch.randn(4, 3, generator=g, dtype=F64)
    pure = from_config(OnlinePreference)(lp, b).per_token
    mixed = from_config(OnlinePreference, rl={"name": "ppo_clip", "epsilon": 0.2}, rl_weight=0.5)
    assert mixed.needs == {"ref_logprobs", "old_logprobs"}
    assert_close(mixed(lp, b).per_token, pure + 0.5 * PPOClipLoss(epsilon=0.2)(lp, b).per_token)


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError, match='Did you mean "dpo"'):
        from_config(OnlinePreference, preference={"name": "dpoo"})
    with pytest.raises(ConfigError, match="loss.preference needs a name"):
        from_config(OnlinePreference, preference={"beta": 0.1})
    with pytest.raises(ConfigError, match="loss.pairs"):
        from_config(OnlinePreference, pairs="best")
    with pytest.raises(ConfigError, match="loss.rl.epsilonn"):
        from_config(OnlinePreference, rl={"name": "ppo_clip", "epsilonn": 0.2})


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
def test_every_registered_preference_loss_runs_on_online_pairs(name):
    # whatever joins PREFERENCE_LOSSES: finite loss and gradient, none on padding, no gradient into the reference,
    # and the same total loss whatever the row order (pairs are a set)
    b = random_full_batch(seed=11)
    ref = b.ref_logprobs.clone().requires_grad_(True)
    b = b.replace(ref_logprobs=ref)
    spec = {"name": name}
    if "mismatched_logprobs" in PREFERENCE_LOSSES.build(name).needs:  # KTO's default z_0: refused, with the way out
        with pytest.raises(ConfigError, match="reference_point=batch"):
            from_config(OnlinePreference, preference=spec, pairs="all")
        spec["reference_point"] = "batch"
    fn = from_config(OnlinePreference, preference=spec, pairs="all")
    lp = (b.old_logprobs + 0.1 * b.response_mask).requires_grad_(True)
    out = fn(lp, b)
    out.per_token.sum().backward()
    assert torch.isfinite(out.per_token).all() and torch.isfinite(lp.grad).all()
    assert torch.all(lp.grad[~b.response_mask] == 0) and (ref.grad is None or torch.all(ref.grad == 0))
    pb, perm = permute(b)
    assert_close(fn(lp.detach()[perm], pb).per_token.sum(), out.per_token.detach().sum())
