"""The PreferenceLoss contract over every registered preference loss (new losses join automatically): shapes,
finite values and gradients (also at extreme log-probs), masked tokens ignored (junk there changes nothing and gets
no gradient), extra padding changes nothing, pairs permute with their rows, no gradient into the reference,
micro-batch invariance of the summed loss, unknown hyper-parameters named. Every batch carries the optional
mismatched pairs' log-probs (KTO's KL estimate), which the losses that do not need them ignore."""

from __future__ import annotations

import pytest
import torch

import lmpo.methods  # noqa: F401  (registers components)
from lmpo.batch import PreferenceBatch
from lmpo.errors import ConfigError
from lmpo.methods.base import PairLogps
from lmpo.registry import PREFERENCE_LOSSES

N, TC, TR = 4, 3, 5


def pair_inputs(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cm = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    rm = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    kl = -scale * torch.rand(2, N, generator=g, dtype=torch.float64) * 3 - 0.5
    batch = PreferenceBatch(prompt_ids=torch.ones(N, 2, dtype=torch.long), chosen_ids=torch.ones(N, TC, dtype=torch.long),
                            chosen_mask=cm, rejected_ids=torch.ones(N, TR, dtype=torch.long), rejected_mask=rm,
                            mismatched_logps=kl[0], mismatched_ref_logps=kl[1])

    def lp(shape, mask):
        x = -scale * torch.rand(shape, generator=g, dtype=torch.float64) - 0.05
        return torch.where(mask, x, 0.0)

    policy = PairLogps(lp((N, TC), cm).requires_grad_(), lp((N, TR), rm).requires_grad_())
    ref = PairLogps(lp((N, TC), cm).requires_grad_(), lp((N, TR), rm).requires_grad_())
    return batch, policy, ref


def call(name, batch, policy, ref):
    loss = PREFERENCE_LOSSES.build(name)
    return loss(batch, policy, ref if "ref_logprobs" in loss.needs else None)


def select(batch, policy, ref, idx):
    b = PreferenceBatch(prompt_ids=batch.prompt_ids[idx], chosen_ids=batch.chosen_ids[idx],
                        chosen_mask=batch.chosen_mask[idx], rejected_ids=batch.rejected_ids[idx],
                        rejected_mask=batch.rejected_mask[idx], mismatched_logps=batch.mismatched_logps[idx],
                        mismatched_ref_logps=batch.mismatched_ref_logps[idx])
    return b, PairLogps(policy.chosen[idx], policy.rejected[idx]), PairLogps(ref.chosen[idx], ref.rejected[idx])


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
class TestPreferenceLoss:
    def test_shape_finite_gradient_and_no_gradient_into_reference(self, name):
        batch, policy, ref = pair_inputs()
        out = call(name, batch, policy, ref)
        assert out.per_pair.shape == (N,) and torch.isfinite(out.per_pair).all()
        assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
        assert all(k.split("/")[0] in ("loss", "rewards", "logps") for k in out.metrics)
        out.per_pair.sum().backward()
        for t, m in ((policy.chosen, batch.chosen_mask), (policy.rejected, batch.rejected_mask)):
            assert torch.isfinite(t.grad).all() and (t.grad[~m] == 0).all()
        assert (policy.chosen.grad.abs().sum() + policy.rejected.grad.abs().sum()) > 0
        assert ref.chosen.grad is None and ref.rejected.grad is None

    def test_junk_on_masked_tokens_and_extra_padding_change_nothing(self, name):
        batch, policy, ref = pair_inputs(seed=1)
        base = call(name, batch, policy, ref).per_pair
        junk = PairLogps(torch.where(batch.chosen_mask, policy.chosen, 7.0),
                         torch.where(batch.rejected_mask, policy.rejected, -9.0))
        torch.testing.assert_close(call(name, batch, junk, ref).per_pair, base)
        padded = PreferenceBatch(prompt_ids=batch.prompt_ids, chosen_ids=torch.ones(N, TC + 2, dtype=torch.long),
                                 chosen_mask=torch.nn.functional.pad(batch.chosen_mask, (0, 2)),
                                 rejected_ids=torch.ones(N, TR + 1, dtype=torch.long),
                                 rejected_mask=torch.nn.functional.pad(batch.rejected_mask, (0, 1)),
                                 mismatched_logps=batch.mismatched_logps, mismatched_ref_logps=batch.mismatched_ref_logps)

        def pad(p, a, b):
            return PairLogps(torch.nn.functional.pad(p.chosen, (0, a)), torch.nn.functional.pad(p.rejected, (0, b)))

        torch.testing.assert_close(call(name, padded, pad(policy, 2, 1), pad(ref, 2, 1)).per_pair, base)

    def test_pairs_permute_and_split_into_micro_batches(self, name):
        batch, policy, ref = pair_inputs(seed=2)
        base = call(name, batch, policy, ref).per_pair
        perm = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(call(name, *select(batch, policy, ref, perm)).per_pair, base[perm])
        if getattr(PREFERENCE_LOSSES.get(name), "batch_statistic", False):
            return  # a batch statistic (KTO's reference point) couples the rows of a micro-batch, by design
        halves = [call(name, *select(batch, policy, ref, torch.tensor(i))).per_pair for i in ([0, 1], [2, 3])]
        torch.testing.assert_close(torch.cat(halves), base)

    def test_finite_at_extreme_logprobs(self, name):
        batch, policy, ref = pair_inputs(seed=3, scale=60.0)
        out = call(name, batch, policy, ref)
        out.per_pair.sum().backward()
        assert torch.isfinite(out.per_pair).all()
        assert torch.isfinite(policy.chosen.grad).all() and torch.isfinite(policy.rejected.grad).all()

    def test_unknown_hyper_parameter_names_the_nearest(self, name):
        params = PREFERENCE_LOSSES.entry(name).params
        if not params:
            pytest.skip("no hyper-parameters")
        key = sorted(params)[0]
        with pytest.raises(ConfigError, match=f'"preference.loss.{key}x".*Did you mean "{key}"'):
            PREFERENCE_LOSSES.build(name, where="preference.loss", **{key + "x": 1})
