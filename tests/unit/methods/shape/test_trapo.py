"""TraPO (arXiv:2512.13106): majority-vote pseudo-rewards and trajectory-similarity selection of unlabeled prompts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.shape.trapo import TraPO, majority, reliability, select, znorm
from factories import from_config, make_batch


def batch_of(rewards, group_ids, completions, rows):
    b = make_batch(rewards, group_ids, T=2)
    return b.replace(meta=[{"completion": c, "row": r} for c, r in zip(completions, rows)])


# --------------------------------------------------------------------------- hand cases (the card's)
def test_hand_card_similarity_and_selection():
    # DB = {[0.2, 0.4, 0.6, 0.8]}: z = [-1.342, -0.447, 0.447, 1.342]. A = [0.1, 0.3, 0.5, 0.7] has the same z ->
    # cos = 1; B = [0.8, 0.6, 0.4, 0.2] has z_B = -z -> cos = -1.
    s = reliability([[0.2, 0.4, 0.6, 0.8]], [[0.1, 0.3, 0.5, 0.7], [0.8, 0.6, 0.4, 0.2]])
    assert_close(s, torch.tensor([1.0, -1.0], dtype=torch.float64))
    # N_u = 2, ratio 0.1 -> k = max(1, floor(0.2)) = 1 picks A; B (s = -1 < 0.4) is rejected
    assert select(s, 0.1, 0.4).tolist() == [True, False]


def test_hand_majority_tie_gives_no_label():
    assert majority(["3"] * 4 + ["5"] * 4) is None                      # 2 answers x 4 votes
    assert majority(["3", "3", "5", None, None, None]) == "3"           # no-answer rows never vote
    assert majority([None, None]) is None


def test_hand_truncation_to_shortest():
    # labeled [0, 1, 0, 5] truncated to length 3 -> [0, 1, 0]; unlabeled [2, 4, 2]: same shape -> cos = 1
    assert_close(reliability([[0, 1, 0, 5]], [[2, 4, 2]]), torch.tensor([1.0], dtype=torch.float64))


def test_hand_pseudo_rewards_and_masking():
    # group 0 labeled (task rewards kept); group 1 unlabeled: answers 7, 7, 3, none -> maj 7 -> R = [1, 1, 0, 0]
    lab = {"prompt": "a", "labeled": True}
    unl = {"prompt": "b", "labeled": False}
    b = batch_of([1, 0, 1, 0, 0, 0, 0, 0], [0] * 4 + [1] * 4, ["x", "y", "z", "w", "so 7", "7", "3", "none"],
                 [lab] * 4 + [unl] * 4)
    out = TraPO(warmup=0)(b)
    assert out.rewards.tolist() == [1, 0, 1, 0, 1, 1, 0, 0]
    # the unlabeled group's trajectory is one point; it is the only candidate, so top-k (k = 1) selects it
    assert out.response_mask.all()
    # with warm-up 8 it is not trained yet: its rows leave the loss, the labeled rows stay
    out = TraPO(warmup=8)(b)
    assert out.response_mask[:4].all() and not out.response_mask[4:].any()


# --------------------------------------------------------------------------- properties
def test_selection_follows_trajectory_shape_and_resumes():
    sh = TraPO(warmup=3, topk_ratio=0.1, threshold=0.4)
    sh.load_state_dict({"history": {"l": [0.1, 0.5, 0.9], "u_up": [0.0, 0.2, 0.3], "u_down": [0.9, 0.5, 0.1],
                                    "u_flat_down": [0.6, 0.6, 0.2], "u_new": [0.5]},
                        "labeled": {"l": True, "u_up": False, "u_down": False, "u_flat_down": False, "u_new": False}})
    assert sh.trusted() == {"u_up"}  # rising like the labeled prompt; u_new is still in warm-up
    fresh = TraPO(warmup=3)
    fresh.load_state_dict(sh.state_dict())
    assert fresh.trusted() == sh.trusted()


def test_all_labeled_is_plain_reward():
    rows = [{"prompt": "a", "labeled": True}] * 3
    b = batch_of([0.5, 1, 0], [0, 0, 0], ["1", "2", "3"], rows)
    out = TraPO()(b)
    assert torch.equal(out.rewards, b.rewards) and torch.equal(out.response_mask, b.response_mask)


def test_config_errors():
    for kw, key in (({"warmup": -1}, "warmup"), ({"topk_ratio": 0}, "topk_ratio"),
                    ({"unlabeled_fraction": 2}, "unlabeled_fraction")):
        with pytest.raises(ConfigError, match=key):
            from_config(TraPO, **kw)


# --------------------------------------------------------------------------- slow reference
@pytest.mark.parametrize("seed", range(4))
def test_reliability_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    db = [torch.rand(int(torch.randint(3, 7, (1,), generator=g)), generator=g).tolist() for _ in range(3)]
    unl = [torch.rand(int(torch.randint(3, 7, (1,), generator=g)), generator=g).tolist() for _ in range(4)]
    n = min(len(h) for h in db + unl)

    def z(h):
        h = h[:n]
        m = sum(h) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in h) / n)
        return [(x - m) / (sd + 1e-8) for x in h]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    ref = [sum(cos(z(l), z(u)) for l in db) / len(db) for u in unl]
    assert_close(reliability(db, unl), torch.tensor(ref, dtype=torch.float64))


def test_gradient_of_znorm_is_scale_and_shift_free():
    # z is invariant to p -> a p + b (a > 0), so its Jacobian annihilates the directions 1 and p (float64 gradcheck
    # checks the rest of the Jacobian against finite differences).
    p = torch.tensor([0.2, 0.5, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(znorm, (p,))
    jac = torch.autograd.functional.jacobian(znorm, p.detach())
    assert_close(jac @ torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), atol=1e-7, rtol=0)
    assert_close(jac @ p.detach(), torch.zeros(4, dtype=torch.float64), atol=1e-7, rtol=0)
