"""The critic (lmpo.train.critic) in the pipeline and the update: the values need is paired with value targets, the
shared value head's gradient, micro-batch invariance, a separate critic leaves the policy's update alone, its state
round trip, and a run with a critic resumes exactly."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.testing import assert_close

from lmpo import ops
from lmpo.config import TrainConfig, build_components, load_config
from lmpo.engine.optim import build_optimizer
from lmpo.errors import ConfigError
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.models.load import load_model
from lmpo.pipeline import build_pipeline
from lmpo.train.critic import Critic
from lmpo.train.loop import train
from lmpo.train.metrics import read_metrics
from lmpo.train.step import PolicyRunner, UpdateSettings, minibatch_loss, policy_update

from factories import policy_batch

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------- the pipeline pairs values with targets
@dataclass(frozen=True)
class NeedsValues:
    needs: ClassVar[frozenset[str]] = frozenset({"values"})

    def __call__(self, batch):
        return torch.zeros(batch.response_mask.shape)


@dataclass(frozen=True)
class TargetsOnly:
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch):
        return torch.zeros(batch.response_mask.shape)

    def value_targets(self, batch):
        return torch.zeros(batch.response_mask.shape)


def test_pipeline_pairs_values_with_value_targets():
    cfg = load_config(TINY, ["method=ppo"])
    p = build_pipeline(cfg)
    assert p.plan.values and p.hook("value_targets") is not None
    assert not build_pipeline(load_config(TINY, ["method=grpo"])).plan.values
    for adv, msg in ((NeedsValues(), "no component provides value_targets"), (TargetsOnly(), "no component needs")):
        comps = build_components(cfg)
        comps["advantage"] = adv
        with pytest.raises(ConfigError, match=msg):
            build_pipeline(cfg, comps)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="critic.model must be shared or separate"):
        load_config(TINY, ["method=ppo", "critic.model=twin"])
    with pytest.raises(ConfigError, match="train.optimizer_in_backward=true cannot fold"):
        load_config(TINY, ["method=ppo", "train.optimizer_in_backward=true"])
    with pytest.raises(ConfigError, match="critic.vf_coef"):
        load_config(TINY, ["method=ppo", "critic.vf_coef=-1"])
    load_config(TINY, ["method=grpo", "train.optimizer_in_backward=true"])  # no critic: nothing to refuse


# --------------------------------------------------------------------------- the critic in the update
def policy(seed: int = 0):
    return load_model("tiny", seed=seed)[0]


def prepared_batch(model, critic: Critic, seed: int = 0, B: int = 4, P: int = 3, T: int = 5):
    """A batch for a real forward, with the critic's values and random targets as the preparation would set them."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    attn = torch.arange(T)[None, :] < torch.tensor([5, 3, 4, 2])[:B, None]
    b = policy_batch(torch.randint(0, vocab, (B, P), generator=g), torch.ones(B, P, dtype=torch.bool),
                     torch.randint(0, vocab, (B, T), generator=g), attn,
                     advantages=torch.randn(B, T, generator=g) * attn)
    values = critic.values_nograd(b, None)
    returns = ops.zero_outside(values + torch.randn(B, T, generator=g), attn)
    old = PolicyRunner(model, packed=False).logprobs_nograd(b, None)
    return b.replace(group_ids=torch.arange(B), old_logprobs=old, extras={"values": values, "returns": returns})


def settings(critic, **kw):
    return UpdateSettings(critic=critic, horizon=5, **kw)


def make(shared=True, clip=0.2, vf_coef=0.5, lr=1e-2, seed=0):
    model = policy(seed)
    runner = PolicyRunner(model, packed=False)
    critic = Critic(model, runner, shared=shared, vf_coef=vf_coef, cliprange_value=clip, learning_rate=lr)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(learning_rate=1e-2), 10,
                          single_use=False)
    return model, runner, critic, opt


def test_shared_head_gradient_is_the_value_loss_gradient():
    # d/dw [vf_coef * sum_t 0.5 (w.h_t + b - R_t)^2 / n] = vf_coef * sum_t (V_t - R_t) h_t / n, no clipping while
    # the critic is at its pre-update values (V = V_old); the trunk receives gradient too.
    model, runner, critic, _ = make(shared=True, clip=0.2, vf_coef=0.5)
    with torch.no_grad():
        critic.head.weight.normal_(0, 0.1)
    b = prepared_batch(model, critic)
    b = b.replace(extras={**b.extras, "values": critic.values_nograd(b, None)})
    n = b.response_mask.sum().float()
    loss, metrics = minibatch_loss(runner, b, PPOClipLoss(), TokenMean(), settings(critic), n, n)
    loss.backward()
    h = runner.forward(b, hidden=True)[2].detach()
    v = critic.values(h, b.response_mask).detach()
    m = b.response_mask[..., None]
    expect = 0.5 * ((v - b.extras["returns"])[..., None] * h * m).sum((0, 1)) / n
    assert_close(critic.head.weight.grad[0], expect, atol=1e-6, rtol=1e-5)
    assert metrics["critic/vf_clipfrac"] == 0
    trunk = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert trunk and any(float(p.grad.abs().sum()) > 0 for p in trunk)


