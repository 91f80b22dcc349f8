"""R2VPO (arXiv:2601.03320, reconstructed): l_t = -r_t A_t + nu (r_t - 1)^2, dual ascent on nu once per step.

With r = exp(logp - old):  d l_t / d logp_t = r (-A + 2 nu (r - 1)).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.methods.loss.r2vpo import R2VPOLoss
from factories import from_config, make_batch, random_mask, token_loss_inputs

F64 = torch.float64


def batch_and_lp(ratios, adv, mask=None):
    return token_loss_inputs(torch.as_tensor(ratios, dtype=F64).log(), adv, mask)


def run(loss_fn, ratios, adv, mask=None):
    b, lp = batch_and_lp(ratios, adv, mask)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    return out.per_token.detach(), lp.grad, out.metrics


def with_nu(nu, **kw):
    return R2VPOLoss(nu_init=nu, **kw)


def test_hand_case():
    # Row 0: A = +1, r = [1.5, 1.0]; Row 1: A = -2, r = [0.5, pad]
    # nu = 0: l = -r A = [-1.5, -1 | 1.0, 0]; grad = -A r = [-1.5, -1 | 1.0, 0]
    #   (PPO-clip with eps 0.2 would give the r = 1.5, A > 0 token zero gradient; here it keeps -1.5.)
    # nu = 2: l += 2 (r - 1)^2 = [0.5, 0 | 0.5]   -> [-1.0, -1.0 | 1.5, 0]
    #         grad = r (-A + 4 (r - 1)) = 1.5 (-1 + 2) = 1.5 | 1 (-1 + 0) = -1 | 0.5 (2 - 2) = 0
    r, a, m = [[1.5, 1.0], [0.5, 3.0]], [1.0, -2.0], [[1, 1], [1, 0]]
    loss, grad, met = run(with_nu(0.0), r, a, m)
    assert_close(loss, torch.tensor([[-1.5, -1.0], [1.0, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-1.5, -1.0], [1.0, 0.0]], dtype=F64))
    assert_close(met["loss/ratio_var"], torch.tensor((0.25 + 0 + 0.25) / 3, dtype=F64))
    _, g_ppo, _ = run(PPOClipLoss(epsilon=0.2), r, a, m)
    assert g_ppo[0, 0].item() == 0.0 and grad[0, 0].item() == -1.5  # card test (2)
    loss, grad, _ = run(with_nu(2.0), r, a, m)
    assert_close(loss, torch.tensor([[-1.0, -1.0], [1.5, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[1.5, -1.0], [0.0, 0.0]], dtype=F64))


def test_penalty_vanishes_at_ratio_one():
    # card test (1): at r = 1 the penalty and its gradient are 0, whatever nu: the unclipped policy gradient -A.
    loss, grad, _ = run(with_nu(5.0), [[1.0, 1.0, 1.0]], [[0.3, -1.0, 2.0]])
    assert_close(loss, torch.tensor([[-0.3, 1.0, -2.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-0.3, 1.0, -2.0]], dtype=F64))


def test_dual_ascent():
    # card test (3). delta 0.01, eta 10, r = [1.2, 0.8, 1.0]:
    #   mean (r-1)^2 = (0.04 + 0.04 + 0) / 3 = 0.026667 -> nu = max(0, 0 + 10 (0.026667 - 0.01)) = 0.16667
    loss_fn = R2VPOLoss(delta=0.01, dual_lr=10.0)
    run(loss_fn, [[1.2, 0.8, 1.0]], [1.0])
    assert loss_fn.nu == 0.0  # the call itself never changes nu
    loss_fn.after_optimizer_step()
    assert loss_fn.nu == pytest.approx(10 * (0.08 / 3 - 0.01))
    # on-policy step (r = 1): nu decays by eta * delta = 0.1 per step, and is floored at 0
    run(loss_fn, [[1.0, 1.0]], [1.0])
    loss_fn.after_optimizer_step()
    assert loss_fn.nu == pytest.approx(10 * (0.08 / 3 - 0.01) - 0.1)
    run(loss_fn, [[1.0]], [1.0])
    loss_fn.after_optimizer_step()
    assert loss_fn.nu == 0.0
    loss_fn.after_optimizer_step()  # a step with no calls changes nothing
    assert loss_fn.nu == 0.0


def test_microbatch_invariance_of_loss_and_dual_update():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    mask = random_mask(g, B, T)
    ratios = (torch.randn(B, T, generator=g, dtype=F64) * 0.3).exp()
    adv = torch.randn(B, T, generator=g, dtype=F64)
    full_fn = with_nu(0.7)
    full, _, _ = run(full_fn, ratios, adv, mask)
    full_fn.after_optimizer_step()
    for n in (2, 3, 6):
        fn = with_nu(0.7)
        parts = [run(fn, ratios[i], adv[i], mask[i])[0] for i in torch.arange(B).tensor_split(n)]
        assert_close(torch.cat(parts), full)  # nu is not touched between micro-batches
        fn.after_optimizer_step()
        assert fn.nu == pytest.approx(full_fn.nu, rel=1e-12)


def test_state_dict_round_trip():
    a = R2VPOLoss(delta=0.02, dual_lr=3.0)
    run(a, [[1.5, 0.6]], [1.0])
    a.after_optimizer_step()
    run(a, [[1.3]], [1.0])  # pending sums of an unfinished step travel too
    buf = io.BytesIO()
    torch.save({"components": {"loss": a.state_dict()}}, buf)
    buf.seek(0)
    b = R2VPOLoss(delta=0.02, dual_lr=3.0)
    b.load_state_dict(torch.load(buf, weights_only=False)["components"]["loss"])
    assert b.state_dict() == a.state_dict() and b.nu > 0
    assert_close(run(a, [[1.4, 0.9]], [-1.0])[0], run(b, [[1.4, 0.9]], [-1.0])[0])
    a.after_optimizer_step()
    b.after_optimizer_step()
    assert a.nu == b.nu
    assert R2VPOLoss(delta=0.02, dual_lr=3.0).nu == 0.0  # a new instance does not share state


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.delta"):
        from_config(R2VPOLoss, delta=0.0)
    with pytest.raises(ConfigError, match="loss.dual_lr"):
        from_config(R2VPOLoss, dual_lr=-1.0)
    with pytest.raises(ConfigError, match="loss.nu_init"):
        from_config(R2VPOLoss, nu_init=-0.1)


def loop_r2vpo(logr, adv, mask, nu):
    B, T = len(logr), len(logr[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i][t]:
                r, a = math.exp(logr[i][t]), adv[i][t]
                loss[i][t] = -r * a + nu * (r - 1) ** 2
                grad[i][t] = r * (-a + 2 * nu * (r - 1))
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


@pytest.mark.parametrize("nu", [0.0, 0.5, 4.0])
def test_matches_loop_reference_and_gradcheck(nu):
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        mask = random_mask(g, B, T)
        logr = torch.randn(B, T, generator=g, dtype=F64) * 0.5
        adv = torch.randn(B, T, generator=g, dtype=F64)
        loss, grad, _ = run(with_nu(nu), logr.exp(), adv, mask)
        ref_loss, ref_grad = loop_r2vpo(logr.tolist(), (adv * mask).tolist(), mask.tolist(), nu)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)
    # no stop-gradient inside the loss: float64 finite differences through the token-mean aggregator
    b, lp = batch_and_lp(logr.exp(), adv, mask)
    fn, agg = with_nu(nu), TokenMean()
    norm = agg.normaliser(mask, 0)
    assert torch.autograd.gradcheck(lambda x: agg(fn(x, b).per_token, mask, norm), (lp.detach().requires_grad_(True),))


# --------------------------------------------------------------------------- trainer integration (lmpo.train.step)
class _FakeRunner:
    """A one-parameter 'policy': logp = sampler_logprobs + theta * response_ids / 10 (enough to drive policy_update)."""

    device = torch.device("cpu")  # the trainer moves micro-batches to the runner's device

    def __init__(self):
        self.model = torch.nn.Module()
        self.model.theta = torch.nn.Parameter(torch.zeros(()))

    def for_loss(self, batch, needs, loss_fn):
        return self

    def logprobs(self, batch, with_entropy=False, entropy_grad=True):
        lp = batch.sampler_logprobs + self.model.theta * batch.response_ids.float() / 10
        return lp, torch.zeros_like(lp)

    def forward(self, batch, with_entropy=False, entropy_grad=True, hidden=False):
        return (*self.logprobs(batch, with_entropy, entropy_grad), None)


def _update(loss_fn, opt_cls=torch.optim.SGD, **settings):
    from lmpo.methods.aggregate import TokenMean as Agg
    from lmpo.pipeline import Pipeline
    from lmpo.engine.optim import TrainOptimizer
    from lmpo.train.step import UpdateSettings, policy_update
    g = torch.Generator().manual_seed(0)
    B, T = 8, 3
    b = make_batch(torch.rand(B, generator=g), torch.arange(B) // 4, torch.ones(B, T, dtype=torch.bool),
                   advantages=torch.randn(B, T, generator=g))
    b = b.replace(response_ids=torch.randint(1, 9, (B, T), generator=g),
                  sampler_logprobs=-torch.rand(B, T, generator=g))
    b = b.replace(old_logprobs=b.sampler_logprobs.clone())
    runner = _FakeRunner()
    opt = opt_cls(runner.model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p = Pipeline.assemble(loss=loss_fn)  # the extension points as the trainer resolves them
    metrics = policy_update(runner, TrainOptimizer(opt, sched, None), b, loss_fn, Agg(), UpdateSettings(**settings), 1,
                            p.hook("lr_scale"), p.calls("after_optimizer_step"))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # a scaled step never leaks into later steps
    return runner.model.theta.detach().item(), metrics


def test_trainer_calls_dual_update_once_per_optimizer_step():
    class Counting(R2VPOLoss):
        def after_optimizer_step(self):
            self.state["calls"] = self.state.get("calls", 0) + 1
            super().after_optimizer_step()

    fn = Counting(delta=0.01, dual_lr=10.0)
    # 2 epochs x 2 mini-batches = 4 optimizer steps, each split into 4 micro-batches of 1 row: 16 loss calls
    _update(fn, ppo_epochs=2, num_minibatches=2, micro_batch_size=1)
    assert fn.state["calls"] == 4 and fn.state["pending_n"] == 0.0


def test_trainer_applies_lr_scale_to_one_step():
    # the hook VCPO uses: a loss with lr_scale() = 0.5 moves theta half as far as plain REINFORCE under SGD
    class Scaled:
        needs = frozenset()

        def __call__(self, logprobs, batch):
            return LossOutType(-batch.advantages * logprobs, {})

        def lr_scale(self):
            return 0.5

    from lmpo.methods.base import LossOut as LossOutType
    from lmpo.methods.loss.reinforce import ReinforceLoss
    theta_scaled, m = _update(Scaled())
    theta_plain, _ = _update(ReinforceLoss())
    assert theta_plain != 0.0
    assert theta_scaled == pytest.approx(0.5 * theta_plain, rel=1e-6)  # SGD: half the learning rate, half the step
    assert m["loss/lr_scale"].item() == pytest.approx(0.5)
