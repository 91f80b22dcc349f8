"""Mini-batches are shuffled whole prompt groups: a group is never split across optimizer steps."""

import torch

from lmpo.train.step import minibatch_indices


def test_minibatches_keep_groups_whole_and_cover_every_row_once():
    torch.manual_seed(0)
    gids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    parts = minibatch_indices(gids, 2)
    assert len(parts) == 2
    rows = torch.cat(parts)
    assert sorted(rows.tolist()) == list(range(12))
    for p in parts:
        for g in gids[p].unique():
            assert (gids[p] == g).sum() == 3  # the whole group is in this mini-batch


def test_single_minibatch_is_identity_and_few_groups_fall_back_to_rows():
    gids = torch.tensor([0, 0, 1, 1])
    assert minibatch_indices(gids, 1)[0].tolist() == [0, 1, 2, 3]
    parts = minibatch_indices(torch.zeros(4, dtype=torch.long), 2)
    assert sorted(torch.cat(parts).tolist()) == [0, 1, 2, 3] and len(parts) == 2


def test_weights_finite_catches_nan_and_inf():
    from lmpo.train.step import weights_finite
    ok = [torch.randn(3, 4), torch.randn(5)]
    assert weights_finite(ok) and weights_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = [t.clone() for t in ok]
        w[1][2] = bad
        assert not weights_finite(w)