@pytest.mark.parametrize("shared", [True, False])
def test_micro_batches_give_the_same_update(shared):
    out = []
    for micro in (None, 2):
        torch.manual_seed(0)
        model, runner, critic, opt = make(shared=shared)
        b = prepared_batch(model, critic)
        policy_update(runner, opt, b, PPOClipLoss(), TokenMean(), settings(critic, micro_batch_size=micro,
                                                                          ppo_epochs=2), step=1)
        out.append((copy.deepcopy(critic.state_dict()), [p.detach().clone() for p in model.parameters()]))
    (c1, w1), (c2, w2) = out
    assert_close(c1["head"], c2["head"], atol=1e-6, rtol=1e-5)
    for a, b in zip(w1, w2):  # AdamW divides tiny gradients by their own size: float rounding shows at ~1e-6
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert float(c1["head"]["weight"].abs().sum()) > 0  # the head learned
    if not shared:
        assert c1["model"] and all(torch.allclose(c1["model"][k], c2["model"][k], atol=1e-6) for k in c1["model"])


def test_separate_critic_leaves_the_policy_update_alone():
    weights = []
    for with_critic in (False, True):
        torch.manual_seed(0)
        model, runner, critic, opt = make(shared=False)
        b = prepared_batch(model, critic)
        before = {k: v.clone() for k, v in critic.model.state_dict().items()}
        # two epochs: the zero-initialised head passes no gradient to the critic's trunk in the first
        policy_update(runner, opt, b, PPOClipLoss(), TokenMean(), settings(critic if with_critic else None,
                                                                          ppo_epochs=2), step=1)
        weights.append([p.detach().clone() for p in model.parameters()])
        if with_critic:  # the copy moved on its own
            assert any(not torch.equal(before[k], v) for k, v in critic.model.state_dict().items())
    for a, b in zip(*weights):
        assert torch.equal(a, b)


def test_value_clipping_bounds_the_move_from_old_values():
    # a critic trained for several epochs on far targets: the clipped branch takes over (vf_clipfrac > 0)
    model, runner, critic, opt = make(shared=True, clip=0.01, lr=0.5)
    b = prepared_batch(model, critic)
    b = b.replace(extras={**b.extras, "returns": ops.zero_outside(b.extras["values"] + 5.0, b.response_mask)})
    m = policy_update(runner, opt, b, PPOClipLoss(), TokenMean(), settings(critic, ppo_epochs=3), step=1)
    assert float(m["critic/vf_clipfrac"]) > 0


@pytest.mark.parametrize("shared", [True, False])
def test_state_round_trip(shared):
    model, runner, critic, opt = make(shared=shared)
    b = prepared_batch(model, critic)
    policy_update(runner, opt, b, PPOClipLoss(), TokenMean(), settings(critic), step=1)
    buf = io.BytesIO()
    torch.save(critic.state_dict(), buf)  # checkpoints pickle it
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    fresh = Critic(model, runner, shared=shared, vf_coef=0.5, cliprange_value=0.2, learning_rate=1e-2)
    fresh.load_state_dict(saved)
    assert_close(fresh.state_dict()["head"], critic.state_dict()["head"])
    # one more identical step from both gives identical heads (the AdamW moments were restored)
    for c in (critic, fresh):
        grads = torch.ones(1, critic.head.in_features)
        c.head.weight.grad, c.head.bias.grad = grads.clone(), torch.ones(1)
        if c.model is not None:
            for p in c.params[2:]:
                p.grad = torch.ones_like(p)
        c.step()
    assert_close(fresh.head.weight, critic.head.weight)
    with pytest.raises(Exception, match="expected"):
        fresh.load_state_dict({"head": saved["head"]})


# --------------------------------------------------------------------------- a run with a critic resumes exactly
@pytest.mark.parametrize("model", ["shared", "separate"])
def test_run_with_a_critic_resumes_exactly(tmp_path, model):
    common = ["method=ppo", f"critic.model={model}", "output.progress=false", "output.plot=false",
              "eval.num_prompts=4", "eval.every=0", "train.ppo_epochs=2", "train.num_minibatches=2",
              "output.checkpoint_every=2", "rollout.prompts_per_step=4", "rollout.num_generations=4"]
    full = train(load_config(TINY, [*common, "train.steps=4", f"output.dir={tmp_path}", "output.run_name=full"]))
    part = [*common, f"output.dir={tmp_path}", "output.run_name=cut"]
    train(load_config(TINY, [*part, "train.steps=2"]))
    train(load_config(TINY, [*part, "train.steps=4"]), resume=True)
    a, b = read_metrics(full.run_dir / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = [k for k in a[-1] if k.startswith(("critic/", "reward/", "loss/", "eval/"))]
    assert any(k.startswith("critic/") for k in keys)
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
