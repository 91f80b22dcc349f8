"""Asynchronous off-policy training (``train.async``, lmpo.train.async_rollouts): k = 0 equals the synchronous
trainer bit for bit; batches carry the version that sampled them and are never staler than k; their sampler
log-probs are that version's, not the current policy's; timing never changes a run; a run interrupted with batches
in flight resumes exactly, nothing lost and nothing used twice."""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import pytest
import torch

import lmpo.train.async_rollouts as async_rollouts
import lmpo.train.loop as loop
from lmpo import ops
from lmpo.config import load_config, save_config
from lmpo.errors import ConfigError, LmpoError
from lmpo.train.checkpoint import latest_checkpoint
from lmpo.train.step import PolicyRunner

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["eval.num_prompts=0", "eval.at_start=false", "eval.every=0", "output.plot=false", "output.progress=false",
         "rollout.prompts_per_step=4", "rollout.num_generations=4", "train.threads=1"]
LEARNED = ("reward/", "loss/", "rollout/")  # what a run learns and samples (perf/* and async/wait_s are timings)


def config(tmp_path, name, *overrides, steps=4):
    return load_config(TINY, [*QUIET, f"output.dir={tmp_path}", f"output.run_name={name}", f"train.steps={steps}",
                              *overrides])


def learned(history):
    return [{k: v for k, v in row.items() if k.startswith(LEARNED)} for row in history]


def weights(run_dir):
    return torch.load(latest_checkpoint(run_dir) / "model.pt")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def spy(monkeypatch):
    """Records, for every prepared batch, the batch and the trainer's trainable weights at that moment (the
    version before the step's update); ``fail_at`` raises inside the given step (after its batch left the queue)."""
    seen = {"batches": [], "weights": [], "model": None, "fail_at": None}
    real = loop.prepare

    def prepare(batch, p, runner, ref, mbs, *args, **kw):
        if seen["fail_at"] is not None and len(seen["batches"]) + 1 == seen["fail_at"]:
            seen["fail_at"] = None
            raise RuntimeError("interrupted")
        seen["batches"].append(batch)
        seen["weights"].append({n: w.detach().clone() for n, w in runner.model.named_parameters()})
        seen["model"] = runner.model
        return real(batch, p, runner, ref, mbs, *args, **kw)

    monkeypatch.setattr(loop, "prepare", prepare)
    return seen


# ------------------------------------------------------------------ config
def test_config_key_is_train_async(tmp_path):
    assert config(tmp_path, "r").train.async_ is None  # synchronous by default
    cfg = config(tmp_path, "r", "train.async.max_staleness=2")
    assert cfg.train.async_.max_staleness == 2
    assert cfg.to_dict()["train"]["async"] == {"max_staleness": 2} and "async_" not in cfg.to_dict()["train"]
    save_config(cfg, tmp_path / "saved.yaml")  # the resolved config a run saves loads back as it was
    assert load_config(tmp_path / "saved.yaml").to_dict() == cfg.to_dict()
    assert config(tmp_path, "r", "train.async={}").train.async_.max_staleness == 1
    assert config(tmp_path, "r", "train.async.max_staleness=2", "train.async=null").train.async_ is None
    for bad, msg in (("train.async.max_staleness=-1", "train.async.max_staleness must be >= 0"),
                     ("train.async=2", "train.async .*must be a mapping of keys or null"),
                     ("train.async.staleness=2", 'Unknown config key "train.async.staleness".*max_staleness'),
                     ("train.asinc.max_staleness=1", 'Did you mean "async"')):
        with pytest.raises(ConfigError, match=msg):
            config(tmp_path, "r", bad)


def test_collection_that_learns_from_training_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r'train.async cannot run this config: advantage "SPO.*prompt_weights.*'
                                          r'train.async.max_staleness=1'):
        config(tmp_path, "r", "method=spo", "train.async.max_staleness=1")
    with pytest.raises(ConfigError, match="rollout.mode='reference'.*rollout.mode=sample"):
        config(tmp_path, "r", "rollout.mode=reference", "loss={name: otr}", "train.async.max_staleness=1")


