"""``train(cfg)``: the whole RL loop as one function that reads top to bottom.

generate -> reward -> shape -> select (refill) -> old/ref log-probs -> advantage -> update -> eval -> checkpoint
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpo import ops
from lmpo.perf import resolve_autocast, set_mmap_threshold
from lmpo.config import Config, build_components, save_config
from lmpo.errors import LmpoError, TrainingDiverged
from lmpo.models.load import apply_lora, enable_activation_checkpointing, load_model
from lmpo.models.token_stats import STAT_NEEDS
from lmpo.rewards.reward_set import RewardSet, RewardSpec
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.rollout.modes import build_train_generator
from lmpo.tasks import build_task
from lmpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from lmpo.train.data import PromptStream
from lmpo.train import inbackward
from lmpo.train.evaluate import evaluate
from lmpo.train.metrics import MetricsLog, peak_rss_gb, plot_run, read_metrics
from lmpo.train.rollouts import RolloutContext, collect
from lmpo.train.step import PolicyRunner, UpdateSettings, policy_update
from lmpo.train.trackers import check_available, close_log, tracked_log


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def run_name(cfg: Config) -> str:
    return cfg.output.run_name or f"{cfg.method}-{cfg.task.name}-seed{cfg.train.seed}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, cfg: Config, total: int):
    warm, kind = cfg.train.warmup_steps, cfg.train.lr_scheduler

    def factor(i: int) -> float:
        if warm and i < warm:
            return (i + 1) / warm
        frac = min(1.0, (i - warm) / max(1, total - warm))
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_rewards(cfg: Config, task) -> RewardSet:
    if cfg.rewards is None:
        return RewardSet.from_specs(task.rewards)
    specs = []
    for i, item in enumerate(cfg.rewards):
        if not isinstance(item, dict) or "name" not in item:
            raise LmpoError(f"rewards[{i}] must be a mapping with a name, e.g. {{name: final_number, weight: 1.0}}; got {item!r}.")
        kw = {k: v for k, v in item.items() if k not in ("name", "weight")}
        specs.append(RewardSpec(name=item["name"], weight=float(item.get("weight", 1.0)), kwargs=kw))
    return RewardSet.from_specs(specs)


def setup_model(cfg: Config):
    m = cfg.model
    model, tokenizer = load_model(m.name, dtype=m.dtype, gguf_file=m.gguf_file, seed=cfg.train.seed)
    ref = None
    if m.lora.enabled:
        model = apply_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                           target_modules=m.lora.target_modules)
    elif cfg.kl.beta > 0:  # full fine-tuning keeps a frozen copy as the KL reference
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    if m.gradient_checkpointing is True:
        enable_activation_checkpointing(model)
    return model, tokenizer, ref


def rollout_context(cfg: Config, model, tokenizer, task, rewards, comps) -> RolloutContext:
    r = cfg.rollout
    return RolloutContext(
        generator=HFGenerator(model, tokenizer, batch_size=r.batch_size, autocast=cfg.model.autocast,
                              prepack=r.prepack, decode_kernel=r.decode_kernel,
                              lean=r.lean_decode, sampler=r.sampler),
        tokenizer=tokenizer, reward_set=rewards, shapers=comps["shapers"], selectors=comps["selectors"],
        params=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens),
        num_generations=r.num_generations, system_prompt=task.system_prompt,
        train_generator=build_train_generator(r.mode, r.mode_params, model, tokenizer, r.batch_size, cfg.model.autocast),
        planners=[comps["advantage"], comps["loss"], *comps["shapers"], *comps["selectors"]],  # rollout hooks
    )


def evaluate_run(cfg: Config, run_dir: Path | None = None, checkpoint: str | None = None) -> dict[str, float]:
    """Held-out metrics of a run's latest (or given) checkpoint, or of the configured base model."""
    cfg.model.autocast = resolve_autocast(cfg.model.autocast)
    comps = build_components(cfg)
    task = build_task(cfg.task.name, **cfg.task.params)
    rewards = build_rewards(cfg, task)
    cfg.kl.beta = 0.0  # no reference model needed for evaluation
    model, tokenizer, _ = setup_model(cfg)
    ckpt = Path(checkpoint) if checkpoint else (latest_checkpoint(run_dir) if run_dir else None)
    if run_dir is not None and ckpt is None:
        raise LmpoError(f"No checkpoint under {str(run_dir)!r}; nothing to evaluate (train it first).")
    if ckpt is not None:
        load_checkpoint(ckpt, model)
    ctx = rollout_context(cfg, model, tokenizer, task, rewards, comps)
    out = evaluate(ctx, task.eval[: cfg.eval.num_prompts], cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                   cfg.eval.correct_threshold, cfg.eval.pass_k)
    return {"checkpoint": str(ckpt) if ckpt else None, **out}


