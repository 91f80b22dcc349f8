"""``model.autocast: auto`` picks bf16 only when this machine's bf16 matmul is measurably faster."""

import pytest

import lmpo.engine.tuning as perf
from lmpo.config import load_config
from lmpo.errors import ConfigError


@pytest.mark.parametrize("speedup,expected", [(3.0, "bfloat16"), (1.29, None), (0.05, None)])
def test_auto_follows_the_measured_speedup(monkeypatch, speedup, expected):
    monkeypatch.setattr(perf, "bf16_speedup", lambda: speedup)
    assert perf.resolve_autocast("auto") == expected


def test_explicit_choices_pass_through():
    assert perf.resolve_autocast(None) is None
    assert perf.resolve_autocast("float32") is None
    assert perf.resolve_autocast("bfloat16") == "bfloat16"


def test_speedup_is_a_positive_measurement():
    assert perf.bf16_speedup() > 0


def test_config_accepts_auto_and_rejects_typos():
    assert load_config(None, ["model.autocast=auto"]).model.autocast == "auto"
    with pytest.raises(ConfigError, match="model.autocast"):
        load_config(None, ["model.autocast=bf16"])
