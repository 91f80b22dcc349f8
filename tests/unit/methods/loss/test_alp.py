"""ALP (arXiv:2603.19470): clipped surrogate on pi_{theta,sigma} / pi_infer, with layer-wise input noise.

Token level, rho = exp(logp - sampler), eps_low 0.5, eps_high 3 (clip to [0.5, 4]):
  A > 0: rho > 4 -> l = -4 A, g = 0; else l = -A rho, g = -A rho
  A < 0: rho < 0.5 -> l = -0.5 A, g = 0; else l = -A rho, g = -A rho
Sequence level: rho_i = exp(mean_t log rho_t); per-token value rho_i, gradient rho_i d logp_t (GSPO-token form).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.alp import ALPLoss
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models import build_tiny_model, response_logprobs
from lmpo.models.logprobs import LayerNoise, layer_noise
from lmpo.train.step import PolicyRunner, UpdateSettings, minibatch_loss
from factories import from_config, make_batch, policy_batch

F64 = torch.float64


def batch(sampler, adv, mask=None):
    sampler = torch.as_tensor(sampler, dtype=F64)
    B, T = sampler.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    return make_batch([0.0] * B, None, mask, advantages=adv * mask, dtype=F64).replace(sampler_logprobs=sampler * mask)


def run(loss_fn, b, lp):
    lp = torch.as_tensor(lp, dtype=F64).clone().requires_grad_(True)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    return out.per_token.detach(), lp.grad


def test_hand_token_level():
    # sampler = -1; logp = -1 + log rho with rho = [0.4, 1, 5] in both rows; A = +1 (row 0), -1 (row 1)
    # row 0: 0.4 -> -0.4 (g -0.4) | 1 -> -1 (g -1) | 5 > 4 -> -4 (g 0)
    # row 1: 0.4 < 0.5 -> 0.5 (g 0) | 1 -> 1 (g 1) | 5 -> 5 (g 5)
    rho = torch.tensor([[0.4, 1.0, 5.0]] * 2, dtype=F64)
    b = batch(torch.full((2, 3), -1.0), [1.0, -1.0])
    loss, g = run(ALPLoss(level="token"), b, -1.0 + rho.log())
    assert_close(loss, torch.tensor([[-0.4, -1.0, -4.0], [0.5, 1.0, 5.0]], dtype=F64))
    assert_close(g, torch.tensor([[-0.4, -1.0, 0.0], [0.0, 1.0, 5.0]], dtype=F64))


def test_hand_sequence_level():
    # one row, log rho_t = [ln 2, 0, pad] -> rho = exp(ln2 / 2) = sqrt(2), inside [0.5, 4]; A = 1
    # per-token l = -sqrt(2) on the 2 real tokens, g = -sqrt(2) each; after seq-mean-token-mean the gradient is
    # -sqrt(2)/2 per token = d(-rho)/d logp_t since d rho / d logp_t = rho / |y|.
    b = batch([[-1.0, -1.0, -1.0]], [1.0], mask=[[1, 1, 0]])
    lp = torch.tensor([[-1.0 + math.log(2.0), -1.0, -7.0]], dtype=F64)
    loss, g = run(ALPLoss(), b, lp)
    r2 = math.sqrt(2.0)
    assert_close(loss, torch.tensor([[-r2, -r2, 0.0]], dtype=F64))
    assert_close(g, torch.tensor([[-r2, -r2, 0.0]], dtype=F64))
    x = lp.clone().requires_grad_(True)
    agg = SeqMeanTokenMean()
    agg(ALPLoss()(x, b).per_token, b.response_mask, agg.normaliser(b.response_mask, 0)).backward()
    assert_close(x.grad, torch.tensor([[-r2 / 2, -r2 / 2, 0.0]], dtype=F64))
    # rho = 4.5 > 4 clips: l = -4, no gradient
    lp2 = torch.tensor([[-1.0 + 2 * math.log(4.5), -1.0, 0.0]], dtype=F64)
    loss, g = run(ALPLoss(), b, lp2)
    assert_close(loss, torch.tensor([[-4.0, -4.0, 0.0]], dtype=F64)) and assert_close(g, torch.zeros_like(g))


def test_card_sigma_zero_is_the_bypass_objective():
    # sigma = 0: no hook is requested and the token-level loss is PPO-clip with pi_old := pi_infer (the "bypass").
    assert ALPLoss(noise_std=0.0).layer_noise() is None
    assert ALPLoss(noise_std=0.1, noise_first_layer=1).layer_noise() == LayerNoise(0.1, 1, None)
    g = torch.Generator().manual_seed(0)
    sampler = -torch.rand(3, 4, generator=g, dtype=F64) * 2
    b = batch(sampler, torch.randn(3, 4, generator=g, dtype=F64), mask=[[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    lp = sampler + 0.5 * torch.randn(3, 4, generator=g, dtype=F64)
    bypass = PPOClipLoss(epsilon=0.5, epsilon_high=3.0)(lp, b.replace(old_logprobs=b.sampler_logprobs)).per_token
    assert_close(ALPLoss(level="token", noise_std=0.0)(lp, b).per_token, bypass)


def loop_alp(lp, sampler, adv, mask, level, lo, hi):
    B, T = len(lp), len(lp[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        idx = [t for t in range(T) if mask[i][t]]
        seq = sum(lp[i][t] - sampler[i][t] for t in idx) / max(1, len(idx))
        for t in idx:
            r = math.exp(seq if level == "sequence" else lp[i][t] - sampler[i][t])
            a = adv[i][t]
            if (a >= 0 and r > 1 + hi) or (a < 0 and r < 1 - lo):
                loss[i][t], grad[i][t] = -a * min(max(r, 1 - lo), 1 + hi), 0.0
            else:
                loss[i][t], grad[i][t] = -a * r, -a * r
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_matches_loop_reference(level):
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        B, T = 4, 5
        mask = torch.rand(B, T, generator=g) > 0.25
        mask[:, 0] = True
        sampler = -torch.rand(B, T, generator=g, dtype=F64) * 2
        lp = sampler + torch.randn(B, T, generator=g, dtype=F64)
        adv = torch.randn(B, generator=g, dtype=F64)[:, None].expand(B, T) * 2
        fn = ALPLoss(epsilon=0.3, epsilon_high=0.6, level=level)
        loss, grad = run(fn, batch(sampler, adv, mask), lp)
        ref_l, ref_g = loop_alp(lp.tolist(), (sampler * mask).tolist(), (adv * mask).tolist(), mask.tolist(), level,
                                0.3, 0.6)
        assert_close(loss, ref_l)
        assert_close(grad, ref_g)


def test_gradcheck_sequence_level_through_aggregator():
    g = torch.Generator().manual_seed(1)
    sampler = -torch.rand(3, 4, generator=g, dtype=F64)
    b = batch(sampler, [1.0, -0.5, 2.0], mask=[[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    agg = SeqMeanTokenMean()
    norm = agg.normaliser(b.response_mask, 0)
    lp = (sampler + 0.2 * torch.randn(3, 4, generator=g, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: agg(ALPLoss()(x, b).per_token, b.response_mask, norm), (lp,))


# --------------------------------------------------------------------------- the perturbation in the trainer
def tiny_batch(seed=0, B=4, P=3, T=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    prompt_ids = torch.randint(3, 16, (B, P), generator=g)
    response_ids = torch.randint(3, 16, (B, T), generator=g)
    sampler = -torch.rand(B, T, generator=g) * 3 * mask
    adv = torch.randn(B, generator=g)[:, None] * mask
    return policy_batch(prompt_ids, torch.ones(B, P, dtype=torch.bool), response_ids, mask, advantages=adv,
                        sampler_logprobs=sampler, extras={"noise_seed": torch.arange(B) + 100})


def test_trainer_loss_uses_the_perturbed_numerator():
    model = build_tiny_model(seed=0)
    b = tiny_batch()
    with torch.no_grad():  # a sampler that agrees with the trainer, so ratios sit inside the clip range
        b = b.replace(sampler_logprobs=response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids,
                                                         b.response_attn)[0])
    agg = SeqMeanTokenMean()
    norm = agg.normaliser(b.response_mask, 0)
    fn = ALPLoss(noise_std=0.3)
    got, _ = minibatch_loss(PolicyRunner(model), b, fn, agg, UpdateSettings(), norm)
    with torch.no_grad(), layer_noise(model, LayerNoise(0.3), b.extras["noise_seed"]):
        lp = response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_attn)[0]
    assert_close(got.detach(), agg(fn(lp, b).per_token, b.response_mask, norm))
    clean, _ = minibatch_loss(PolicyRunner(model), b, ALPLoss(noise_std=0.0), agg, UpdateSettings(), norm)
    assert (got - clean).abs() > 1e-4  # the noise reached the numerator
    # and the no-grad passes (old / reference log-probs) are never perturbed
    plain = response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_attn)[0]
    assert torch.equal(PolicyRunner(model).logprobs_nograd(b, None), plain.detach())


def test_card_noise_raises_mean_entropy_of_the_training_distribution():
    # Card (b): mean token entropy with sigma = 0.1 exceeds sigma = 0, averaged over seeds (tiny random model).
    model = build_tiny_model(seed=0, init_std=0.5)
    b = tiny_batch(B=8)
    args = (model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_attn)
    with torch.no_grad():
        h0 = response_logprobs(*args, with_entropy=True)[1][b.response_mask].mean()
        noisy = []
        for s in range(8):
            with layer_noise(model, LayerNoise(0.5), torch.arange(8) + 1000 * s):
                noisy.append(response_logprobs(*args, with_entropy=True)[1][b.response_mask].mean())
    assert torch.stack(noisy).mean() > h0


def test_config_errors():
    for kw, key in (({"epsilon": 1.5}, "epsilon"), ({"epsilon_high": -1.0}, "epsilon_high"), ({"level": "x"}, "level"),
                    ({"noise_std": -1.0}, "noise_std"), ({"noise_first_layer": 2, "noise_last_layer": 1},
                                                          "noise_first_layer")):
        with pytest.raises(ConfigError, match=key):
            from_config(ALPLoss, **kw)
    assert ALPLoss.needs == frozenset({"sampler_logprobs", "layer_noise"})
