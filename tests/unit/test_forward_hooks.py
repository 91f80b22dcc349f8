"""Opt-in forward hooks of the training pass: LM-head inputs (hidden states), current entropy and layer-wise noise.

Each hook is checked against an independent computation (a plain model call, a hand-written noisy forward), for
being off by default, and for determinism under recomputation and micro-batching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

from lmpo.errors import DataError, ModelError
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.base import LossOut
from lmpo.models import build_tiny_model, position_ids_from_mask, response_logprobs
from lmpo.models.load import enable_activation_checkpointing
from lmpo.models.logprobs import LayerNoise, _noise_seed, layer_noise
from lmpo.engine.optim import TrainOptimizer
from lmpo.train.step import PolicyRunner, UpdateSettings, minibatch_loss, policy_update
from factories import policy_batch


def make_inputs(B=3, P=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 16, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt_mask[1, :2] = False
    response_ids = torch.randint(3, 16, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.bool)
    attn[2, 3:] = False
    return prompt_ids, prompt_mask, response_ids, attn


# --------------------------------------------------------------------------- hidden states
def test_hidden_states_equal_plain_model_call():
    model = build_tiny_model(seed=0)
    p, pm, r, a = make_inputs()
    lp, ent, hidden = response_logprobs(model, p, pm, r, a, with_entropy=True, return_hidden=True)
    ids, mask = torch.cat([p, r], 1), torch.cat([pm, a], 1)
    out = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask),
                output_hidden_states=True)
    P, T = p.shape[1], r.shape[1]
    ref = out.hidden_states[-1][:, P - 1 : P + T - 1] * a[..., None]  # the final (normed) state feeding the head
    assert_close(hidden, ref)
    # and it *is* the LM-head input: head(hidden) reproduces the log-probs
    ref_lp = torch.log_softmax(model.lm_head(hidden).float(), -1).gather(-1, r[..., None])[..., 0] * a
    assert_close(lp, ref_lp)
    assert hidden.requires_grad  # gradient flows through it into the body
    # the default call is unchanged: two outputs, same numbers
    lp2, ent2 = response_logprobs(model, p, pm, r, a, with_entropy=True)
    assert_close(lp2, lp) and assert_close(ent2, ent)


@dataclass(frozen=True)
class _Probe:
    """A loss that records the extras it receives and returns sum(hidden) + entropy so gradients can be compared."""

    needs: ClassVar[frozenset[str]] = frozenset({"hidden_states", "current_entropy"})
    seen: dict = None

    def __call__(self, logprobs, batch):
        self.seen.update(batch.extras)
        per = batch.extras["hidden"].sum(-1) + batch.extras["current_entropy"] + 0 * logprobs
        return LossOut(torch.where(batch.response_mask, per, 0.0), {})


def test_minibatch_loss_provides_hidden_and_entropy_from_the_same_forward():
    model = build_tiny_model(seed=0)
    b = policy_batch(*make_inputs())
    probe = _Probe(seen={})
    runner = PolicyRunner(model)
    calls = []
    h = model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    loss, _ = minibatch_loss(runner, b, probe, TokenMean(), UpdateSettings(), torch.tensor(float(b.response_mask.sum())))
    h.remove()
    assert len(calls) == 1  # one body forward, never a second pass
    lp, ent, hidden = response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_attn,
                                        with_entropy=True, return_hidden=True)
    assert_close(probe.seen["hidden"], hidden)
    assert_close(probe.seen["current_entropy"], ent)
    assert probe.seen["current_entropy"].requires_grad
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert runner.captured == {} and not runner.keep_hidden  # the shared runner itself is never modified


def test_default_runner_is_untouched_without_hook_needs():
    runner = PolicyRunner(build_tiny_model(seed=0))
    b = policy_batch(*make_inputs())
    assert runner.for_loss(b, frozenset({"old_logprobs"}), None) is runner


# --------------------------------------------------------------------------- layer noise
def noisy_reference(model, p, pm, r, a, std, seeds, layers):
    """Independent noisy forward: each chosen layer's ``forward`` is wrapped to add std * eps to its input."""
    originals = {}

    def wrap(i, fwd):
        def forward(hidden_states, *args, **kwargs):
            eps = torch.stack([torch.randn(hidden_states.shape[1:],
                                           generator=torch.Generator().manual_seed(_noise_seed(int(s), i)))
                               for s in seeds])
            return fwd(hidden_states + std * eps, *args, **kwargs)
        return forward

    for i in layers:
        layer = model.model.layers[i]
        originals[i] = layer.forward
        layer.forward = wrap(i, layer.forward)
    try:
        ids, mask = torch.cat([p, r], 1), torch.cat([pm, a], 1)
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
    finally:
        for i, f in originals.items():
            del model.model.layers[i].forward
    P, T = p.shape[1], r.shape[1]
    return torch.log_softmax(logits[:, P - 1 : P + T - 1].float(), -1).gather(-1, r[..., None])[..., 0] * a


