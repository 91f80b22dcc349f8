"""The pipeline: needs validated when it is built, extension points resolved with their scoping rules, the data plan,
and no silent stand-in for a missing field at update time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from lmpo.config import load_config
from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.base import EXTENSION_POINTS, NEEDS, LossOut, Stateful
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.pipeline import KLPenalty, Pipeline, build_pipeline, data_plan, missing_needs
from lmpo.train.step import UpdateSettings, minibatch_loss

from factories import random_full_batch as random_batch


@dataclass(frozen=True)
class MisspeltLoss:
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprob"})  # the typo: old_logprobs

    def __call__(self, logprobs, batch):
        return LossOut(logprobs * 0)


def test_misspelt_need_fails_loudly_when_the_pipeline_is_built():
    with pytest.raises(ConfigError) as exc:
        Pipeline.assemble(advantage=GRPOAdvantage(), loss=MisspeltLoss(), aggregator=TokenMean())
    msg = str(exc.value)
    assert "'old_logprob'" in msg and 'Did you mean "old_logprobs"' in msg and "MisspeltLoss" in msg and "loss" in msg


def test_forward_needs_belong_to_the_policy_loss():
    @dataclass(frozen=True)
    class HiddenAdvantage:
        needs: ClassVar[frozenset[str]] = frozenset({"hidden_states"})

        def __call__(self, batch):
            return batch.response_mask.float()

    with pytest.raises(ConfigError, match="only a policy loss"):
        Pipeline.assemble(advantage=HiddenAdvantage(), loss=PPOClipLoss(), aggregator=TokenMean())


def test_every_registered_component_declares_known_needs():
    import lmpo.methods  # noqa: F401
    from lmpo.registry import ADVANTAGES, AGGREGATORS, LOSSES, PLANNERS, SELECTORS, SHAPERS

    for reg in (ADVANTAGES, LOSSES, AGGREGATORS, SELECTORS, SHAPERS, PLANNERS):
        for e in reg.entries():
            params = e.params
            obj = reg.build(e.name, **({"horizon": 8} if "horizon" in params else {}))
            assert set(getattr(obj, "needs", ())) <= set(NEEDS), (reg.kind, e.name)


class _Allocator:
    def __init__(self, n):
        self.n = n

    def allocate(self, keys, n):
        return [self.n] * len(keys)


def test_single_extension_point_admits_one_provider_and_many_points_keep_order():
    with pytest.raises(ConfigError, match="'allocate'.*only one provider"):
        Pipeline.assemble(planners=[_Allocator(1), _Allocator(2)])

    class Source:
        def __init__(self, tag):
            self.tag = tag

        def inject_prompts(self, n):
            return [{"prompt": self.tag}]

    a, b = Source("a"), Source("b")
    p = Pipeline.assemble(selectors=[a], planners=[b, a])  # a listed twice: one provider, first position
    assert [f(1)[0]["prompt"] for f in p.calls("inject_prompts")] == ["a", "b"]
    assert p.hook("allocate") is None and p.calls("observe") == []
    with pytest.raises(ValueError):
        p.hook("inject_prompts")  # a many-provider point is not read as a single hook


def test_a_hyper_parameter_named_like_a_point_provides_nothing():
    @dataclass(frozen=True)
    class FlagLoss:
        token_mask: bool = True  # e.g. CISPO's token-level mask flag
        needs: ClassVar[frozenset[str]] = frozenset()

    assert Pipeline.assemble(loss=FlagLoss()).hook("token_mask") is None


def test_extension_points_are_all_declared_with_a_scope():
    assert {"prompt_weights", "allocate", "plan_group", "prefix_budgets", "inject_prompts", "guide", "after_collect",
            "after_score", "observe", "token_mask", "value_targets", "lr_scale", "after_optimizer_step", "state_dict",
            } == set(EXTENSION_POINTS)
    singles = {n for n, e in EXTENSION_POINTS.items() if e.single}
    assert singles == {"prompt_weights", "allocate", "plan_group", "prefix_budgets", "guide", "token_mask",
                       "value_targets", "lr_scale"}


def test_stateful_components_are_found_and_keyed_by_role():
    class Counter(Stateful):
        def initial_state(self):
            return {"n": 0}

    c = Counter()
    p = Pipeline.assemble(advantage=GRPOAdvantage(), loss=PPOClipLoss(), aggregator=TokenMean(), shapers=[c])
    assert p.stateful() == {"shaper0": c}


def test_stateful_round_trip_is_a_deep_copy_and_checks_keys():
    class Counter(Stateful):
        def initial_state(self):
            return {"n": 0, "seen": []}

    a = Counter()
    a.state["n"] += 2
    a.state["seen"].append("x")
    saved = a.state_dict()
    a.state["seen"].append("y")  # later changes do not leak into the saved state
    b = Counter()
    b.load_state_dict(saved)
    assert b.state == {"n": 2, "seen": ["x"]} and saved == {"n": 2, "seen": ["x"]}
    with pytest.raises(DataError, match="expected \\['n', 'seen'\\]"):
        b.load_state_dict({"n": 1})


@pytest.mark.parametrize("epochs,minibatches,kl,needs,expect", [
    # on-policy: pi_old comes from the update's own forward; no extra pass
    (1, 1, None, {"old_logprobs"}, dict(on_policy=True, old_pass=False, old_from_forward=True, ref_logprobs=False)),
    # several optimizer steps per batch: a no-grad pass before the update
    (2, 1, None, {"old_logprobs"}, dict(on_policy=False, old_pass=True, old_logprobs=True, old_from_forward=False)),
    (1, 2, None, {"old_logprobs"}, dict(on_policy=False, old_pass=True, old_logprobs=True)),
    # a loss that reads no pi_old gets none, whatever the schedule
    (2, 1, None, set(), dict(old_pass=False, old_logprobs=False, old_from_forward=False)),
    # KL in the rewards needs pi_old before the update even on-policy; the reference whenever KL is on
    (1, 1, KLPenalty(0.1, "k1", True), {"old_logprobs"}, dict(old_pass=True, old_from_forward=True, ref_logprobs=True)),
    (1, 1, KLPenalty(0.1, "k3", False), set(), dict(old_pass=False, ref_logprobs=True)),
    # a component asking for the reference gets it without a KL penalty; entropies ride on the old pass
    (1, 1, None, {"ref_logprobs", "entropy"}, dict(ref_logprobs=True, old_pass=True, entropy=True)),
    # full-distribution statistics of pi_old only under several optimizer steps
    (2, 1, None, {"vocab_mean_logprobs"}, dict(old_stats=frozenset({"vocab_mean_logprobs"}))),
    (1, 1, None, {"vocab_mean_logprobs"}, dict(old_stats=frozenset())),
])
def test_data_plan(epochs, minibatches, kl, needs, expect):
    plan = data_plan(frozenset(needs), kl, epochs, minibatches)
    for key, value in expect.items():
        assert getattr(plan, key) == value, key


def test_config_errors_name_what_breaks():
    with pytest.raises(ConfigError, match="candidate_logprobs.*rollout.mode"):
        load_config("configs/tiny.yaml", ["loss={name: otr}"])  # the sampler gives no candidates
    cfg = load_config("configs/tiny.yaml", ["method=knapsack_grpo"])
    assert build_pipeline(cfg).hook("allocate") is not None  # the knapsack planner allocates budgets
    with pytest.raises(ConfigError, match='Unknown selector "knapsack"'):
        load_config("configs/tiny.yaml", ["selectors=[{name: knapsack}]"])  # a planner is not a selector


class _LinearRunner:
    """A one-parameter 'policy' (log p = sampler log-probs + theta) for minibatch_loss."""

    def __init__(self):
        self.theta = torch.nn.Parameter(torch.zeros(()))

    def for_loss(self, batch, needs, loss_fn):
        return self

    def logprobs(self, batch, with_entropy=False, entropy_grad=True):
        lp = batch.sampler_logprobs + self.theta
        return lp, torch.zeros_like(lp)

    def forward(self, batch, with_entropy=False, entropy_grad=True, hidden=False):
        return (*self.logprobs(batch, with_entropy, entropy_grad), None)


def test_missing_old_logprobs_off_policy_is_an_error_not_a_ratio_of_one():
    b = random_batch(seed=0).replace(old_logprobs=None)
    b = b.replace(advantages=torch.ones_like(b.sampler_logprobs))
    norm = torch.tensor(float(b.response_mask.sum()))
    off_policy = UpdateSettings(ppo_epochs=2)
    with pytest.raises(DataError, match='loss "PPOClipLoss" needs old_logprobs'):
        minibatch_loss(_LinearRunner(), b, PPOClipLoss(), TokenMean(), off_policy, norm)
    # on-policy the update's own forward is pi_old (ratio exactly 1 by construction, documented in DataPlan)
    loss, metrics = minibatch_loss(_LinearRunner(), b, PPOClipLoss(), TokenMean(), UpdateSettings(), norm)
    assert metrics["loss/clip_frac"] == 0 and torch.isfinite(loss)


def test_missing_needs_lists_fields_and_extras():
    b = random_batch(seed=1).replace(old_logprobs=None, ref_logprobs=None)
    assert missing_needs(b, frozenset({"old_logprobs", "ref_logprobs", "entropy", "sampler_logprobs"})) == \
        ["old_logprobs", "ref_logprobs", "entropy"]
    b = b.replace(extras={"entropy": torch.zeros_like(b.sampler_logprobs)})
    assert missing_needs(b, frozenset({"entropy", "hidden_states"})) == []  # forward needs are served later
