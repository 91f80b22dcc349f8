"""AdamW folded into backward (lmpo.engine.inbackward) against the plain path: loss.backward(), clip_grad_norm_,
torch.optim.AdamW(fused=True).step(); no gradient buffers; one loss evaluation per step; torch's state format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmpo.config import load_config
from lmpo.errors import ConfigError
from lmpo.engine.kernels import rowdot
from lmpo.train.checkpoint import latest_checkpoint
from lmpo.engine.inbackward import BackwardAdamW, unsupported

V = 40


class Net(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Embedding(V, 12), torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, V))
        self.extra = torch.nn.ModuleDict({"unused": torch.nn.Linear(3, 3)})  # never reached: no gradient, no state

    def forward(self, x):
        for i in range(4):
            x = self[i](x)
        return x

    @property
    def unused(self):
        return self.extra["unused"]


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Net()


def loss_of(m, x, scale):
    return scale * F.cross_entropy(m(x).reshape(-1, V), x.reshape(-1))


def groups(m, lr=1e-2, wd=0.0):
    return [{"params": [m[0].weight, m.unused.weight, m.unused.bias], "lr": lr},
            {"params": [p for k, p in m.named_parameters() if not k.startswith(("0.", "extra"))], "lr": lr / 3,
             "weight_decay": wd}]


def run_pair(scales, max_norm, wd=0.0, steps_seed=1):
    """Both paths over the same batches; returns (plain model, optimizer, norms), (backward model, optimizer, norms)."""
    a, b = model(), model()
    oa = torch.optim.AdamW(groups(a, wd=wd), betas=(0.8, 0.99), fused=True)
    ob = torch.optim.AdamW(groups(b, wd=wd), betas=(0.8, 0.99), fused=True)
    inb = BackwardAdamW(ob)
    gen = torch.Generator().manual_seed(steps_seed)
    na, nb = [], []
    for s in scales:
        x = torch.randint(0, V, (4, 6), generator=gen)
        loss_of(a, x, s).backward()
        na.append(torch.nn.utils.clip_grad_norm_(list(a.parameters()), max_norm or float("inf")))
        oa.step()
        oa.zero_grad(set_to_none=True)
        nb.append(inb.backward(loss_of(b, x, s), max_norm))
        inb.step()
    return (a, oa, na), (b, ob, nb, inb)


def assert_close(a, oa, b, ob, rtol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=rtol, atol=rtol * pa.abs().max().item()), name
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, (name, k)
            assert torch.allclose(sa[k], sb[k], rtol=rtol, atol=rtol * sa[k].abs().max().item()), (name, k)


@pytest.mark.parametrize("max_norm,scales,wd", [
    (1.0, [0.01 * (i + 1) for i in range(5)], 0.0),   # never clips: the first pass alone
    (None, [3.0 * (i + 1) for i in range(5)], 0.1),   # no clipping configured, weight decay on one group
    (1.0, [40.0 * (i + 1) for i in range(5)], 0.0),   # clips every step with a changing factor: replays
    (0.5, [0.05, 3.0, 0.05, 6.0, 6.0, 0.05], 0.01),   # alternating: replays only where the factor changed
])
def test_matches_clip_then_adamw(max_norm, scales, wd):
    (a, oa, na), (b, ob, nb, inb) = run_pair(scales, max_norm, wd)
    assert torch.allclose(torch.stack(na), torch.stack(nb), rtol=1e-6)
    assert_close(a, oa, b, ob, rtol=2e-6)
    assert not ob.state.get(b.unused.weight) and b.unused.weight.grad is None
    assert all(p.grad is None for p in b.parameters())
    clipped = [max_norm is not None and float(n) > max_norm for n in na]
    # a replay exactly where the factor differs from the guess: every clipped step and the step after one
    assert inb.replays == sum(c or p for c, p in zip(clipped, [False] + clipped[:-1]))


def test_zero_gradient_needs_no_replay_and_keeps_the_guess():
    """All-equal rewards give a zero gradient: folded exactly whatever the clip factor, so no second backward."""
    (a, oa, na), (b, ob, nb, inb) = run_pair([40.0, 0.0, 0.0, 40.0], 1.0)
    assert [float(n) == 0 for n in na] == [False, True, True, False]
    assert inb.replays == 2  # the two clipped steps only; the guess survives the zero steps
    assert_close(a, oa, b, ob, rtol=2e-6)


def test_sudden_strong_clip_stays_within_the_documented_bound():
    """From c = 1 to c ~ 0.003 in one step: the recovered second moment is off by ~1e-7 / c^2 at worst (module doc)."""
    scales = [0.02, 0.03, 0.02, 300.0]
    (a, oa, na), (b, ob, nb, inb) = run_pair(scales, 1.0)
    c = 1.0 / float(na[-1])
    assert c < 0.01 and inb.replays == 1
    for pa, pb in zip(a.parameters(), b.parameters()):
        va, vb = oa.state.get(pa, {}).get("exp_avg_sq"), ob.state.get(pb, {}).get("exp_avg_sq")
        if va is None:
            continue
        assert ((va - vb).abs() <= 1e-6 * va.abs().max() / c**2 + 1e-12).all()
    assert_close(a, oa, b, ob, rtol=1e-3)


def test_never_more_than_one_gradient_alive():
    m = model()
    inb = BackwardAdamW(torch.optim.AdamW(m.parameters(), fused=True))
    alive = []
    first = inb._first

    def counting(p):
        alive.append(sum(q.grad is not None for q in m.parameters()))
        first(p)

    inb._first = counting
    inb.backward(loss_of(m, torch.randint(0, V, (2, 5)), 1.0), 1.0)
    assert alive and max(alive) == 1


def test_replay_does_not_evaluate_the_loss_again():
    m = model()
    inb = BackwardAdamW(torch.optim.AdamW(m.parameters(), fused=True))
    calls = []
    m[0].register_forward_hook(lambda *a: calls.append(1))
    inb.backward(loss_of(m, torch.randint(0, V, (2, 5)), 1e4), 1e-3)  # clips hard: a replay
    assert inb.replays == 1 and len(calls) == 1


def test_state_loads_into_plain_adamw_and_continues_identically():
    scales = [1.0, 2.0, 3.0]
    (a, oa, _), (b, ob, _, _) = run_pair(scales, 1.0)
    c = model()
    c.load_state_dict(b.state_dict())
    oc = torch.optim.AdamW(groups(c), betas=(0.8, 0.99), fused=True)
    oc.load_state_dict(ob.state_dict())
    x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(5))
    for m, o in ((a, oa), (c, oc)):
        loss_of(m, x, 1.0).backward()
        torch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0)
        o.step()
    assert_close(a, oa, c, oc, rtol=2e-6)


def test_non_finite_gradient_returns_its_norm_and_leaves_weights():
    m = model()
    inb = BackwardAdamW(torch.optim.AdamW(m.parameters(), fused=True))
    before = [p.detach().clone() for p in m.parameters()]
    norm = inb.backward(m(torch.tensor([[1, 2]])).sum() * float("inf"), 1.0)
    assert not torch.isfinite(norm)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)) and all(p.grad is None for p in m.parameters())


def test_unsupported_optimizers_are_named():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert unsupported(torch.optim.AdamW(p)) is None
    assert "AdamW" in unsupported(torch.optim.SGD(p, lr=0.1))
    assert "amsgrad" in unsupported(torch.optim.AdamW(p, amsgrad=True))
    with pytest.raises(ValueError, match="optimizer_in_backward"):
        BackwardAdamW(torch.optim.Adam(p))


def test_auto_applies_only_with_checkpointing_and_many_trainable_weights():
    from lmpo.engine.inbackward import wanted
    big, small = [torch.zeros(10_000_000)], [torch.zeros(10)]
    assert wanted("auto", big, True)
    assert not wanted("auto", big, False) and not wanted("auto", small, True)
    assert wanted(True, small, False) and not wanted(False, big, True)


def test_config_values_and_micro_batch_conflict():
    assert load_config(overrides=[]).train.optimizer_in_backward == "auto"
    with pytest.raises(ConfigError, match="optimizer_in_backward must be auto, true or false"):
        load_config(overrides=["train.optimizer_in_backward=maybe"])
    with pytest.raises(ConfigError, match="unset train.micro_batch_size"):
        load_config(overrides=["train.optimizer_in_backward=true", "rollout.prompts_per_step=2",
                               "rollout.num_generations=4", "train.micro_batch_size=4"])
    load_config(overrides=["train.optimizer_in_backward=true", "rollout.prompts_per_step=2",
                           "rollout.num_generations=4", "train.micro_batch_size=8"])


@pytest.mark.parametrize("ckpt", ["false", "attention", "true"])
def test_trainer_with_it_matches_the_plain_step(tmp_path, ckpt):
    """Three steps of the tiny task (clipping at 0.05 so the replay runs too), without and with recomputation in
    backward (the replay then recomputes again): same metrics and weights."""
    from lmpo.train.loop import train

    common = [f"model.gradient_checkpointing={ckpt}", "train.steps=3", "eval.num_prompts=0", "eval.at_start=false", "eval.every=0", "train.max_grad_norm=0.05",
              "output.checkpoint_every=0", "output.plot=false", "output.progress=false", f"output.dir={tmp_path}",
              "rollout.prompts_per_step=4", "rollout.num_generations=4"]
    runs = {}
    for mode in ("false", "true"):
        cfg = load_config("configs/tiny.yaml", [*common, f"train.optimizer_in_backward={mode}", f"output.run_name=run_{mode}"])
        runs[mode] = train(cfg)
    plain, inb = (runs[k].history for k in ("false", "true"))
    assert [r["reward/mean"] for r in plain] == [r["reward/mean"] for r in inb]
    for ra, rb in zip(plain, inb):
        assert ra["loss/grad_norm"] == pytest.approx(rb["loss/grad_norm"], rel=1e-5)
        assert ra["loss/total"] == pytest.approx(rb["loss/total"], rel=1e-5, abs=1e-7)
    assert sum(r["perf/backward_replays"] for r in inb) >= 1 and "perf/backward_replays" not in plain[0]
    weights = [torch.load(latest_checkpoint(runs[k].run_dir) / "model.pt") for k in ("false", "true")]
    for name, w in weights[0].items():  # lr 1e-2; step 2 jumps from c = 1 to c = 0.03: within 1e-3 of one step
        assert torch.allclose(w, weights[1][name], rtol=0, atol=1e-5), name


def test_resumed_run_folds_like_the_uninterrupted_one(tmp_path):
    """The clip-factor guess travels in the checkpoint: 2 + 2 resumed steps equal 4 straight ones."""
    from lmpo.train.loop import train

    common = ["train.optimizer_in_backward=true", "train.max_grad_norm=0.05", "eval.num_prompts=0",
              "eval.at_start=false", "eval.every=0", "output.plot=false", "output.progress=false",
              f"output.dir={tmp_path}", "rollout.prompts_per_step=4", "rollout.num_generations=4",
              "output.checkpoint_every=2"]
    full = train(load_config("configs/tiny.yaml", [*common, "train.steps=4", "output.run_name=full"])).history
    train(load_config("configs/tiny.yaml", [*common, "train.steps=2", "output.run_name=cut"]))
    cut = train(load_config("configs/tiny.yaml", [*common, "train.steps=4", "output.run_name=cut"]),
                resume=True).history
    saved = torch.load(latest_checkpoint(tmp_path / "cut") / "state.pt", weights_only=False)["components"]
    assert 0 < saved["optimizer_in_backward"]["guess"] < 1  # the last step clipped: its factor is the next guess
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    assert sum(r["perf/backward_replays"] for r in full) >= 2
    for a, b in zip(full, cut):
        for k in ("loss/grad_norm", "loss/total", "reward/mean", "perf/backward_replays"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)


@pytest.mark.skipif(not rowdot.available(), reason="the native kernels are unavailable here")
def test_weight_update_kernel_equals_torch_operations(monkeypatch):
    """The one-pass weight update (lmpo.engine.kernels.rowdot.adam_apply) against the element-wise torch path."""
    calls = []
    real = rowdot.adam_apply
    monkeypatch.setattr(rowdot, "adam_apply", lambda *a: calls.append(1) or real(*a))
    kernel = run_pair([0.05, 3.0, 0.05], 0.5, wd=0.01)[1]
    assert kernel[3].kernel is True and calls  # the kernel really ran
    monkeypatch.setattr("lmpo.engine.kernels.rowdot.available", lambda: False)
    plain = run_pair([0.05, 3.0, 0.05], 0.5, wd=0.01)[1]
    assert plain[3].kernel is False
    assert_close(kernel[0], kernel[1], plain[0], plain[1], rtol=1e-6)
