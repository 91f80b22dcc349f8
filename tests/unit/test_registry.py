"""lmpo.registry: names, build, nearest-match errors and Entry.params."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

import lmpo.methods  # noqa: F401  (registers components)
from lmpo.errors import ConfigError
from lmpo.registry import ADVANTAGES, AGGREGATORS, ALL_REGISTRIES, LOSSES, PLANNERS, SELECTORS, SHAPERS, Registry


def make_registry() -> Registry:
    reg = Registry("widget")

    @reg.register("spinner", paper="A paper", arxiv="0000.00000")
    @dataclass(frozen=True)
    class Spinner:
        """Spins things.

        Longer description.
        """

        speed: float = 1.5
        tags: list = field(default_factory=lambda: ["a"])
        label: str = field(default="x")
        internal: int = field(default=0, init=False)
        needs: ClassVar[frozenset[str]] = frozenset()

        def __post_init__(self) -> None:
            if self.speed < 0:
                raise ValueError("speed must be >= 0")

    @reg.register("required_widget", paper="B", arxiv="1", fidelity="reconstructed")
    @dataclass(frozen=True)
    class Required:
        size: int

    @reg.register("fn_widget", paper="C", arxiv="2")
    def fn_widget(alpha, beta=2):
        return ("fn", alpha, beta)

    return reg


def test_names_contains_and_build():
    reg = make_registry()
    assert reg.names() == ["fn_widget", "required_widget", "spinner"]
    assert "spinner" in reg and "spiner" not in reg
    obj = reg.build("spinner", speed=3.0)
    assert obj.speed == 3.0 and obj.tags == ["a"]
    assert reg.build("fn_widget", alpha=1) == ("fn", 1, 2)
    assert [e.name for e in reg.entries()] == reg.names()
    assert reg.entry("required_widget").fidelity == "reconstructed"


def test_entry_params():
    reg = make_registry()
    # dataclass: defaults, default_factory evaluated, required -> None; init=False and ClassVar excluded
    assert reg.entry("spinner").params == {"speed": 1.5, "tags": ["a"], "label": "x"}
    assert reg.entry("required_widget").params == {"size": None}
    # plain callable: from its signature
    assert reg.entry("fn_widget").params == {"alpha": None, "beta": 2}
    assert reg.entry("spinner").summary == "Spins things."


def test_unknown_name_names_nearest():
    reg = make_registry()
    with pytest.raises(ConfigError) as exc:
        reg.build("spiner", where="loss")
    msg = str(exc.value)
    assert 'Unknown widget "spiner" (at loss).' in msg
    assert 'Did you mean "spinner"?' in msg
    assert "fn_widget, required_widget, spinner" in msg


@pytest.mark.parametrize("reg, typo, nearest", [
    (ADVANTAGES, "grop", "grpo"), (ADVANTAGES, "rlo", "rloo"), (LOSSES, "ppo-clip", "ppo_clip"),
    (LOSSES, "gpso", "gspo"), (AGGREGATORS, "token_means", "token_mean"),
    (SELECTORS, "dynamic_sampler", "dynamic_sampling"), (SHAPERS, "overlong_penalties", "overlong_penalty"),
])
def test_unknown_name_in_real_registries(reg, typo, nearest):
    with pytest.raises(ConfigError, match=f'Did you mean "{nearest}"'):
        reg.build(typo)


def test_unknown_hyper_parameter_names_nearest_key():
    reg = make_registry()
    with pytest.raises(ConfigError) as exc:
        reg.build("spinner", where="advantage", sped=2.0)
    msg = str(exc.value)
    assert 'Unknown hyper-parameter "advantage.sped" for widget "spinner".' in msg
    assert 'Did you mean "speed"?' in msg
    assert "Valid keys: label, speed, tags." in msg
    with pytest.raises(ConfigError, match='Did you mean "epsilon_high"'):
        LOSSES.build("ppo_clip", epsilon_hihg=0.3)
    # init=False fields and ClassVars are not hyper-parameters
    with pytest.raises(ConfigError, match="internal"):
        reg.build("spinner", internal=1)
    with pytest.raises(ConfigError, match="needs"):
        reg.build("spinner", needs=frozenset())


def test_constructor_errors_become_config_errors():
    reg = make_registry()
    with pytest.raises(ConfigError, match="Invalid hyper-parameters"):
        reg.build("required_widget")  # TypeError: missing size
    with pytest.raises(ConfigError, match="speed must be >= 0"):
        reg.build("spinner", speed=-1.0)  # ValueError from __post_init__
    with pytest.raises(ConfigError, match="dual_clip must be > 1"):
        LOSSES.build("ppo_clip", dual_clip=0.5)  # a ConfigError raised by the component passes through


def test_declared_ranges_are_checked_with_the_full_key_path():
    # the same component, wherever it sits, names its own key: no hard-coded prefix
    with pytest.raises(ConfigError) as exc:
        SELECTORS.build("rest_grpo", where="selectors[1]", max_queue=-1)
    assert str(exc.value) == "selectors[1].max_queue must be >= 0, got -1."
    with pytest.raises(ConfigError, match=re.escape("shapers[2].topk_ratio must be in (0, 1], got 0.0.")):
        SHAPERS.build("trapo", where="shapers[2]", topk_ratio=0)  # checked after coercion (0 -> 0.0)
    with pytest.raises(ConfigError, match=re.escape("advantage.rho_min must be <= advantage.rho_max, got ")):
        ADVANTAGES.build("spo", where="advantage", rho_min=0.99)
    with pytest.raises(ConfigError, match=re.escape("selectors[1].strategy must be one of")):
        SELECTORS.build("pf_ppo", where="selectors[1]", strategy="best_median")


def test_a_component_in_the_second_selector_slot_reports_that_slot():
    from lmpo.config import load_config

    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["selectors=[{name: dynamic_sampling}, {name: rest_grpo, sample_ratio: 0}]"])
    assert "selectors[1].sample_ratio must be in (0, 1], got 0.0." in str(exc.value)
    with pytest.raises(ConfigError, match=re.escape("selectors[0].sample_ratio must be")):
        load_config(overrides=["selectors=[{name: rest_grpo, sample_ratio: 0}, {name: dynamic_sampling}]"])


def test_register_twice_and_bad_fidelity():
    reg = make_registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("fn_widget", paper="", arxiv="")(lambda: None)
    obj = reg.get("fn_widget")
    reg.register("fn_widget", paper="C", arxiv="2")(obj)  # the same object again is allowed
    with pytest.raises(ValueError, match="fidelity"):
        reg.register("x", paper="", arxiv="", fidelity="approximate")


def test_real_entries_params():
    assert LOSSES.entry("ppo_clip").params == {"epsilon": 0.2, "epsilon_high": None, "dual_clip": None}
    assert LOSSES.entry("gspo").params == {"epsilon": 3e-4, "epsilon_high": 4e-4}
    assert LOSSES.entry("reinforce").params == {}
    assert ADVANTAGES.entry("grpo").params == {"scale_by_std": True, "std_level": "group", "eps": 1e-6, "singleton": "zero"}
    assert ADVANTAGES.entry("reinforce_pp").params == {"baseline": "none", "eps": 1e-8, "gamma": 1.0, "singleton": "zero"}
    assert AGGREGATORS.entry("seq_mean_token_sum_norm").params == {"horizon": None}
    assert SHAPERS.entry("overlong_penalty").params == {"horizon": None, "cache_length": None, "factor": 1.0}
    assert SELECTORS.entry("dynamic_sampling").params == {"min_std": 0.0, "on": "task"}
    assert set(ALL_REGISTRIES) == {"advantage", "loss", "aggregator", "selector", "shaper", "planner", "reward", "task",
                                   "preference"}
    for reg in (ADVANTAGES, LOSSES, AGGREGATORS, SELECTORS, SHAPERS, PLANNERS):
        for e in reg.entries():
            # A method without an arXiv preprint says so (arxiv="none") and gives another source in `paper`.
            assert e.paper and e.arxiv and e.fidelity in ("exact", "reconstructed"), e.name
            assert e.arxiv != "none" or "http" in e.paper, e.name