# ------------------------------------------------------------------ k = 0
def test_k0_equals_the_synchronous_trainer_bit_for_bit(tmp_path):
    sync = loop.train(config(tmp_path, "sync"))
    k0 = loop.train(config(tmp_path, "k0", "train.async.max_staleness=0"))
    assert learned(k0.history) == learned(sync.history)  # exact equality of every float
    assert [r["async/staleness"] for r in k0.history] == [0.0] * 4
    assert [r["async/policy_version"] for r in k0.history] == [0.0, 1.0, 2.0, 3.0]
    assert_same_weights(weights(sync.run_dir), weights(k0.run_dir))


# ------------------------------------------------------------------ versions, staleness, behaviour log-probs
def test_versions_staleness_bound_and_behaviour_logprobs(tmp_path, spy):
    k, steps = 2, 6
    res = loop.train(config(tmp_path, "k2", f"train.async.max_staleness={k}", steps=steps))
    versions = [int(r["async/policy_version"]) for r in res.history]
    assert versions == [max(0, t - 1 - k) for t in range(1, steps + 1)] == [0, 0, 0, 1, 2, 3]
    assert [r["async/staleness"] for r in res.history] == [0, 1, 2, 2, 2, 2]  # never above k
    assert all(0 <= r["async/queue_depth"] <= k for r in res.history)
    # each batch's sampler log-probs are those of the version it is tagged with, recomputed here from that
    # version's weights, and differ from the current policy's (the trainer's before the step's update) once stale
    model = copy.deepcopy(spy["model"])
    runner = PolicyRunner(model, packed=False)

    def logprobs(state, batch):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])
        return runner.logprobs_nograd(batch, None)

    for t, (batch, version) in enumerate(zip(spy["batches"], versions), start=1):
        mask = batch.response_attn
        behaviour = logprobs(spy["weights"][version], batch)
        for field in ("sampler_logprobs", "old_logprobs"):  # pi_old is the sampling version too (behaviour_pass)
            assert ops.zero_outside(behaviour - getattr(batch, field), mask).abs().max() < 1e-4, (t, field)
        current = logprobs(spy["weights"][t - 1], batch)
        gap = ops.zero_outside(current - batch.old_logprobs, mask).abs().max()
        assert gap > 1e-2 if t - 1 > version else gap < 1e-4, (t, float(gap))


