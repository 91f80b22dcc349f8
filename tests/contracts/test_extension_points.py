"""Contracts of the extension points over every registered provider, and proof that each contract can fail: a
deliberately broken component of each kind is registered for the duration of a test and must be caught."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import lmpo.methods  # noqa: F401  (registers components)
from lmpo.methods.base import BudgetAllocator, LossOut, Stateful, StatefulComponent, ValueTargets
from lmpo.pipeline import Pipeline
from lmpo.registry import ADVANTAGES, LOSSES, PLANNERS, SELECTORS, SHAPERS, Registry

from contracts import test_components as kinds

KINDS = (ADVANTAGES, LOSSES, SELECTORS, SHAPERS, PLANNERS)
ROLE = {"advantage": "advantage", "loss": "loss", "selector": "selectors", "shaper": "shapers", "planner": "planners"}


def providers(protocol) -> list[tuple[Registry, str]]:
    return [(reg, name) for reg in KINDS for name in reg.names() if isinstance(kinds.build(reg, name), protocol)]


def exercise(reg: Registry, comp, seed: int = 0) -> None:
    """Run a component once the way the trainer would, so its state moves."""
    b = kinds.batch_for(reg, _name_of(reg, comp), seed=seed)
    b.meta = [{"prompt_key": f"p{int(g)}", "completion": "7", "prompt": "q"} for g in b.group_ids]
    if reg is LOSSES:
        comp(b.old_logprobs.clone().requires_grad_(True), b)
    elif reg is not PLANNERS:
        comp(b)
    p = Pipeline.assemble(**{ROLE[reg.kind]: comp if reg.kind in ("advantage", "loss") else [comp]})
    if p.hook("token_mask") is not None:
        p.hook("token_mask")(b.replace(advantages=comp(b)) if reg is ADVANTAGES else b)
    for observe in p.calls("observe"):
        observe(b, lambda x: x.sampler_logprobs)
    for hook in p.calls("after_optimizer_step"):
        hook()


def _name_of(reg: Registry, comp) -> str:
    return next(e.name for e in reg.entries() if isinstance(comp, e.obj))


def check_state_round_trip(reg: Registry, name: str) -> None:
    comp = kinds.build(reg, name)
    exercise(reg, comp, seed=0)
    saved = comp.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)  # checkpoints pickle it
    exercise(reg, comp, seed=1)  # later steps must not change what was saved
    buf.seek(0)
    assert torch.load(buf, weights_only=False) == saved, "state_dict() must be a snapshot, not a live reference"
    fresh = kinds.build(reg, name)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved, "load_state_dict(state_dict()) must restore the same state"


def check_allocator(reg: Registry, name: str) -> None:
    comp = kinds.build(reg, name)
    keys = [f"p{i}" for i in range(5)]
    for n in (1, 4, 8):
        counts = comp.allocate(keys, n)
        assert len(counts) == len(keys) and all(isinstance(c, int) and c >= 1 for c in counts), counts
        assert sum(counts) <= n * len(keys), f"allocate spent {sum(counts)} > its budget {n * len(keys)}"


@pytest.mark.parametrize("reg,name", providers(StatefulComponent), ids=lambda x: getattr(x, "kind", x))
def test_state_round_trip(reg, name):
    check_state_round_trip(reg, name)


@pytest.mark.parametrize("reg,name", providers(BudgetAllocator), ids=lambda x: getattr(x, "kind", x))
def test_allocator_stays_within_its_budget(reg, name):
    check_allocator(reg, name)


def check_value_targets(reg: Registry, name: str) -> None:
    """The critic's targets: (B, T) float, 0 off the mask, unchanged by padding, equivariant to row permutations,
    finite when every reward is equal."""
    from factories import pad_columns, permute

    comp = kinds.build(reg, name)
    b = kinds.batch_for(reg, name, seed=4)
    t = comp.value_targets(b)
    assert t.shape == b.response_mask.shape and t.dtype == torch.float32, "value_targets must be (B, T) float32"
    assert torch.all(t[~b.response_mask] == 0), "value_targets must be 0 off the mask"
    padded = comp.value_targets(pad_columns(b, 2))
    assert torch.allclose(padded[:, : t.shape[1]], t) and torch.all(padded[:, t.shape[1]:] == 0)
    pb, perm = permute(b)
    assert torch.allclose(comp.value_targets(pb), t[perm])
    assert torch.isfinite(comp.value_targets(kinds.batch_for(reg, name, equal_rewards=True))).all()


@pytest.mark.parametrize("reg,name", providers(ValueTargets), ids=lambda x: getattr(x, "kind", x))
def test_value_targets(reg, name):
    check_value_targets(reg, name)


# --------------------------------------------------------------------------- the contracts can fail
@contextlib.contextmanager
def registered(reg: Registry, cls):
    name = f"broken_{cls.__name__.lower()}"
    reg.register(name, paper="a deliberately broken component", arxiv="none")(cls)
    try:
        yield name
    finally:
        reg._entries.pop(name)


@dataclass(frozen=True)
class LeakyAdvantage:  # non-zero advantages on masked tokens
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch):
        return batch.rewards[:, None].expand_as(batch.response_mask).float() + 1.0


@dataclass(frozen=True)
class GradIntoOldLoss:  # lets the gradient reach pi_old (a forgotten detach)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs, batch):
        ratio = torch.exp(logprobs - batch.old_logprobs)
        return LossOut(torch.where(batch.response_mask, -ratio * batch.advantages, 0.0))


@dataclass(frozen=True)
class FloatSelector:  # returns weights instead of a keep mask
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch):
        return batch.rewards.clone()


@dataclass(frozen=True)
class MaskWideningShaper:  # trains on padding
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch):
        return batch.replace(response_mask=torch.ones_like(batch.response_mask))


@dataclass
class LiveStateShaper(Stateful):  # hands out its live state instead of a snapshot
    needs: ClassVar[frozenset[str]] = frozenset()

    def initial_state(self):
        return {"calls": [0]}

    def state_dict(self):
        return self.state

    def __call__(self, batch):
        self.state["calls"][0] += 1
        return batch


@dataclass(frozen=True)
class PaddedTargetsAdvantage:  # critic targets on padding
    needs: ClassVar[frozenset[str]] = frozenset({"values"})

    def __call__(self, batch):
        return torch.zeros(batch.response_mask.shape)

    def value_targets(self, batch):
        return batch.rewards[:, None].expand_as(batch.response_mask).float() + 1.0


@dataclass
class OverspendingPlanner:  # allocates more rollouts than the batch budget
    def allocate(self, keys, n):
        return [n + 1] * len(keys)


def test_each_contract_catches_a_broken_component():
    with registered(ADVANTAGES, LeakyAdvantage) as name, pytest.raises(AssertionError):
        kinds.TestAdvantage().test_shape_dtype_and_mask(name)
    with registered(LOSSES, GradIntoOldLoss) as name, pytest.raises(AssertionError, match="gradient reached"):
        kinds.TestPolicyLoss().test_no_gradient_into_fixed_logprobs(name)
    with registered(SELECTORS, FloatSelector) as name, pytest.raises(AssertionError):
        kinds.test_selector_contract(name)
    with registered(SHAPERS, MaskWideningShaper) as name, pytest.raises(AssertionError, match="only remove"):
        kinds.test_shaper_contract(name)
    with registered(SHAPERS, LiveStateShaper) as name, pytest.raises(AssertionError, match="snapshot"):
        check_state_round_trip(SHAPERS, name)
    with registered(PLANNERS, OverspendingPlanner) as name, pytest.raises(AssertionError, match="budget"):
        check_allocator(PLANNERS, name)
    with registered(ADVANTAGES, PaddedTargetsAdvantage) as name, pytest.raises(AssertionError, match="off the mask"):
        check_value_targets(ADVANTAGES, name)
    assert all("broken_" not in n for reg in KINDS for n in reg.names())  # nothing left behind
