"""Decode throughput: lmpo's own sampler (rollout.backend=hf) vs the vLLM CPU engine (rollout.backend=vllm).

The same workload for both: the default model (SmolLM2-135M-Instruct, float32), the default run's arithmetic prompts
(chat-formatted), groups of 8 samples per prompt, temperature 0.7, a fixed number of new tokens per row (EOS
ignored by forcing every row to its length: ``min_tokens`` in vLLM, a huge-negative EOS logit in lmpo), batch sizes
8/32/128 rows. Generated tokens per second of wall time, the median of ``--repeats`` timed calls after one warm-up
call each; both engines run in this process with the same thread count (``--threads``, default: torch's).
vLLM's start-up and a weight sync (in memory, and through a file) are timed too.

Run it in the vLLM environment: ``make bench-vllm`` (or ``.venv-vllm/bin/python benchmarks/vllm_decode.py``).
Writes docs/results/vllm.json and docs/results/vllm.md (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--out", default="docs/results/vllm")
    ap.add_argument("--quick", action="store_true", help="batch 8 only, 16 tokens, 1 repeat")
    a = ap.parse_args()
    if a.quick:
        a.batch_sizes, a.new_tokens, a.repeats = "8", 16, 1

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    from lmpo.models.load import load_model
    from lmpo.rollout.base import SamplingParams
    from lmpo.rollout.hf import HFGenerator
    from lmpo.rollout.vllm import VLLMGenerator, VLLMOptions
    from lmpo.tasks import build_task
    import vllm

    model, tok = load_model("default")
    task = build_task("arithmetic", seed=0, num_train=256, num_eval=8,
                      template="Example: 23 + 45 = 68. Now compute {a} + {b}. Reply with the number only.")
    texts = [tok.apply_chat_template([{"role": "system", "content": "You are a careful calculator."},
                                      {"role": "user", "content": r["prompt"]}], tokenize=False,
                                     add_generation_prompt=True) for r in task.train]
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    params = SamplingParams(temperature=0.7, max_new_tokens=a.new_tokens)

    def batch(n: int) -> list[str]:
        return [texts[(i // 8) % len(texts)] for i in range(n)]  # groups of 8 samples per prompt

    eos = sorted({int(tok.eos_token_id)} | {int(model.generation_config.eos_token_id)})

    def no_eos(module, inputs, output):  # lmpo: every row runs to its length, as vLLM's min_tokens does
        output[..., eos] = -1e9
        return output

    head = model.get_output_embeddings()
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "threads": threads, "torch": torch.__version__, "vllm": vllm.__version__,
                                 "load_avg_start": os.getloadavg()},
                     "workload": {"model": "default (SmolLM2-135M-Instruct, float32)", "new_tokens": a.new_tokens,
                                  "temperature": 0.7, "group": 8, "repeats": a.repeats}, "rows": []}

    def timed(fn, n: int) -> tuple[float, float]:
        fn(batch(n))  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            tokens = fn(batch(n))
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        return tokens / t, t

    hf = HFGenerator(model, tok)

    def run_hf(prompts):
        h = head.register_forward_hook(no_eos)
        try:
            return hf.generate(prompts, params).num_generated_tokens
        finally:
            h.remove()

    t0 = time.perf_counter()
    gen = VLLMGenerator(model, tok, VLLMOptions(mode="colocated", max_model_len=1024,
                                                extra_args={"max_num_seqs": max(sizes)}))
    gen.start()
    startup = time.perf_counter() - t0
    import vllm.sampling_params as vsp

    orig = vsp.SamplingParams.__init__

    def run_vllm(prompts):
        def patched(self, *args, **kw):  # min_tokens = max_tokens: no early EOS
            kw["min_tokens"] = kw.get("max_tokens", a.new_tokens)
            orig(self, *args, **kw)

        vsp.SamplingParams.__init__ = patched
        try:
            return gen.generate(prompts, params).num_generated_tokens
        finally:
            vsp.SamplingParams.__init__ = orig

    for n in sizes:
        row = {"batch": n}
        row["hf_tokens_per_s"], row["hf_s"] = timed(run_hf, n)
        row["vllm_tokens_per_s"], row["vllm_s"] = timed(run_vllm, n)
        row["speedup"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    syncs = {}
    for method in ("rpc", "reload"):
        gen.options.sync = method
        gen.sync_weights()  # first one warms up
        t = []
        for _ in range(a.repeats):
            gen.sync_weights()
            t.append(gen.last_sync_s)
        syncs[method] = statistics.median(t)
    gen.close()
    results["vllm_startup_s"] = startup
    results["sync_s"] = syncs
    results["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = ["# Decode throughput: lmpo's sampler vs the vLLM CPU engine", "",
             f"`{' '.join(['benchmarks/vllm_decode.py', *sys.argv[1:]])}`; machine: {results['machine']}.",
             f"Workload: {results['workload']}.", "",
             "| batch (rows) | lmpo tokens/s | vLLM tokens/s | vLLM / lmpo |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['batch']} | {r['hf_tokens_per_s']:.1f} | {r['vllm_tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f} |")
    lines += ["", f"vLLM start-up (export + engine): {startup:.1f} s. Weight sync of the whole model (median): "
              f"in memory (rpc) {syncs['rpc']:.2f} s, through a safetensors file (reload) {syncs['reload']:.2f} s."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