def test_off_policy_losses_see_the_staleness(tmp_path):
    """On-policy (k = 0) pi / pi_old is exactly 1 at the update; with k = 1 it is the ratio to the policy one update
    old. TIS's sampler correction compares the sampler with pi_old of the same version: float rounding either way."""
    common = ["method=tis", "train.learning_rate=0.05"]
    k0 = loop.train(config(tmp_path, "k0", *common, "train.async.max_staleness=0")).history
    k1 = loop.train(config(tmp_path, "k1", *common, "train.async.max_staleness=1")).history
    assert [r["loss/ratio_mean"] for r in k0] == [1.0] * 4
    assert k1[0]["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # step 1 is fresh (version 0)
    assert all(abs(r["loss/ratio_mean"] - 1.0) > 1e-3 for r in k1[2:]), [r["loss/ratio_mean"] for r in k1]
    assert max(r["loss/mismatch_k3"] for r in k0 + k1) < 1e-6


# ------------------------------------------------------------------ timing
def test_thread_timing_never_changes_a_run(tmp_path, monkeypatch):
    cfg = ["train.async.max_staleness=2", "train.num_minibatches=2"]  # the trainer draws random numbers too
    plain = loop.train(config(tmp_path, "plain", *cfg, steps=5))
    jitter = random.Random(0)
    real_collect, real_update = async_rollouts.collect, loop.policy_update

    def slow_collect(*a, **kw):  # the producer sometimes lags, sometimes runs ahead
        time.sleep(jitter.choice([0.0, 0.05, 0.2]))
        return real_collect(*a, **kw)

    def slow_update(*a, **kw):
        time.sleep(jitter.choice([0.0, 0.05, 0.2]))
        return real_update(*a, **kw)

    monkeypatch.setattr(async_rollouts, "collect", slow_collect)
    monkeypatch.setattr(loop, "policy_update", slow_update)
    jittered = loop.train(config(tmp_path, "jittered", *cfg, steps=5))
    assert learned(jittered.history) == learned(plain.history)
    assert_same_weights(weights(plain.run_dir), weights(jittered.run_dir))


# ------------------------------------------------------------------ checkpoint / resume
def completions(batches):
    return [[m["prompt"] + "|" + m["completion"] for m in b.meta] for b in batches]


def test_resume_with_batches_in_flight_equals_the_uninterrupted_run(tmp_path, spy):
    common = ["train.async.max_staleness=2", "output.checkpoint_every=3"]
    full = loop.train(config(tmp_path, "full", *common, steps=6))
    full_batches = completions(spy["batches"])
    spy["batches"].clear()
    spy["fail_at"] = 4  # step 4 takes its batch from the queue, then the run dies
    with pytest.raises(RuntimeError, match="interrupted"):
        loop.train(config(tmp_path, "cut", *common, steps=6))
    before = completions(spy["batches"])
    saved = torch.load(latest_checkpoint(tmp_path / "cut") / "state.pt", weights_only=False)
    assert saved["step"] == 3 and [c["step"] for c in saved["async"]["queue"]] == [4, 5]  # in flight at step 3
    assert [c["version"] for c in saved["async"]["queue"]] == [1, 2]
    spy["batches"].clear()
    resumed = loop.train(config(tmp_path, "cut", *common, steps=6), resume=True)
    after = completions(spy["batches"])
    assert before + after == full_batches  # every batch used once, in order: none lost, none repeated
    assert [r["step"] for r in resumed.history] == [r["step"] for r in full.history]
    assert learned(resumed.history) == learned(full.history)
    assert [r["async/policy_version"] for r in resumed.history] == [r["async/policy_version"] for r in full.history]
    assert_same_weights(weights(full.run_dir), weights(resumed.run_dir))


def test_resume_with_another_staleness_is_refused(tmp_path):
    loop.train(config(tmp_path, "r", "train.async.max_staleness=2", "output.checkpoint_every=2", steps=2))
    with pytest.raises(LmpoError, match="max_staleness=2.*max_staleness=1 would lose or repeat batches"):
        loop.train(config(tmp_path, "r", "train.async.max_staleness=1", steps=4), resume=True)
    with pytest.raises(LmpoError, match="written by an asynchronous run .*max_staleness=2"):
        loop.train(config(tmp_path, "r", steps=4), resume=True)
    loop.train(config(tmp_path, "s", "output.checkpoint_every=2", steps=2))
    with pytest.raises(LmpoError, match="written by a synchronous run"):
        loop.train(config(tmp_path, "s", "train.async.max_staleness=1", steps=4), resume=True)


def test_a_finished_run_extended_samples_its_new_steps_from_the_restored_weights(tmp_path):
    loop.train(config(tmp_path, "r", "train.async.max_staleness=2", steps=2))
    more = loop.train(config(tmp_path, "r", "train.async.max_staleness=2", steps=5), resume=True).history
    assert [r["async/policy_version"] for r in more] == [0, 0, 2, 2, 2]  # steps 3, 4 could not have versions 0, 1
    assert all(r["async/staleness"] <= 2 for r in more)


@pytest.mark.parametrize("sampler", ["multinomial", "inverse_cdf"])
def test_generator_draws_only_from_its_own_rng(sampler):
    """The producer's sampler (HFGenerator.rng) neither reads nor advances the global RNG the trainer draws from."""
    from lmpo.models.load import load_model
    from lmpo.rollout.base import SamplingParams
    from lmpo.rollout.hf import HFGenerator

    model, tok = load_model("tiny", seed=0)
    gen = HFGenerator(model, tok, sampler=sampler)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    prompts = ["1=", "2=", "3="] * 4
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen.rng = torch.Generator().manual_seed(7)
        outs.append(gen.generate(prompts, params).response_ids)
        after = torch.rand(3)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(3))  # the global stream was not advanced
    assert torch.equal(outs[0], outs[1])
    gen.rng = torch.Generator().manual_seed(8)
    assert not torch.equal(gen.generate(prompts, params).response_ids, outs[0])
