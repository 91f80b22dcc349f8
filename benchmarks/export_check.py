"""Round trip of ``lmpo export`` on the real default model (the tests cover the tiny one).

    python benchmarks/export_check.py [--out runs/export-check]

Builds a LoRA checkpoint of ``configs/default.yaml``'s policy (SmolLM2-135M-Instruct, tied embeddings) whose adapters
are set to small random values (no training: the point is the weights' path, not their quality), exports it as a
PEFT adapter and as a merged model, loads both with ``transformers.AutoModelForCausalLM.from_pretrained`` and prints
a markdown table: the largest logit difference against lmpo's own model on a chat-formatted prompt, the folder size
and the export time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from transformers import AutoModelForCausalLM

    from lmpo.config import load_config, save_config
    from lmpo.export import export_run
    from lmpo.models.load import apply_lora, format_prompt, load_model
    from lmpo.train.checkpoint import save_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/export-check")
    args = ap.parse_args()
    run = Path(args.out) / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), [f"output.dir={run.parent}", "output.run_name=run"])
    save_config(cfg, run / "config.yaml")
    model, tok = load_model(cfg.model.name)
    model = apply_lora(model, r=cfg.model.lora.r, alpha=cfg.model.lora.alpha)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    save_checkpoint(run, 1, model, optimizer, scheduler, extra={})
    prompt = format_prompt(tok, "Compute 23 + 19.", cfg.task.params.get("system_prompt"))
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    print(f"prompt: {ids.shape[1]} tokens; the adapter moves the logits by up to {(want - base).abs().max():.3f}\n")
    print("| export | max abs logit difference vs lmpo | folder size | export time |")
    print("|---|---|---|---|")
    for merge in (False, True):
        t0 = time.perf_counter()
        out = export_run(run, Path(args.out) / ("merged" if merge else "adapter"), merge_lora=merge, overwrite=True)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(str(out))(input_ids=ids).logits
        size = subprocess.run(["du", "-sh", str(out)], capture_output=True, text=True).stdout.split()[0]
        label = "`--merge-lora`" if merge else "adapter (PEFT, base in `base/`)"
        print(f"| {label} | {(got - want).abs().max().item():.2e} | {size} | {dt:.1f} s |")


if __name__ == "__main__":
    main()
