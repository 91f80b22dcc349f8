"""``lmpo export`` and ``lmpo chat`` on tiny runs (full fine-tuning and LoRA), through the CLI in subprocesses.

The exported folders are loaded with ``transformers`` (and PEFT) and must give the logits of lmpo's own checkpoint;
the chat's greedy replies must be what ``transformers``' ``generate`` gives on the exported model.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmpo.config import load_config
from lmpo.export import export_run, load_trained
from lmpo.models.load import format_prompt, load_model
from lmpo.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
IDS = torch.tensor([[3, 4, 14, 5, 6, 7, 13, 3], [9, 13, 9, 1, 4, 4, 13, 12]])


def lmpo(*args, stdin: str | None = None, check: bool = True):
    proc = subprocess.run([sys.executable, "-m", "lmpo.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"lmpo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (errors and exports; the subprocess runs above cover the installed command)."""
    from lmpo.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in (("full", []), ("lora", ["model.lora.enabled=true", "model.lora.r=4"])):
        cfg = load_config(TINY, ["train.steps=3", "eval.every=3", "eval.num_prompts=8", f"output.dir={root}",
                                 f"output.run_name={name}", *extra])
        out[name] = train(cfg).run_dir
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lmpo_logits(run: Path) -> torch.Tensor:
    return logits(load_trained(run).model)


def base_logits() -> torch.Tensor:
    return logits(load_model("tiny", seed=0)[0])


def test_full_run_exports_a_folder_transformers_loads_with_the_same_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    proc = lmpo("export", str(runs["full"]), "--out", str(out))
    assert str(out) in proc.stdout
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja",
              "README.md"):
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(str(out))
    got, want = logits(model), lmpo_logits(runs["full"])
    assert torch.equal(got, want)
    assert (got - base_logits()).abs().max() > 1e-2, "the export holds the trained weights, not the initial ones"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.decode(tok("12+7=")["input_ids"]) == "12+7="


def test_lora_run_exports_an_adapter_and_a_merged_model(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    want = lmpo_logits(runs["lora"])
    assert (want - base_logits()).abs().max() > 1e-3, "training moved the adapter"
    adapter = tmp_path / "adapter"
    lmpo("export", str(runs["lora"]), "--out", str(adapter))
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists() and (adapter / "base" / "model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(str(adapter))), want)  # transformers + PEFT
    base = AutoModelForCausalLM.from_pretrained(str(adapter / "base"))
    assert torch.equal(logits(base), base_logits())
    assert torch.equal(logits(PeftModel.from_pretrained(base, str(adapter))), want)

    merged = export_run(runs["lora"], tmp_path / "merged", merge_lora=True)
    assert not (merged / "adapter_config.json").exists() and (merged / "model.safetensors").is_file()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(str(merged))), want, atol=1e-5, rtol=1e-5)


def test_exported_chat_template_renders_prompts_as_lmpo_trained(runs, tmp_path):
    from transformers import AutoTokenizer

    out = export_run(runs["full"], tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(str(out))
    tiny = load_model("tiny")[1]
    assert not getattr(tiny, "chat_template", None)
    for messages, system in (([{"role": "user", "content": "3="}], None),
                             ([{"role": "user", "content": "3="}], "copy the digit"),
                             ([{"role": "user", "content": "1="}, {"role": "assistant", "content": "1"},
                               {"role": "user", "content": "2="}], None)):
        full = ([{"role": "system", "content": system}] if system else []) + messages
        rendered = exported.apply_chat_template(full, add_generation_prompt=True, tokenize=False)
        assert rendered == format_prompt(tiny, messages, system)


def test_model_card_holds_the_config_and_summary_numbers(runs, capsys):
    rc, stdout, _ = cli(capsys, "export", str(runs["lora"]))  # default destination: <run>/export
    out = runs["lora"] / "export"
    assert rc == 0 and str(out) in stdout
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "grpo" in front["tags"]
    summary = json.loads((runs["lora"] / "summary.json").read_text())
    acc_before, acc_after = summary["eval_before"]["eval/accuracy"], summary["eval_after"]["eval/accuracy"]
    assert f"| eval/accuracy | {acc_before:.3f} | {acc_after:.3f} |" in card
    assert "method `grpo` on task `copy`" in card and "step_000003" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config == yaml.safe_load((runs["lora"] / "config.yaml").read_text())


def test_export_never_replaces_a_non_empty_folder_silently(runs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc, _, err = cli(capsys, "export", str(runs["full"]), "--out", str(out))
    assert rc == 2 and "already exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"], "no temporary folder is left behind"
    assert cli(capsys, "export", str(runs["full"]), "--out", str(out), "--overwrite")[0] == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "export", str(runs["full"]), "--out", str(empty))[0] == 0  # an empty folder is fine
    assert (empty / "config.json").is_file()


def test_export_errors_are_lmpo_errors(runs, tmp_path, capsys):
    cases = [
        ((str(runs["full"]), "--merge-lora", "--out", str(tmp_path / "a")), "no adapter to merge"),
        ((str(tmp_path / "nope"),), "does not exist"),
        ((str(tmp_path),), "has no config.yaml"),
        ((str(runs["full"]), "--out", str(runs["full"] / "config.yaml")), "is a file"),
    ]
    for args, message in cases:
        rc, _, err = cli(capsys, "export", *args)
        assert rc == 2 and message in err, (args, err)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.yaml").write_text((runs["full"] / "config.yaml").read_text())
    rc, _, err = cli(capsys, "chat", str(fresh))
    assert rc == 2 and "no checkpoint yet" in err
    rc, _, err = cli(capsys, "chat", str(runs["full"]), "--temperature", "-1")
    assert rc == 2 and "--temperature must be >= 0" in err
    rc, _, err = cli(capsys, "export", str(runs["full"]), "model.name=tiny")
    assert rc == 2 and "takes no key=value overrides" in err


def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_replies_greedily_from_piped_lines(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(runs["full"], tmp_path / "hf")
    model, tok = AutoModelForCausalLM.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    limit = load_config(str(runs["full"] / "config.yaml")).rollout.max_new_tokens

    def render(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # --no-history: each line alone; /exit ends the session before "9="
    proc = lmpo("chat", str(runs["full"]), "--no-history", stdin="3=\n\n/reset\n7=\n/exit\n9=\n")
    replies = proc.stdout.splitlines()
    assert replies == [greedy_reply(model, tok, render([{"role": "user", "content": p}]), limit)
                       for p in ("3=", "7=")]
    assert "/exit quits" in proc.stderr
    # with history: the second reply continues the conversation; end of input ends the session
    proc = lmpo("chat", str(runs["full"]), "--max-new-tokens", "3", stdin="3=\n7=\n")
    first, second = proc.stdout.splitlines()
    msgs = [{"role": "user", "content": "3="}]
    assert first == greedy_reply(model, tok, render(msgs), 3)
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "7="}]
    assert second == greedy_reply(model, tok, render(msgs), 3)
    assert second != greedy_reply(model, tok, render(msgs[-1:]), 3), "the history changes this reply"


def test_sampled_chat_is_seeded(runs):
    from lmpo.chat import run_chat

    def replies(seed: int) -> list[str]:
        out = io.StringIO()
        run_chat(runs["full"], temperature=1.5, seed=seed, history=False, stdin=io.StringIO("3=\n" * 6),
                 stdout=out, stderr=io.StringIO())
        return out.getvalue().splitlines()

    a, b = replies(3), replies(3)
    assert a == b and len(a) == 6
    assert len(set(a)) > 1, "temperature 1.5 samples: six draws of the same prompt differ"
