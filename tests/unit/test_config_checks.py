"""Config checks that keep a wrong value from silently breaking training: declared ranges, groups of one sample,
where a bad value came from (file or override), replacing a task, and writable output folders."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from lmpo.config import (
    RANGE_NOTES,
    Config,
    build_components,
    check_output_dir,
    check_writable_folder,
    learns_from_groups_of_one,
    load_config,
)
from lmpo.errors import ConfigError
from lmpo.methods.params import range_of

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("override, valid", [
    ("train.max_grad_norm=-1", "> 0 or null"), ("train.max_grad_norm=0", "> 0 or null"),
    ("eval.every=-1", ">= 0"), ("output.checkpoint_every=-2", ">= 0"), ("output.keep_checkpoints=0", ">= 1"),
    ("train.warmup_steps=-1", ">= 0"), ("train.weight_decay=-0.1", ">= 0"), ("train.adam_beta1=1", "in [0, 1)"),
    ("train.adam_beta2=-0.5", "in [0, 1)"), ("rollout.top_k=-1", ">= 0"), ("rollout.refill_rounds=-1", ">= 0"),
    ("eval.num_prompts=-1", ">= 0"), ("eval.pass_k=-3", ">= 0"), ("rollout.num_generations=0", ">= 1"),
    ("rollout.temperature=0", "> 0"), ("rollout.top_p=1.5", "in (0, 1]"), ("train.learning_rate=-1e-5", "> 0"),
    ("train.steps=-1", ">= 0"), ("train.ppo_epochs=0", ">= 1"), ("train.num_minibatches=0", ">= 1"),
    ("train.micro_batch_size=0", ">= 1 or null"), ("eval.max_new_tokens=0", ">= 1 or null"),
    ("model.lora.dropout=1", "in [0, 1)"), ("model.lora.r=0", ">= 1"), ("kl.beta=-0.1", ">= 0"),
    ("train.mmap_threshold_kb=0", "in [1, 32768] or null"), ("model.chunk_size=0", ">= 1"),
])
def test_out_of_range_names_key_value_and_range(override, valid):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    msg = str(info.value)
    assert msg.startswith(f"{key} must be {valid}, got "), msg
    assert float(msg.split("got ")[1].split()[0].rstrip(".")) == float(value)
    assert f'override "{override}"' in msg and "tiny.yaml" not in msg


def test_range_boundaries_that_are_valid_load():
    cfg = load_config(TINY, ["train.max_grad_norm=null", "eval.every=0", "output.checkpoint_every=0",
                             "train.adam_beta2=0", "rollout.top_k=0", "eval.num_prompts=0", "rollout.top_p=1"])
    assert cfg.train.max_grad_norm is None and cfg.eval.every == 0


def test_every_numeric_setting_declares_a_range_or_is_free_on_purpose():
    free = {"train.entropy_coef", "train.seed", "eval.correct_threshold"}  # any number is meaningful there

    def numeric(obj, where=""):
        for f in dataclasses.fields(obj):
            key, value = f"{where}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from numeric(value, f"{key}.")
            elif "int" in str(f.type) or "float" in str(f.type):
                yield key, f
    ranged = {k for k, f in numeric(Config()) if range_of(f) is not None}
    assert [k for k, _ in numeric(Config()) if k not in free and k not in ranged] == []
    assert set(RANGE_NOTES) <= ranged  # a note for a key that has no range (a typo) would never be shown


def test_range_message_explains_boundary_meaning():
    with pytest.raises(ConfigError, match="null turns clipping off"):
        load_config(TINY, ["train.max_grad_norm=-1"])


# --------------------------------------------------------------------------- groups of one sample
def test_group_relative_method_with_one_generation_is_an_error_saying_what_to_do():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["rollout.num_generations=1"])
    msg = str(info.value)
    for words in ("rollout.num_generations=1", '"grpo"', "training would change nothing", "2 or more",
                  "method=spo", 'override "rollout.num_generations=1"'):
        assert words in msg, (words, msg)


@pytest.mark.parametrize("method", [
    "spo",  # tracker baseline, batch-whitened
    "reinforce_pp",  # batch-whitened baseline
    "otr",  # reference answers, one per prompt; its loss does not use advantages
])
def test_methods_built_for_one_sample_per_prompt_load(method):
    assert load_config(TINY, [f"method={method}", "rollout.num_generations=1"]).rollout.num_generations == 1


def test_spo_preset_alone_loads_with_its_one_sample_per_prompt():
    assert load_config(None, ["method=spo"]).rollout.num_generations == 1


def test_group_of_one_is_judged_by_behaviour_and_leaves_state_untouched():
    cfg = load_config(TINY, ["method=spo"])
    comps = build_components(cfg)
    before = repr(comps["advantage"].state_dict())
    assert learns_from_groups_of_one(comps["advantage"], comps["loss"]) is True
    assert repr(comps["advantage"].state_dict()) == before  # the probe used a copy
    grpo = build_components(load_config(TINY))
    assert learns_from_groups_of_one(grpo["advantage"], grpo["loss"]) is False


def test_group_of_one_probe_that_cannot_run_decides_nothing():
    def broken(batch):
        raise KeyError("needs something the probe batch lacks")

    loss = build_components(load_config(TINY))["loss"]
    assert learns_from_groups_of_one(broken, loss) is None
    assert learns_from_groups_of_one(lambda b: torch.ones_like(b.response_mask, dtype=torch.float32), loss) is True


# --------------------------------------------------------------------------- where a bad value came from
def test_override_errors_name_the_override_not_the_file():
    for override, words in [("train.steps=many", "expects an integer"), ("train.learnin_rate=1", "Did you mean"),
                            ("method=grop", 'Did you mean "grpo"'), ("loss.epsilon_hgh=0.3", "epsilon_high"),
                            ("aggregator.name=token_men", "token_mean"), ("rollout.sampler=fast", "rollout.sampler")]:
        with pytest.raises(ConfigError) as info:
            load_config(TINY, [override])
        msg = str(info.value)
        assert words in msg and f'(from the command-line override "{override}")' in msg and "tiny.yaml" not in msg


def test_file_errors_still_name_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_grad_norm: -1\n")
    with pytest.raises(ConfigError, match=f"got -1.0 .*\\(in {cfg}\\)"):
        load_config(cfg, ["train.steps=2"])


# --------------------------------------------------------------------------- replacing a task
def test_switching_task_drops_the_old_tasks_params():
    cfg = load_config(TINY, ["task.name=local", "task.params={path: data.jsonl}"])
    assert cfg.task.params == {"path": "data.jsonl"}
    # the order of the overrides does not matter
    swapped = load_config(TINY, ["task.params={path: data.jsonl}", "task.name=local"])
    assert swapped.task.params == {"path": "data.jsonl"}
    assert load_config(TINY, ["task.name=local"]).task.params == {}


def test_same_task_keeps_and_merges_its_params():
    cfg = load_config(TINY, ["task.params.length=2"])
    assert cfg.task.params == {"length": 2, "num_train": 256, "num_eval": 32}
    assert load_config(TINY, ["task.name=copy"]).task.params["num_train"] == 256


# --------------------------------------------------------------------------- output folders
def test_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "f").write_text("x")
    cfg = load_config(TINY, [f"output.dir={tmp_path / 'f' / 'runs'}"])
    with pytest.raises(ConfigError, match="output.dir=.*is a file, not a folder"):
        check_output_dir(cfg, "r")
    cfg = load_config(TINY, [f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="output.run_name=f: .* is a file"):
        check_output_dir(cfg, "f")
    check_output_dir(cfg, "new")
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a read-only folder (/sys)")
def test_unwritable_output_dir_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot write in '/sys'"):
        check_writable_folder("/sys/lmpo-runs", "output.dir")


def test_unknown_option_keys_name_the_full_key_the_nearest_and_the_valid_ones():
    from lmpo.rollout.modes import mode_options
    from lmpo.rollout.vllm import vllm_options

    with pytest.raises(ConfigError, match=r'^Unknown key "rollout.mode_params.max_turn" for rollout.mode=episodes\. '
                                          r'Did you mean "max_turns"\? Valid keys: env, '):
        mode_options("episodes", {"max_turn": 3})
    with pytest.raises(ConfigError, match=r'^Unknown key "rollout.vllm.memory_g"\. Did you mean "memory_gb"\? '
                                          r'Valid keys: mode, url, '):
        vllm_options({"memory_g": 1})