def ref_runner(cfg: Config, runner: PolicyRunner, ref_model):
    """Reference log-probs: the frozen copy, or the LoRA model with its adapters disabled."""
    if ref_model is not None:
        return PolicyRunner(ref_model, runner.temperature, runner.chunk_size, runner.autocast,
                            packed=runner.packed), None
    return runner, runner.model.disable_adapter


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> RunResult:
    check_available(cfg.output.report_to)  # a tracker's missing package fails before anything is written
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.output.dir) / run_name(cfg)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise LmpoError(f"--resume: no checkpoint found under {str(run_dir)!r}; start the run without --resume.")
    if not resume and latest_checkpoint(run_dir) is not None and not overwrite:
        raise LmpoError(
            f"Run folder {str(run_dir)!r} already holds checkpoints. Continue it with --resume, pick another "
            "output.run_name, or pass --overwrite to start over (its checkpoints will be replaced)."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.train.seed)
    set_mmap_threshold(cfg.train.mmap_threshold_kb)
    cfg.model.autocast = resolve_autocast(cfg.model.autocast)

    # ---------------------------------------------------------------- components, task, model
    comps = build_components(cfg)
    advantage_fn, loss_fn, aggregator = comps["advantage"], comps["loss"], comps["aggregator"]
    task = build_task(cfg.task.name, **cfg.task.params)
    rewards = build_rewards(cfg, task)
    model, tokenizer, ref_model = setup_model(cfg)
    r = cfg.rollout
    runner = PolicyRunner(model, r.temperature, cfg.model.chunk_size, cfg.model.autocast,
                          packed=cfg.model.packed_forward,
                          recompute="attention" if cfg.model.gradient_checkpointing == "attention" else None)
    ctx = rollout_context(cfg, model, tokenizer, task, rewards, comps)
    stream = PromptStream(task.train, cfg.train.seed)
    eval_rows = task.eval[: cfg.eval.num_prompts]
    eval_tokens = cfg.eval.max_new_tokens or r.max_new_tokens

    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: same update, about 6x less CPU time and ~0.5 GB lower peak than foreach on the default model
    # (benchmarks/levers.py; docs/results/performance.md)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                  betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                  fused=all(p.device.type in ("cpu", "cuda") for p in params))
    t = cfg.train
    # AdamW folded into backward (lmpo.train.inbackward)
    fold = inbackward.wanted(t.optimizer_in_backward, params,
                             cfg.model.gradient_checkpointing is True or runner.packed_applies())
    inb = inbackward.BackwardAdamW(optimizer) if fold else None
    scheduler = make_scheduler(optimizer, cfg, t.steps * t.ppo_epochs * t.num_minibatches)
    settings = UpdateSettings(
        ppo_epochs=t.ppo_epochs, num_minibatches=t.num_minibatches, micro_batch_size=t.micro_batch_size,
        max_grad_norm=t.max_grad_norm, kl_beta=cfg.kl.beta, kl_estimator=cfg.kl.estimator,
        kl_in_loss=cfg.kl.mode == "loss", entropy_coef=t.entropy_coef, horizon=r.max_new_tokens,
    )
    stateful = {"advantage": advantage_fn, "loss": loss_fn, **{f"shaper{i}": s for i, s in enumerate(comps["shapers"])},
                **{f"selector{i}": s for i, s in enumerate(comps["selectors"])}}
    stateful = {k: v for k, v in stateful.items() if hasattr(v, "state_dict")}
    if inb is not None:  # its clip-factor guess, so a resumed run folds exactly as the uninterrupted one
        stateful["optimizer_in_backward"] = inb
    needs = set().union(*(getattr(c, "needs", frozenset()) for c in [advantage_fn, loss_fn, *comps["shapers"], *comps["selectors"]]))
    # A separate old-log-prob pass is only needed when pi_old differs from the policy at update time.
    off_policy = t.ppo_epochs > 1 or t.num_minibatches > 1
    need_old = ("old_logprobs" in needs and off_policy) or (cfg.kl.beta > 0 and cfg.kl.mode == "reward")
    ref_run, ref_ctx = ref_runner(cfg, runner, ref_model) if cfg.kl.beta > 0 else (None, None)

    # ---------------------------------------------------------------- resume
    start = 0
    eval_before: dict[str, float] = {}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        start = state["step"]
        stream.load_state_dict(state["data"])
        for k, comp in stateful.items():
            if k == "optimizer_in_backward" and k not in state["components"]:  # a run saved before it existed
                continue
            comp.load_state_dict(state["components"][k])
        eval_before = state.get("eval_before", {})
        set_rng_state(state["rng"])
    log = tracked_log(MetricsLog(run_dir / "metrics.jsonl", resume_step=start if ckpt is not None else None),
                      cfg, run_dir, run_name(cfg), resume_step=start if ckpt is not None else None)

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, model, optimizer, scheduler, keep=cfg.output.keep_checkpoints, extra={
            "data": stream.state_dict(), "eval_before": eval_before,
            "components": {k: c.state_dict() for k, c in stateful.items()}})

    if start == 0 and cfg.eval.at_start and eval_rows:
        eval_before = evaluate(ctx, eval_rows, eval_tokens, cfg.eval.correct_threshold, cfg.eval.pass_k)
        log.write(0, eval_before)

    progress = None
    if cfg.output.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=t.steps, initial=start, desc=run_name(cfg), dynamic_ncols=True)

    eval_after = dict(eval_before)
    last_good = start
    try:
        for step in range(start + 1, t.steps + 1):
            t0 = time.perf_counter()
            batch, raw, stats = collect(ctx, stream, r.prompts_per_step, r.refill_rounds, step)
            t_gen = time.perf_counter() - t0
            metrics: dict[str, Any] = dict(stats)
            lengths = ops.response_lengths(raw.response_attn)
            metrics.update({
                "reward/mean": raw.rewards.mean(), "reward/std": raw.rewards.std() if raw.batch_size > 1 else 0.0,
                "rollout/length": lengths.mean(), "rollout/truncated": raw.truncated.float().mean(),
            })
            for k, name in enumerate(rewards.names):
                metrics[f"reward/{name}"] = raw.reward_components[:, k].mean()
            if batch is not None:
                t1 = time.perf_counter()
                need_entropy = "entropy" in needs  # per-token entropy for components that score tokens by it (D3S)
                if need_old or need_entropy:  # one no-grad pass under the pre-update weights serves both
                    lp_old, ent = runner.logprobs_entropy_nograd(batch, t.micro_batch_size, with_entropy=need_entropy)
                    if need_old:
                        batch = batch.replace(old_logprobs=lp_old)
                    if need_entropy:
                        batch = batch.replace(extras={**batch.extras, "entropy": ent})
                if off_policy and STAT_NEEDS & needs:  # pi_old's full-distribution statistics (ROVER, OTR, SofT-GRPO)
                    batch = batch.replace(extras={**batch.extras, **runner.old_stats_nograd(
                        batch, t.micro_batch_size, STAT_NEEDS & needs)})
                if ref_run is not None:
                    with ref_ctx() if ref_ctx else contextlib.nullcontext():
                        batch = batch.replace(ref_logprobs=ref_run.logprobs_nograd(batch, t.micro_batch_size))
                if cfg.kl.beta > 0 and cfg.kl.mode == "reward":
                    kl = ops.kl_estimate(batch.old_logprobs, batch.ref_logprobs, cfg.kl.estimator)
                    batch = batch.replace(token_rewards=torch.where(batch.response_mask, -cfg.kl.beta * kl, 0.0))
                    metrics["reward/kl_penalty"] = ops.masked_sum(batch.token_rewards, batch.response_mask, -1).mean()
                if not off_policy:
                    batch = batch.replace(old_logprobs=None)  # the update uses the detached current log-probs
                batch = batch.replace(advantages=advantage_fn(batch))
                if hasattr(advantage_fn, "token_mask"):  # post-advantage down-sampling: train on a subset of tokens
                    keep = advantage_fn.token_mask(batch)
                    batch = batch.replace(response_mask=batch.response_mask & keep, advantages=batch.advantages * keep)
                t2 = time.perf_counter()
                metrics.update(policy_update(runner, optimizer, scheduler, batch, loss_fn, aggregator, settings, step,
                                             inb))
                for comp in ctx.planners:  # stateful components learn from the step (per-prompt trackers)
                    if callable(getattr(comp, "observe", None)):
                        comp.observe(batch, lambda b: runner.logprobs_nograd(b, t.micro_batch_size))
                metrics["perf/logprob_s"] = t2 - t1
                metrics["perf/update_s"] = time.perf_counter() - t2
            ctx.generator.sync_weights()
            metrics.update({"perf/step_s": time.perf_counter() - t0, "perf/generate_s": t_gen,
                            "perf/tokens_per_s": float(lengths.sum()) / max(t_gen, 1e-9), "perf/peak_rss_gb": peak_rss_gb()})
            if cfg.eval.every and step % cfg.eval.every == 0 or step == t.steps:
                if eval_rows:
                    eval_after = evaluate(ctx, eval_rows, eval_tokens, cfg.eval.correct_threshold, cfg.eval.pass_k)
                    metrics.update(eval_after)
            row = log.write(step, metrics)
            last_good = step
            if cfg.output.checkpoint_every and step % cfg.output.checkpoint_every == 0 or step == t.steps:
                checkpoint(step)
            if progress is not None:
                progress.update(1)
                progress.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in
                                      ("reward/mean", "loss/kl", "loss/entropy", "perf/tokens_per_s") if k in row})
    except TrainingDiverged as exc:
        saved = latest_checkpoint(run_dir)
        where = f"the last good checkpoint is {str(saved)!r}" if saved else "no checkpoint had been written yet"
        raise TrainingDiverged(f"{exc} (Last completed step: {last_good}; {where}.)") from None
    finally:
        if progress is not None:
            progress.close()
        close_log(log)
    history = read_metrics(run_dir / "metrics.jsonl")
    if cfg.output.plot and history:
        plot_run(history, run_dir / "curves.png", run_name(cfg))
    result = RunResult(run_dir, t.steps, eval_before, eval_after, history)
    (run_dir / "summary.json").write_text(json.dumps(
        {"eval_before": eval_before, "eval_after": eval_after, "steps": t.steps, "peak_rss_gb": peak_rss_gb(),
         # what model.autocast resolved to on this machine ("auto" measures at start), null = float32
         "autocast": cfg.model.autocast}, indent=2))
    return result