def test_layer_noise_matches_hand_written_noisy_forward():
    model = build_tiny_model(seed=0)
    inp = make_inputs()
    seeds = torch.tensor([11, 5, 2**40])
    with torch.no_grad():
        plain = response_logprobs(model, *inp)[0]
        assert_close(noisy_reference(model, *inp, 0.0, seeds, {0, 1}), plain)  # the reference itself is right
        for layers, spec in (({0, 1}, LayerNoise(0.3)), ({1}, LayerNoise(0.3, first=1))):
            with layer_noise(model, spec, seeds):
                lp = response_logprobs(model, *inp)[0]
            assert_close(lp, noisy_reference(model, *inp, 0.3, seeds, layers))
            assert (lp - plain).abs().max() > 1e-3
        after = response_logprobs(model, *inp)[0]
    assert torch.equal(after, plain)  # hooks are removed on exit


def test_layer_noise_off_by_default_and_zero_std_is_exact():
    model = build_tiny_model(seed=0)
    inp = make_inputs()
    with torch.no_grad():
        plain = response_logprobs(model, *inp)[0]
        with layer_noise(model, None, None):
            assert torch.equal(response_logprobs(model, *inp)[0], plain)
        # noise hooks need the Hugging Face forward (lmpo.engine.packed steps aside): bit-equal to it at std 0
        hf = response_logprobs(model, *inp, packed=False)[0]
        assert_close(hf, plain)
        with layer_noise(model, LayerNoise(0.0), torch.tensor([1, 2, 3])):
            assert torch.equal(response_logprobs(model, *inp)[0], hf)
    assert PolicyRunner(model).noise is None


def test_layer_noise_deterministic_per_row_seed_and_microbatch_invariant():
    model = build_tiny_model(seed=0)
    p, pm, r, a = make_inputs(B=4)
    seeds = torch.tensor([3, 9, 27, 81])
    spec = LayerNoise((0.2, 0.1))
    with torch.no_grad(), layer_noise(model, spec, seeds):
        full = response_logprobs(model, p, pm, r, a)[0]
        again = response_logprobs(model, p, pm, r, a)[0]
    assert torch.equal(full, again)
    with torch.no_grad():
        parts = []
        for idx in (torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3])):
            with layer_noise(model, spec, seeds[idx]):
                parts.append(response_logprobs(model, p[idx], pm[idx], r[idx], a[idx])[0])
        other = seeds.clone()
        other[0] += 1
        with layer_noise(model, spec, other):
            changed = response_logprobs(model, p, pm, r, a)[0]
    assert_close(torch.cat(parts), full)
    assert not torch.allclose(changed[0], full[0]) and torch.equal(changed[1:], full[1:])


def test_layer_noise_same_gradient_under_recomputation():
    inp = make_inputs()
    seeds = torch.tensor([1, 2, 3])
    grads = []
    for ckpt in (False, True):
        model = build_tiny_model(seed=0)

        def noisy(dummy):
            with layer_noise(model, LayerNoise(0.3), seeds):
                return response_logprobs(model, *inp)[0] + 0 * dummy

        calls = []
        h = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
        x = torch.zeros((), requires_grad=True)
        lp = checkpoint(noisy, x, use_reentrant=False) if ckpt else noisy(x)
        lp.sum().backward()  # with checkpointing the forward (and its noise) is recomputed here
        h.remove()
        assert len(calls) == 1 + ckpt
        grads.append({n: q.grad.clone() for n, q in model.named_parameters()})
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7, msg=n)


def test_layer_noise_refuses_hf_gradient_checkpointing():
    model = build_tiny_model(seed=0).train()
    enable_activation_checkpointing(model)
    with pytest.raises(ModelError, match="gradient_checkpointing"):
        with layer_noise(model, LayerNoise(0.1), torch.tensor([1])):
            pass


def test_layer_noise_bad_spec():
    model = build_tiny_model(seed=0)
    with pytest.raises(DataError, match="decoder layers"):
        with layer_noise(model, LayerNoise(0.1, first=0, last=5), torch.tensor([1])):
            pass
    with pytest.raises(DataError, match="noise_seed"):
        with layer_noise(model, LayerNoise(0.1), None):
            pass


@dataclass(frozen=True)
class _NoisyLoss:
    needs: ClassVar[frozenset[str]] = frozenset({"layer_noise"})
    std: float = 0.0

    def layer_noise(self):
        return LayerNoise(self.std)

    def __call__(self, logprobs, batch):
        return LossOut(torch.where(batch.response_mask, -logprobs * batch.advantages, 0.0), {})


def test_policy_update_seeds_noise_only_when_asked():
    b = policy_batch(*make_inputs())
    for loss, expect_draw in ((_NoisyLoss(0.1), True), (_Probe(seen={}), False)):
        model = build_tiny_model(seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        torch.manual_seed(0)
        policy_update(PolicyRunner(model), TrainOptimizer(opt, sched, 1.0), b, loss, TokenMean(), UpdateSettings(), 1)
        state = torch.get_rng_state()
        torch.manual_seed(0)
        assert torch.equal(state, torch.get_rng_state()) != expect_draw  # the default path draws nothing
