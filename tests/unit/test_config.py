"""lmpo.config: precedence, component sections, typed errors naming key and file, horizon filling, presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from lmpo.config import build_components, deep_merge, load_config, parse_override, save_config
from lmpo.errors import ConfigError
from lmpo.methods.presets import PRESETS
from lmpo.registry import SELECTORS, SHAPERS


def write(tmp_path: Path, data: dict | str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


# --------------------------------------------------------------------------- precedence
def test_defaults_when_nothing_given():
    cfg = load_config()
    assert cfg.method == "grpo"
    assert cfg.train.steps == 20 and cfg.rollout.max_new_tokens == 64  # field defaults
    assert cfg.kl.beta == 0.04  # grpo preset beats the field default 0.0


def test_precedence_defaults_preset_yaml_overrides(tmp_path):
    # reinforce_pp preset: kl = {beta 0.01, estimator k1, mode reward}
    # field defaults:      kl = {beta 0.0,  estimator k3, mode loss}
    p = write(tmp_path, {"method": "reinforce_pp", "kl": {"estimator": "k2", "beta": 0.5}, "train": {"steps": 3}})
    cfg = load_config(p, ["kl.beta=0.25", "train.seed=7"])
    assert cfg.train.adam_beta1 == 0.9  # default only
    assert cfg.kl.mode == "reward"  # default < preset
    assert cfg.kl.estimator == "k2"  # preset < YAML
    assert cfg.kl.beta == 0.25  # YAML < override
    assert cfg.train.steps == 3 and cfg.train.seed == 7
    assert cfg.advantage == {"name": "reinforce_pp"} and cfg.aggregator == {"name": "token_mean"}
    # without the override the YAML value stands
    assert load_config(p).kl.beta == 0.5


def test_method_override_beats_yaml_method(tmp_path):
    p = write(tmp_path, {"method": "grpo"})
    cfg = load_config(p, ["method=dapo"])
    assert cfg.method == "dapo" and cfg.loss["epsilon_high"] == 0.28 and cfg.rollout.refill_rounds == 2


def test_changing_component_name_drops_preset_args(tmp_path):
    # dapo's loss is ppo_clip with epsilon 0.2 / epsilon_high 0.28: naming gspo must not inherit 0.28
    cfg = load_config(write(tmp_path, {"method": "dapo", "loss": {"name": "gspo"}}))
    assert cfg.loss == {"name": "gspo"}
    assert build_components(cfg)["loss"].epsilon_high == 4e-4  # gspo's own default
    # reinforce takes no hyper-parameters: keeping the preset's would make build() fail
    cfg = load_config(overrides=["method=dapo", "loss.name=reinforce"])
    assert cfg.loss == {"name": "reinforce"}
    # the same name merges
    cfg = load_config(write(tmp_path, {"method": "dapo", "loss": {"name": "ppo_clip", "dual_clip": 3.0}}))
    assert cfg.loss == {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28, "dual_clip": 3.0}
    # keys without a name merge onto the preset's component
    cfg = load_config(overrides=["method=dr_grpo", "advantage.std_level=batch"])
    assert cfg.advantage == {"name": "grpo", "scale_by_std": False, "std_level": "batch"}


def test_deep_merge_does_not_mutate_inputs():
    base = {"loss": {"name": "ppo_clip", "epsilon": 0.2}, "kl": {"beta": 0.0}}
    over = {"loss": {"epsilon": 0.3}, "kl": {"beta": 1.0}}
    out = deep_merge(base, over)
    assert out == {"loss": {"name": "ppo_clip", "epsilon": 0.3}, "kl": {"beta": 1.0}}
    assert base == {"loss": {"name": "ppo_clip", "epsilon": 0.2}, "kl": {"beta": 0.0}}


# --------------------------------------------------------------------------- types and parsing
@pytest.mark.parametrize("section, key, value, expect", [
    ("train", "steps", "many", "integer"),
    ("train", "seed", 1.5, "integer"),
    ("rollout", "temperature", "hot", "number"),
    ("output", "progress", "maybe", "true or false"),
    ("model", "name", 3, "string"),
    ("train", "max_grad_norm", "big", "float or NoneType"),
    ("train", "ppo_epochs", True, "integer"),
])
def test_type_error_names_key_and_file(tmp_path, section, key, value, expect):
    p = write(tmp_path, {section: {key: value}})
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert f"{section}.{key}" in msg and str(p) in msg and expect in msg


def test_section_must_be_mapping(tmp_path):
    p = write(tmp_path, {"train": 3})
    with pytest.raises(ConfigError, match=r"train .*must be a mapping"):
        load_config(p)


def test_scientific_notation_without_dot_is_float(tmp_path):
    assert yaml.safe_load("x: 1e-6") == {"x": "1e-6"}  # YAML 1.1 reads it as a string
    cfg = load_config(write(tmp_path, "train:\n  learning_rate: 1e-6\n"))
    assert cfg.train.learning_rate == 1e-6 and isinstance(cfg.train.learning_rate, float)
    cfg = load_config(overrides=["train.learning_rate=1e-6", "train.max_grad_norm=5e-1"])
    assert cfg.train.learning_rate == 1e-6 and cfg.train.max_grad_norm == 0.5
    assert parse_override("a.b=1e-6") == (["a", "b"], 1e-6)
    assert parse_override("a=3") == (["a"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=grpo") == (["a"], "grpo")
    # component hyper-parameters too (they are free-form dicts in the config tree)
    cfg = load_config(overrides=["loss.epsilon=1e-6"])
    eps = build_components(cfg)["loss"].epsilon
    assert eps == 1e-6 and isinstance(eps, float)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(overrides=["train.steps"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(overrides=["=3"])


def test_component_hyper_parameter_type_error(tmp_path):
    # regression: GSPOLoss(epsilon="wide") used to build, the config loaded and training crashed later
    p = write(tmp_path, {"method": "gspo", "loss": {"name": "gspo", "epsilon": "wide"}})
    with pytest.raises(ConfigError, match=r"loss\.epsilon.*number"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"advantage\.scale_by_std.*true or false"):
        load_config(overrides=["advantage.scale_by_std=maybe"])
    with pytest.raises(ConfigError, match=r"aggregator\.horizon expects int"):
        load_config(overrides=["method=dr_grpo", "aggregator.horizon=2.5"])


@pytest.mark.parametrize("loss", [{"name": "gspo", "epsilon": "wide"}, {"name": "ppo_clip", "epsilon_hgh": 0.3},
                                  {"name": "ppo_clipp"}])
def test_component_errors_name_the_file(tmp_path, loss):
    p = write(tmp_path, {"loss": loss})
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "loss" in str(exc.value)
    assert str(p) in str(exc.value)


# --------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("data, words", [
    ({"train": {"learning_rat": 0.1}}, ['"train.learning_rat"', 'Did you mean "learning_rate"']),
    ({"rollotu": {}}, ['"rollotu"', 'Did you mean "rollout"']),
    ({"rollout": {"num_generation": 4}}, ['"rollout.num_generation"', 'Did you mean "num_generations"']),
    ({"model": {"lora": {"rank": 8}}}, ['"model.lora.rank"']),
    ({"method": "grop"}, ['Unknown method "grop"', 'Did you mean "grpo"']),
])
def test_unknown_key_names_nearest_and_file(tmp_path, data, words):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert str(p) in msg
    for w in words:
        assert w in msg


def test_unknown_component_name_or_key_names_nearest():
    with pytest.raises(ConfigError, match='Did you mean "epsilon_high"'):
        load_config(overrides=["loss.epsilon_hgh=0.3"])
    with pytest.raises(ConfigError, match='Did you mean "token_mean"'):
        load_config(overrides=["aggregator.name=token_men"])
    with pytest.raises(ConfigError, match='Did you mean "dynamic_sampling"'):
        load_config(overrides=["selectors=[{name: dynamic_sampler}]"])


@pytest.mark.parametrize("override, words", [
    ("kl.estimator=k4", "kl.estimator"), ("kl.mode=both", "kl.mode"), ("rollout.temperature=0", "temperature"),
    ("train.lr_scheduler=cosin", 'Did you mean "cosine"'), ("rollout.top_p=1.5", "top_p"),
    ("advantage.std_level=prompt", "std_level"), ("rollout.decode_kernel=fast", "rollout.decode_kernel must be auto"),
    ("rollout.prepack=fast", "rollout.prepack must be auto"), ("rollout.sampler=multinomal", "Did you mean \"multinomial\""),
    ("rollout.lean_decode=fast", "rollout.lean_decode must be auto"),
])
def test_value_checks(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(overrides=[override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


# --------------------------------------------------------------------------- horizon
def test_horizon_filled_from_max_new_tokens():
    cfg = load_config(overrides=["method=dr_grpo", "rollout.max_new_tokens=37"])
    agg = build_components(cfg)["aggregator"]
    assert agg.horizon == 37
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert agg.normaliser(mask, 999).item() == 2 * 37  # the filled parameter wins over the call-site value
    cfg = load_config(overrides=["method=dapo", "rollout.max_new_tokens=37"])
    assert build_components(cfg)["shapers"][0].horizon == 37
    assert cfg.aggregator == {"name": "token_mean"}  # the config tree itself is not rewritten


def test_explicit_horizon_kept():
    cfg = load_config(overrides=["method=dr_grpo", "rollout.max_new_tokens=37", "aggregator.horizon=5"])
    assert build_components(cfg)["aggregator"].horizon == 5
    cfg = load_config(overrides=["method=dapo", "shapers=[{name: overlong_penalty, horizon: 9, cache_length: 2}]"])
    sh = build_components(cfg)["shapers"][0]
    assert (sh.horizon, sh.cache_length) == (9, 2)


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_each_preset_loads_and_builds_its_values(method):
    cfg = load_config(overrides=[f"method={method}"])
    comps = build_components(cfg)
    preset = PRESETS[method]
    for section in ("advantage", "loss", "aggregator"):
        if section in preset:
            args = {k: v for k, v in preset[section].items() if k != "name"}
            assert getattr(cfg, section)["name"] == preset[section]["name"]
            for k, v in args.items():
                assert getattr(comps[section], k) == v, (section, k)
    for section, reg in (("selectors", SELECTORS), ("shapers", SHAPERS)):
        assert [type(c) for c in comps[section]] == [reg.get(item["name"]) for item in preset.get(section, [])]
    for k, v in preset.get("kl", {}).items():
        assert getattr(cfg.kl, k) == v
    for k, v in preset.get("rollout", {}).items():
        assert getattr(cfg.rollout, k) == v


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(overrides=["method=dapo", "train.learning_rate=1e-6", "loss.dual_clip=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_kl_estimator_variants_and_k3_clamp(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: grpo\n")
    for est in ("abs", "k1+", "k3+", "abs+"):
        assert load_config(str(p), [f"kl.estimator={est}"]).kl.estimator == est
    assert load_config(str(p), ["kl.k3_clamp=10"]).kl.k3_clamp == 10
    with pytest.raises(ConfigError, match="kl.estimator"):
        load_config(str(p), ["kl.estimator=k4"])
    with pytest.raises(ConfigError, match="kl.k3_clamp"):
        load_config(str(p), ["kl.k3_clamp=-1"])
