"""The checks of benchmarks/gpu_smoke.sh (one line of details on stdout; exit status 1 when a check fails).

    python benchmarks/gpu_smoke_check.py run RUN_DIR DEVICE       # a finished run: device, finite metrics, eval
    python benchmarks/gpu_smoke_check.py parity DEVICE MIN_SHARE  # HF vs vLLM greedy tokens on the default model
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PAIRS = [(3, 4), (12, 30), (55, 21), (7, 8), (40, 17), (9, 90), (61, 27), (18, 44)]


def check_run(run_dir: str, device: str) -> int:
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("step", 0) > 0 and "perf/step_s" in r]
    problems = []
    if not str(summary.get("device", "")).startswith(device):
        problems.append(f"ran on {summary.get('device')!r}, not {device}")
    bad = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    if bad:
        problems.append(f"non-finite metrics {bad[:5]}")
    if not steps:
        problems.append("no training step in metrics.jsonl")
    stale = [r["async/staleness"] for r in steps if "async/staleness" in r]
    if stale and max(stale) > 1:
        problems.append(f"staleness {max(stale)} > max_staleness 1")
    step_s = sum(r["perf/step_s"] for r in steps[1:] or steps) / max(1, len(steps[1:] or steps))
    tps = sum(r.get("perf/tokens_per_s", 0.0) for r in steps) / max(1, len(steps))
    before = summary.get("eval_before", {}).get("eval/accuracy")
    after = summary.get("eval_after", {}).get("eval/accuracy")
    detail = (f"device {summary.get('device')}, autocast {summary.get('autocast')}, {len(steps)} steps, "
              f"step {step_s:.2f} s (after the first), {tps:.0f} tok/s sampling, eval acc {before} -> {after}, "
              f"peak GPU {summary.get('peak_gpu_gb')} GB" + (f", staleness {stale}" if stale else ""))
    print(detail + ("" if not problems else " | FAILED: " + "; ".join(problems)))
    return 1 if problems else 0


def check_parity(device: str, min_share: float) -> int:
    import torch

    from lmpo.models.load import load_model
    from lmpo.rollout.base import SamplingParams
    from lmpo.rollout.hf import HFGenerator
    from lmpo.rollout.vllm import VLLMGenerator, VLLMOptions

    model, tok = load_model("default")
    model.to(device)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Compute {a} + {b}. Reply with the number."}],
                                       tokenize=False, add_generation_prompt=True) for a, b in PAIRS]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    ours = HFGenerator(model, tok).generate(prompts, params)
    with VLLMGenerator(model, tok, VLLMOptions(mode="colocated", max_model_len=512, memory_gb=1,
                                               gpu_memory_utilization=0.3)) as gen:
        theirs = gen.generate(prompts, params)
        sync_t = None
        if device != "cpu":
            gen.sync_weights()
            sync_t = gen.last_sync_s
    a, b = ours.response_ids.cpu(), theirs.response_ids.cpu()
    same = [bool(torch.equal(x, y)) for x, y in zip(a, b)] if a.shape == b.shape else [False] * len(prompts)
    both = ours.response_attn.cpu() & theirs.response_attn.cpu() if a.shape == b.shape else None
    dlp = ((ours.sampler_logprobs.cpu() - theirs.sampler_logprobs.cpu())[both].abs().max().item()
           if both is not None and both.any() else float("nan"))
    share = sum(same) / len(same)
    print(f"{sum(same)}/{len(same)} rows identical (need {min_share:.0%}), max |dlogp| {dlp:.2e}, "
          f"in-memory sync {sync_t if sync_t is None else round(sync_t, 3)} s"
          + ("" if share >= min_share else f" | FAILED: first differing row {same.index(False)}: "
             f"{ours.completions[same.index(False)]!r} vs {theirs.completions[same.index(False)]!r}"))
    return 0 if share >= min_share else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        sys.exit(check_run(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 4 and sys.argv[1] == "parity":
        sys.exit(check_parity(sys.argv[2], float(sys.argv[3])))
    sys.exit(__doc__)
