"""Benchmark workers: one measurement per subprocess (so peak RSS is that run's alone).

``python benchmarks/bench.py --worker '<json spec>'`` calls :func:`run` here, which prints one
``BENCH_RESULT <json>`` line. Sides:

* ``lmpo``   - ``lmpo.train.loop.train`` on the shared workload (checkpoint writes disabled, timers around
  generation and reward scoring; the loop itself logs log-prob, update and step times).
* ``trl``    - ``trl.GRPOTrainer`` on the same model object, prompts, reward, lengths, optimizer and precision,
  timed through a callback (step) and wrappers around its generation, reward, log-prob and input-prep methods.
* ``matmul`` - the machine's matrix-multiply peak (fp32 and bf16) with the same thread count.

Workload identity: both sides load the shipped SmolLM2-135M-Instruct with ``lmpo.models.load.load_model``, take one
arithmetic prompt per step in the same seeded order (``PromptStream``), sample ``group`` completions of exactly
``length`` tokens (EOS suppressed on both sides when ``fixed_length``, so every step does the same token work),
score them with lmpo's ``final_number`` reward, and take one AdamW step (lr 1e-6, betas 0.9/0.999, no weight
decay, grad-norm clip 1.0; the fused kernel on both sides, TRL's default) on the GRPO clipped surrogate (eps 0.2,
group-std advantages, per-sequence token mean, no KL, no reference model). Precision ``fp32`` is plain float32;
``bf16`` is CPU autocast to bfloat16 with float32 weights and optimizer on both sides (lmpo
``model.autocast=bfloat16``, TRL ``bf16=True``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from typing import Any

from report import emit, update_flops


class Clock:
    """Per-step phase timers in wall seconds (``<phase>_s``) and process CPU seconds (``<phase>_cpu``).

    CPU seconds (all threads of this process) barely change when other jobs share the machine, while wall time
    does; with one torch thread they are the honest cost of a phase.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] | None = None
        self.t0 = self.c0 = 0.0

    def start(self) -> None:
        self.cur = {f"{p}{u}": 0.0 for p in ("generate", "score", "logprob", "update", "prep") for u in ("_s", "_cpu")}
        self.cur["tokens"] = 0.0
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        if self.cur is None:
            return
        self.cur["step_s"] = time.perf_counter() - self.t0
        self.cur["step_cpu"] = time.process_time() - self.c0
        self.steps.append(self.cur)
        self.cur = None

    def wrap(self, fn, phase: str, only_nograd: bool = False):
        import torch

        def timed(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*a, **kw)
            if self.cur is not None and not (only_nograd and torch.is_grad_enabled()):
                self.cur[phase + "_s"] += time.perf_counter() - t0
                self.cur[phase + "_cpu"] += time.process_time() - c0
            return out

        return timed


def peak_rss_gb(*seen: float | None) -> float:
    """Peak RSS in GB: the kernel's high-water mark (ru_maxrss), the current RSS and any RSS read earlier (``seen``).

    The high-water mark is synced lazily and can trail an RSS that was read before memory was given back."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rss_gb(), *(x for x in seen if x))


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def model_shape(model) -> dict[str, int]:
    """Matmul parameter counts of the transformer body and the LM head, plus layers / hidden size."""
    from lmpo.models.logprobs import split_body_and_head

    body, head = split_body_and_head(model)
    body_params = sum(p.numel() for n, p in body.named_parameters() if p.dim() == 2 and "embed" not in n)
    cfg = model.config
    return {"body_params": body_params, "head_params": head.weight.numel(), "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "vocab": head.weight.shape[0]}


def flops_of(shape: dict[str, int], prompt_ids, prompt_len: int, response_len: int, response_tokens: int) -> float:
    """Useful update FLOPs (``report.update_flops``) of a batch whose prompts are the rows of ``prompt_ids``."""
    prompts = len({tuple(map(int, p)) for p in prompt_ids})
    return update_flops(body_params=shape["body_params"], head_params=shape["head_params"], layers=shape["layers"],
                        hidden=shape["hidden"], rows=len(prompt_ids), prompt_len=prompt_len, response_len=response_len,
                        response_tokens=response_tokens, prompts=prompts)


def prompt_rows(seed: int, n: int) -> tuple[list[dict[str, Any]], Any]:
    """The first ``n`` training rows in the order lmpo's seeded ``PromptStream`` yields them, and the task."""
    from lmpo.tasks import build_task
    from lmpo.train.data import PromptStream

    task = build_task("arithmetic", seed=seed)
    stream = PromptStream(task.train, seed)
    return stream.take(n), task


