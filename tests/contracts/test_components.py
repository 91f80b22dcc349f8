"""Contracts every registered component must satisfy, parametrised over all names (new methods join automatically)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import lmpo.methods  # noqa: F401  (registers components)
from lmpo.registry import ADVANTAGES, AGGREGATORS, LOSSES, SELECTORS, SHAPERS

from factories import grad_extras, pad_columns, permute, random_full_batch, with_extras

HORIZON = 8


def build(reg, name):
    params = reg.entry(name).params
    return reg.build(name, **({"horizon": HORIZON} if "horizon" in params else {}))


def needs_of(reg, name) -> frozenset[str]:
    """The optional inputs the component reads; the batches below carry synthetic extras for them (real paths)."""
    return frozenset(getattr(build(reg, name), "needs", frozenset()))


def batch_for(reg, name, **kw):
    return with_extras(random_full_batch(**kw), needs_of(reg, name), seed=kw.get("seed", 0))


# --------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("name", ADVANTAGES.names())
class TestAdvantage:
    def test_shape_dtype_and_mask(self, name):
        b = batch_for(ADVANTAGES, name)
        adv = build(ADVANTAGES, name)(b)
        assert adv.shape == b.response_ids.shape and adv.dtype == torch.float32
        assert torch.all(adv[~b.response_mask] == 0)

    def test_padding_changes_nothing(self, name):
        b = batch_for(ADVANTAGES, name, seed=2)
        a1 = build(ADVANTAGES, name)(b)
        a2 = build(ADVANTAGES, name)(pad_columns(b, 3))
        assert_close(a2[:, : a1.shape[1]], a1)
        assert torch.all(a2[:, a1.shape[1]:] == 0)

    def test_row_permutation_equivariant(self, name):
        b = batch_for(ADVANTAGES, name, seed=3)
        pb, perm = permute(b)
        assert_close(build(ADVANTAGES, name)(pb), build(ADVANTAGES, name)(b)[perm])

    def test_finite_when_group_rewards_equal(self, name):
        adv = build(ADVANTAGES, name)(batch_for(ADVANTAGES, name, equal_rewards=True))
        assert torch.isfinite(adv).all()


# --------------------------------------------------------------------------- policy losses
def _loss_inputs(name, seed=0, scale=1.0, equal=False):
    b = batch_for(LOSSES, name, seed=seed, logprob_scale=scale, equal_rewards=equal)
    lp = (b.old_logprobs + 0.1 * torch.randn(b.old_logprobs.shape, generator=torch.Generator().manual_seed(seed)))
    lp = (lp * b.response_mask).requires_grad_(True)
    return b, lp


@pytest.mark.parametrize("name", LOSSES.names())
class TestPolicyLoss:
    def test_shape_and_masked_tokens(self, name):
        b, lp = _loss_inputs(name)
        out = build(LOSSES, name)(lp, b)
        assert out.per_token.shape == lp.shape
        assert torch.all(out.per_token[~b.response_mask] == 0)
        out.per_token.sum().backward()
        assert lp.grad is None or torch.all(lp.grad[~b.response_mask] == 0)  # None: reads only candidates (OTR)
        for k, v in grad_extras(b).items():  # policy-produced extras (hidden, entropy, candidates) alike
            assert v.grad is None or torch.all(v.grad[~b.response_mask] == 0), f"gradient on masked tokens of {k}"
        for v in out.metrics.values():
            assert not v.requires_grad

    def test_padding_changes_nothing(self, name):
        b, lp = _loss_inputs(name, seed=1)
        out = build(LOSSES, name)(lp, b).per_token
        pb = pad_columns(b, 2)
        out2 = build(LOSSES, name)(torch.nn.functional.pad(lp, (0, 2)), pb).per_token
        assert_close(out2[:, : out.shape[1]], out)

    def test_row_permutation_equivariant(self, name):
        b, lp = _loss_inputs(name, seed=2)
        pb, perm = permute(b)
        assert_close(build(LOSSES, name)(lp[perm], pb).per_token, build(LOSSES, name)(lp, b).per_token[perm])

    def test_no_gradient_into_fixed_logprobs(self, name):
        b, lp = _loss_inputs(name, seed=3)
        fixed = {f: getattr(b, f).clone().requires_grad_(True) for f in ("old_logprobs", "ref_logprobs", "sampler_logprobs")}
        old_ex = {k: v.clone().requires_grad_(True) for k, v in b.extras.items() if k.startswith("old_")}
        b = b.replace(extras={**b.extras, **old_ex}, **fixed)
        build(LOSSES, name)(lp, b).per_token.sum().backward()
        for f, t in {**fixed, **old_ex}.items():
            assert t.grad is None or torch.all(t.grad == 0), f"gradient reached {f}"

    @pytest.mark.parametrize("scale", [25.0])
    def test_finite_at_extreme_logprobs(self, name, scale):
        b, lp = _loss_inputs(name, seed=4, scale=scale)  # log-probs down to -50
        lp2 = torch.where(b.response_mask, -50.0 * torch.ones_like(lp), lp).detach().requires_grad_(True)
        for x in (lp, lp2):
            out = build(LOSSES, name)(x, b)
            out.per_token.sum().backward()
            assert torch.isfinite(out.per_token).all() and (x.grad is None or torch.isfinite(x.grad).all())
            assert all(v.grad is None or torch.isfinite(v.grad).all() for v in grad_extras(b).values())

    def test_finite_with_zero_advantages(self, name):
        b, lp = _loss_inputs(name, seed=5, equal=True)
        b = b.replace(advantages=torch.zeros_like(b.advantages))
        assert torch.isfinite(build(LOSSES, name)(lp, b).per_token).all()


# --------------------------------------------------------------------------- aggregators
@pytest.mark.parametrize("name", AGGREGATORS.names())
class TestAggregator:
    def test_microbatch_invariance(self, name):
        b = random_full_batch(seed=6, groups=4)
        per_token = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(0))
        agg = build(AGGREGATORS, name)
        norm = agg.normaliser(b.response_mask, HORIZON)
        full = agg(per_token, b.response_mask, norm)
        for n in (2, 3, b.batch_size):
            parts = torch.arange(b.batch_size).tensor_split(n)
            split = sum(agg(per_token[i], b.response_mask[i], norm) for i in parts)
            assert_close(split, full)

    def test_padding_changes_nothing(self, name):
        b = random_full_batch(seed=7)
        per_token = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(1))
        agg = build(AGGREGATORS, name)
        full = agg(per_token, b.response_mask, agg.normaliser(b.response_mask, HORIZON))
        pm = torch.nn.functional.pad(b.response_mask, (0, 4))
        pt = torch.nn.functional.pad(per_token, (0, 4), value=123.0)  # garbage in padding must not leak
        assert_close(agg(pt, pm, agg.normaliser(pm, HORIZON)), full)

    def test_masked_tokens_get_no_gradient(self, name):
        b = random_full_batch(seed=8)
        per_token = torch.randn(b.response_mask.shape).requires_grad_(True)
        agg = build(AGGREGATORS, name)
        agg(per_token, b.response_mask, agg.normaliser(b.response_mask, HORIZON)).backward()
        assert torch.all(per_token.grad[~b.response_mask] == 0)


# --------------------------------------------------------------------------- selectors and shapers
@pytest.mark.parametrize("name", SELECTORS.names())
def test_selector_contract(name):
    b = batch_for(SELECTORS, name, seed=9)
    sel = build(SELECTORS, name)
    keep = sel(b)
    assert keep.shape == (b.batch_size,) and keep.dtype == torch.bool
    pb, perm = permute(b)
    assert torch.equal(sel(pb), keep[perm])
    assert sel(batch_for(SELECTORS, name, equal_rewards=True)).shape == (12,)


@pytest.mark.parametrize("name", SHAPERS.names())
def test_shaper_contract(name):
    b = batch_for(SHAPERS, name, seed=10)
    sh = build(SHAPERS, name)
    out = sh(b)
    assert out.batch_size == b.batch_size and torch.isfinite(out.rewards).all()
    assert not (out.response_mask & ~b.response_mask).any(), "a shaper may only remove tokens from training"
    pb, perm = permute(b)
    out_p = sh(pb)
    assert_close(out_p.rewards, out.rewards[perm])
    assert torch.equal(out_p.response_mask, out.response_mask[perm])
