"""CGPO's CRRAFT and CODPO (arXiv:2409.20370): hand-derived weights and pairs, the card's properties (violating
samples are never imitated / always rejected; CODPO with lambda = 0 is online DPO on those pairs), gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from factories import from_config, make_batch
from lmpo.errors import ConfigError
from lmpo.methods.advantage.cgpo import CRRAFTAdvantage, crraft_coefficients
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.cgpo_codpo import CODPO
from lmpo.methods.loss.online_pref import OnlinePreference, build_pairs
from lmpo.methods.presets import PRESETS

F64 = torch.float64
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


# ---- CRRAFT ---------------------------------------------------------------------------------------------------------

def test_crraft_weights_by_hand():
    # group 0: (0.8, 0, 0.5, 0.8): the two best tie -> 0.4 each; group 1: (0, 0): nothing positive -> no row;
    # group 2: (0.3, 0.9) -> row 5 keeps 0.9
    r = torch.tensor([0.8, 0.0, 0.5, 0.8, 0.0, 0.0, 0.3, 0.9])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    assert crraft_coefficients(r, g, None, None).tolist() == pytest.approx([0.4, 0, 0, 0.4, 0, 0, 0, 0.9])
    # KL budget 1 with KL of row 7 = 2 (over budget) and row 6 = 0.5: row 7 is gated to 0, so row 6 is the best
    kl = torch.tensor([0, 0, 0, 0, 0, 0, 0.5, 2.0])
    assert crraft_coefficients(r, g, kl, 1.0).tolist() == pytest.approx([0.4, 0, 0, 0.4, 0, 0, 0.3, 0])


def test_crraft_never_imitates_a_violating_sample():
    # the card's setting: RM (2, 0), baseline 0. Judges pass: the calibrated rewards (sig 2, sig 0) -> the first
    # row is imitated with weight 0.8808; the first judge flips to 0: its reward is 0, the second row (0.5) is picked
    w = crraft_coefficients(torch.tensor([sig(2.0), sig(0.0)]), torch.zeros(2, dtype=torch.long), None, None)
    assert w.tolist() == pytest.approx([0.8808, 0.0], abs=1e-4)
    w = crraft_coefficients(torch.tensor([0.0, sig(0.0)]), torch.zeros(2, dtype=torch.long), None, None)
    assert w.tolist() == pytest.approx([0.0, 0.5])


def test_crraft_advantage_kl_from_logprobs_and_permutation():
    b = make_batch([0.9, 0.6, 0.2, 0.7], [0, 0, 1, 1], [2, 1, 2, 2], T=2)
    b.old_logprobs = torch.tensor([[-0.1, -0.2], [-0.5, 0.0], [-1.0, -1.0], [-0.3, -0.3]])
    b.ref_logprobs = torch.tensor([[-0.6, -0.9], [-0.6, 0.0], [-1.2, -1.0], [-0.3, -0.4]])
    # KL sums: row 0 = 0.5 + 0.7 = 1.2 (> 1: gated), row 1 = 0.1, row 2 = 0.2, row 3 = 0.1
    adv = from_config(CRRAFTAdvantage, kl_max=1.0)(b)
    assert_close(adv, torch.tensor([[0.0, 0.0], [0.6, 0.0], [0.0, 0.0], [0.7, 0.7]]))
    assert "ref_logprobs" in from_config(CRRAFTAdvantage, kl_max=1.0).needs
    assert from_config(CRRAFTAdvantage).needs == frozenset()
    idx = torch.tensor([3, 1, 0, 2])
    assert_close(from_config(CRRAFTAdvantage, kl_max=1.0)(b.select(idx)), adv[idx])


def test_crraft_gradient_is_the_weighted_nll():
    # REINFORCE + token_mean on the crraft advantage: loss = -sum_best w * logp / n_tokens; d/dlogp = -w / n_tokens
    b = make_batch([0.5, 0.25], [0, 0], [2, 1], T=2)
    adv = from_config(CRRAFTAdvantage)(b)
    logp = torch.zeros(2, 2, requires_grad=True)
    (-(adv * logp).sum() / b.response_mask.sum()).backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5 / 3, -0.5 / 3, 0.0, 0.0])


# ---- CODPO ----------------------------------------------------------------------------------------------------------

def pairs_of(scores, groups, feasible, min_gap=0.0):
    p = build_pairs(torch.tensor(scores, dtype=F64), torch.tensor(groups), torch.ones(len(scores), dtype=torch.bool),
                    "constrained", min_gap, torch.tensor(feasible))
    return sorted(zip(p.chosen.tolist(), p.rejected.tolist(), p.weight.tolist())), p.ties


def test_constrained_pairs_by_hand():
    # group 0: a violating row with the highest RM score (2.0) is the rejected one, not the chosen one; chosen is the
    # best feasible (row 1); group 1: all feasible -> best (row 3) vs worst (row 5); group 2: no feasible -> nothing;
    # group 3: two violating rows tie for the worst -> weight 1/2 each
    scores = [2.0, 1.0, 0.5, 0.9, 0.4, 0.1, 0.7, 0.8, 0.6, 0.3, 0.3]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    feas = [False, True, True, True, True, True, False, False, True, False, False]
    pairs, ties = pairs_of(scores, groups, feas)
    assert pairs == [(1, 0, 1.0), (3, 5, 1.0), (8, 9, 0.5), (8, 10, 0.5)] and ties == 0
    # all feasible and equal -> a tie (counted, skipped); a lone feasible row -> nothing
    assert pairs_of([0.5, 0.5, 0.2], [0, 0, 1], [True, True, True]) == ([], 1)
    with pytest.raises(ConfigError, match="feasible"):
        build_pairs(torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.bool), "constrained")


def codpo(alpha, beta=0.5):
    return from_config(OnlinePreference, preference={"name": "dpo_nll", "beta": beta, "alpha": alpha},
                       pairs="constrained")


def one_group():
    # rewards (0.9, 0.0, 0.4): row 1 violates (cgpo_reward 0) -> pair (row 0 chosen, row 1 rejected)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    ref = torch.tensor([[-1.0, -2.0], [-1.5, -0.5], [-0.7, 0.0]], dtype=F64)
    delta = torch.tensor([[0.25, 0.75], [-0.5, -0.5], [0.3, 0.0]], dtype=F64)
    b = make_batch([0.9, 0.0, 0.4], [0, 0, 0], mask, advantages=torch.zeros(3, 2), dtype=F64)
    return b.replace(ref_logprobs=ref), (ref + delta).requires_grad_(True)


def agg(fn, lp, b):
    a = SeqMeanTokenMean()
    return a(fn(lp, b).per_token, b.response_mask, a.normaliser(b.response_mask, 0))


def test_codpo_loss_and_gradient_by_hand():
    # h = beta * ((+1) - (-1)) = 1 with beta 0.5; chosen log pi = (-0.75) + (-1.25) = -2 over 2 tokens
    # loss = -log sigmoid(1) + alpha * 2 / 2; d/dlogp chosen token = -beta sig(-1) - alpha / 2, rejected +beta sig(-1)
    b, lp = one_group()
    loss = agg(codpo(5.0), lp, b)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)) + 5.0 * 1.0)
    loss.backward()
    g = 0.5 * sig(-1.0)
    assert_close(lp.grad, torch.tensor([[-g - 2.5, -g - 2.5], [g, g], [0.0, 0.0]], dtype=F64))


def test_codpo_with_lambda_zero_is_online_dpo_on_constrained_pairs():
    b, lp = one_group()
    dpo = from_config(OnlinePreference, preference={"name": "dpo", "beta": 0.5}, pairs="constrained")
    assert agg(codpo(0.0), lp, b).item() == pytest.approx(agg(dpo, lp, b).item())
    # feasibility by a threshold: only row 0 (0.9) is above 0.5; the worst row below it (row 1, 0.2) is rejected
    fn = from_config(OnlinePreference, preference={"name": "dpo", "beta": 0.5}, pairs="constrained",
                     feasible_above=0.5)
    out = fn(lp, b.replace(rewards=torch.tensor([0.9, 0.2, 0.4], dtype=F64)))
    assert out.metrics["loss/pairs"] == 1 and out.metrics["rewards/rejected"].item() == pytest.approx(-0.5)


def test_codpo_loss_is_online_pref_with_the_cards_defaults():
    b, lp = one_group()
    fn = from_config(CODPO, preference={"name": "dpo_nll", "beta": 0.5, "alpha": 5.0})
    assert fn.pairs == "constrained" and fn.feasible_above == 0.0
    assert agg(fn, lp, b).item() == pytest.approx(agg(codpo(5.0), lp, b).item())
    assert from_config(CODPO).preference == {"name": "dpo_nll", "beta": 0.1, "alpha": 5.0}
    with pytest.raises(ConfigError, match="dpo_nl"):
        from_config(CODPO, preference={"name": "dpo_nl"})


def test_presets_are_the_cards_defaults():
    assert PRESETS["cgpo_codpo"]["loss"]["name"] == "codpo"
    assert PRESETS["cgpo_codpo"]["loss"]["preference"] == {"name": "dpo_nll", "beta": 0.1, "alpha": 5.0}
    assert PRESETS["cgpo_codpo"]["rollout"]["num_generations"] == 4
    assert PRESETS["cgpo_crraft"]["advantage"] == {"name": "crraft"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_pairs_against_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (12,), generator=g).double() / 4  # coarse: ties happen
    groups = torch.randint(0, 4, (12,), generator=g)
    feas = torch.rand(12, generator=g) < 0.6
    got, _ = pairs_of(scores.tolist(), groups.tolist(), feas.tolist(), min_gap=0.1)
    want = []
    for k in groups.unique().tolist():
        rows = [i for i in range(12) if groups[i] == k]
        ok = [i for i in rows if feas[i]]
        bad = [i for i in rows if not feas[i]]
        if not ok:
            continue
        best = [i for i in ok if scores[i] == max(scores[j] for j in ok)]
        pool = bad or rows
        worst = [i for i in pool if scores[i] == min(scores[j] for j in pool)]
        for c in best:
            for r in worst:
                if bad or scores[c] - scores[r] > 0.1:
                    want.append((c, r, 1.0 / (len(best) * len(worst))))
    want = sorted(want)
    assert [x[:2] for x in got] == [x[:2] for x in want] and want  # some pairs exist
    assert [x[2] for x in got] == pytest.approx([x[2] for x in want])