# ------------------------------------------------------------------------------------------------------ lmpo
def lmpo_overrides(spec: dict[str, Any], out_dir: str) -> list[str]:
    """lmpo config overrides of the shared workload (see the module docstring) plus ``spec["overrides"]``."""
    overrides = [
        f"model.name={spec['model']}", "method=grpo", "kl.beta=0", "task.name=arithmetic",
        f"task.params={{seed: {spec['seed']}}}", "rollout.prompts_per_step=1",
        f"rollout.num_generations={spec['group']}", f"rollout.max_new_tokens={spec['length']}",
        "rollout.temperature=1.0", f"train.steps={spec['steps']}", "train.learning_rate=1e-6",
        f"train.seed={spec['seed']}", f"train.threads={spec['threads']}", "eval.num_prompts=0", "eval.at_start=false",
        "eval.every=0", f"output.dir={out_dir}", "output.run_name=bench", "output.progress=false",
        "output.plot=false", "output.checkpoint_every=0",
    ]
    if spec["precision"] == "bf16":
        overrides.append("model.autocast=bfloat16")
    return overrides + list(spec.get("overrides", []))


def run_lmpo(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import lmpo.train.async_rollouts as rollouts
    import lmpo.train.loop as loop
    from lmpo.config import load_config
    from lmpo.rewards.reward_set import RewardSet
    from lmpo.rollout.hf import HFGenerator
    from lmpo.train.metrics import MetricsLog
    from lmpo.train.step import PolicyRunner

    clock = Clock()
    rec: dict[str, Any] = {"shape": None, "base_rss": None, "flops": 0.0}
    patched = [(loop, "load_model"), (rollouts, "collect"), (loop, "policy_update"), (loop, "save_checkpoint"),
               (HFGenerator, "__init__"), (HFGenerator, "generate"), (RewardSet, "__call__"),
               (PolicyRunner, "logprobs_nograd"), (MetricsLog, "write")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patched]
    orig = {name: fn for _, name, fn in saved}

    def load_model(*a, **kw):
        model, tok = orig["load_model"](*a, **kw)
        rec["shape"], rec["base_rss"] = model_shape(model), rss_gb()
        return model, tok

    def init(self, *a, **kw):
        orig["__init__"](self, *a, **kw)
        if spec["fixed_length"]:
            self.eos_ids = []  # every row samples exactly max_new_tokens tokens

    timed_gen = clock.wrap(orig["generate"], "generate")

    def generate(self, prompts, params):
        out = timed_gen(self, prompts, params)
        p, t = out.prompt_ids.shape[1], out.response_ids.shape[1]
        tokens = int(out.response_attn.sum())
        clock.cur["tokens"] += tokens
        rec["flops"] = flops_of(rec["shape"], out.prompt_ids.tolist(), p, t, tokens)
        return out

    def collect(*a, **kw):  # the first thing of every training step
        clock.start()
        return orig["collect"](*a, **kw)

    def write(self, step, metrics):  # the last thing of every training step (no eval, no checkpoint here)
        clock.stop()
        return orig["write"](self, step, metrics)

    loop.load_model, rollouts.collect, loop.save_checkpoint = load_model, collect, lambda *a, **kw: None
    loop.policy_update = clock.wrap(orig["policy_update"], "update")
    HFGenerator.__init__, HFGenerator.generate = init, generate
    RewardSet.__call__ = clock.wrap(orig["__call__"], "score")
    PolicyRunner.logprobs_nograd = clock.wrap(orig["logprobs_nograd"], "logprob")
    MetricsLog.write = write
    out_dir = tempfile.mkdtemp(prefix="lmpo-bench-")
    try:
        cfg = load_config(None, lmpo_overrides(spec, out_dir))
        torch.set_num_threads(spec["threads"])
        loop.train(cfg)
    finally:  # undo the patches (the worker may run inside a test process)
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        shutil.rmtree(out_dir, ignore_errors=True)
    steps = [{k: v for k, v in st.items() if not k.startswith("prep")} for st in clock.steps[spec["warmup"]:]]
    return {"side": "lmpo", "spec": spec, "steps": steps, "peak_rss_gb": peak_rss_gb(rec["base_rss"]),
            "base_rss_gb": rec["base_rss"], "update_flops": rec["flops"], "shape": rec["shape"],
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lmpo.models.load import load_model
    from lmpo.rewards.reward_set import RewardSet

    torch.set_num_threads(spec["threads"])
    model, tok = load_model(spec["model"])
    shape, base_rss = model_shape(model), rss_gb()
    rows, task = prompt_rows(spec["seed"], spec["steps"])
    rewards = RewardSet.from_specs(task.rewards)
    chat = bool(getattr(tok, "chat_template", None))  # TRL applies the chat template itself, as lmpo does
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"],
                               "answer": r["answer"]} for r in rows])
    clock = Clock()
    rec: dict[str, float] = {"flops": 0.0}

    def final_number(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rewards([str(p) for p in prompts], texts, {"answer": list(answer)})[0].tolist()

    G, T = spec["group"], spec["length"]
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=G, num_generations=G, max_completion_length=T,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_steps=spec["steps"],
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch_fused", beta=0.0, loss_type="grpo", epsilon=0.2,
        scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0, bf16=spec["precision"] == "bf16", fp16=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"],
        shuffle_dataset=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
        generation_kwargs={"min_new_tokens": T} if spec["fixed_length"] else None,
    )

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            clock.start()

        def on_step_end(self, *a, **kw):
            clock.stop()

    trainer = GRPOTrainer(model=model, reward_funcs=[final_number], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[StepTimer()])
    timed_gen = clock.wrap(trainer._generate, "generate")

    def generate(prompts):
        out = timed_gen(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        p, t = max(map(len, prompt_ids)), max(map(len, completion_ids))
        tokens = sum(map(len, completion_ids))
        clock.cur["tokens"] += tokens
        rec["flops"] = flops_of(shape, prompt_ids, p, t, tokens)
        return out

    trainer._generate = generate
    trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "score")
    trainer._get_per_token_logps_and_entropies = clock.wrap(trainer._get_per_token_logps_and_entropies, "logprob",
                                                            only_nograd=True)
    trainer._prepare_inputs = clock.wrap(trainer._prepare_inputs, "prep")
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    steps = []
    for st in clock.steps[spec["warmup"]:]:  # update = the step minus input preparation (generation and scoring)
        st = dict(st, update_s=st["step_s"] - st["prep_s"], update_cpu=st["step_cpu"] - st["prep_cpu"])
        steps.append({k: v for k, v in st.items() if not k.startswith("prep")})
    return {"side": "trl", "spec": spec, "steps": steps, "peak_rss_gb": peak_rss_gb(base_rss), "base_rss_gb": base_rss,
            "update_flops": rec["flops"], "shape": shape, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- matmul
def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """Best-of-N FLOP/s of square matmuls (fp32 and bf16) with the benchmark's thread count.

    Each size is repeated until ``budget_s`` CPU seconds are spent (at least twice): on CPUs without native bf16
    instructions a bf16 matmul can be tens of times slower than fp32, and a fixed repeat count would take minutes.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    peak: dict[str, float] = {}
    peak_cpu: dict[str, float] = {}
    detail = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in spec.get("sizes", (512, 1024)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)
            best = best_cpu = float("inf")
            spent, reps = 0.0, 0
            while reps < 2 or (spent < spec.get("budget_s", 1.0) and reps < 20):
                t0, c0 = time.perf_counter(), time.process_time()
                torch.mm(a, b)
                dc = time.process_time() - c0
                best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, dc)
                spent, reps = spent + dc, reps + 1
            f, f_cpu = 2 * n**3 / best, 2 * n**3 / max(best_cpu, 1e-9)
            detail.append({"dtype": name, "n": n, "flops_per_s": f, "flops_per_cpu_s": f_cpu})
            peak[name] = max(peak.get(name, 0.0), f)
            peak_cpu[name] = max(peak_cpu.get(name, 0.0), f_cpu)
    stream, stream_cpu, read, read_cpu = weight_stream(torch, spec.get("rows", 8), spec.get("stream_mb", 256))
    return {"side": "matmul", "spec": spec, "peak_flops": peak, "peak_flops_cpu": peak_cpu, "detail": detail,
            "stream_bytes_per_s": stream, "stream_bytes_per_cpu_s": stream_cpu, "read_bytes_per_s": read,
            "read_bytes_per_cpu_s": read_cpu, "threads": torch.get_num_threads()}


def weight_stream(torch, rows: int, total_mb: int) -> tuple[float, float, float, float]:
    """Weight bytes per second (wall, CPU) of a decode-shaped pass, then of a plain read of the same weights.

    The pass: ``rows`` activations times a stack of 576x1536 fp32 linear layers totalling ``total_mb`` MB, far beyond
    the caches, as one sampling step reads a model (the rate the matmul library reaches at this shape). The read:
    ``sum()`` over the same tensors, the memory bandwidth one thread gets; a decode step cannot beat it.
    """
    n = max(2, int(total_mb * 2**20 // (576 * 1536 * 4)))
    weights = [torch.randn(1536, 576) for _ in range(n)]
    x = torch.randn(rows, 576)
    nbytes = sum(w.numel() * 4 for w in weights)
    rates = []
    for fn in (lambda w: torch.nn.functional.linear(x, w), lambda w: w.sum()):
        best = best_cpu = float("inf")
        for _ in range(4):
            t0, c0 = time.perf_counter(), time.process_time()
            for w in weights:
                fn(w)
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
        rates += [nbytes / best, nbytes / max(best_cpu, 1e-9)]
    return tuple(rates)


def run(spec: dict[str, Any]) -> None:
    fn = {"lmpo": run_lmpo, "trl": run_trl, "matmul": run_matmul}[spec["side"]]
    print(emit(fn(spec)), flush=True)


if __name__ == "__main__":  # pragma: no cover - called through bench.py
    import sys

    run(json.loads(sys.argv[1]))
    os._exit(0)
