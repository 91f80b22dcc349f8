"""``train(cfg)``: the whole RL loop as one function that reads top to bottom.

    open_run (build and validate everything, then write the run folder)
    for each step: collect -> prepare -> update -> observe -> evaluate -> checkpoint
    finish (curves, summary.json)

The outer step loop (evaluate, metrics row, checkpoint, progress, a diverged run's message) is :func:`drive`,
shared with the preference run (:mod:`lmpo.train.preference_run`) and the scorer stages
(:mod:`lmpo.train.scorer_stage`). collect: :mod:`lmpo.train.rollouts`; prepare (old/ref log-probs, KL,
advantages, token mask): :mod:`lmpo.train.prepare`; update: :func:`lmpo.train.step.policy_update`; the components
and extension points: :class:`lmpo.pipeline.Pipeline`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.config import Config
from lmpo.errors import LmpoError, TrainingDiverged
from lmpo.models.load import apply_lora, enable_activation_checkpointing, load_model
from lmpo.engine import setup_inference, setup_process
from lmpo.engine.device import peak_gpu_gb, resolve_device
from lmpo.engine.threads import ThreadTuner
from lmpo.pipeline import Pipeline, build_pipeline
from lmpo.rewards.reward_set import RewardSet, RewardSpec
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.rollout.modes import build_train_generator, policy_horizon
from lmpo.tasks import build_task
from lmpo.train import dist as dist_
from lmpo.train.critic import Critic, build_critic
from lmpo.train import dist_checkpoint
from lmpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from lmpo.train.data import PromptStream
from lmpo.train.evaluate import evaluate
from lmpo.train.metrics import MetricsLog, peak_rss_gb, plot_run, read_metrics
from lmpo.engine.optim import TrainOptimizer, build_optimizer
from lmpo.train.prepare import ReferencePolicy, prepare
from lmpo.train.async_rollouts import AsyncRollouts, SyncRollouts
from lmpo.train.rollouts import RolloutContext
from lmpo.train.rundir import Plan, RunFolder
from lmpo.train.trackers import check_available, close_log, tracked_log
from lmpo.train.step import PolicyRunner, UpdateSettings, policy_update


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def run_name(cfg: Config) -> str:
    if cfg.stage != "rl":  # a scorer stage (lmpo.train.scorer_stage) has no method or task
        return cfg.output.run_name or f"{cfg.stage}-seed{cfg.train.seed}"
    return cfg.output.run_name or f"{cfg.method}-{cfg.task.name}-seed{cfg.train.seed}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def setup_model(cfg: Config, need_ref: bool):
    """The policy on ``cfg.device``, its tokenizer and, for full fine-tuning with a reference (``need_ref``), a
    frozen copy of it (with LoRA the reference is the base model: the adapters disabled)."""
    m = cfg.model
    attn = None if m.attn_implementation == "auto" else m.attn_implementation  # auto: resolved by apply_device
    model, tokenizer = load_model(m.name, dtype=m.dtype, gguf_file=m.gguf_file, seed=cfg.train.seed,
                                  attn_implementation=attn)
    model.to(resolve_device(cfg.device))  # cfg.device as resolved at the start (lmpo.engine.device); CPU: no-op
    ref = None
    if m.lora.enabled:
        model = apply_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                           target_modules=m.lora.target_modules)
    elif need_ref:  # full fine-tuning keeps a frozen copy as the reference
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    if m.gradient_checkpointing is True:
        enable_activation_checkpointing(model)
    return model, tokenizer, ref


def build_generator(cfg: Config, model, tokenizer):
    """The plain sampler of ``rollout.backend``: lmpo's own decode loop (``hf``) or a vLLM engine (``vllm``)."""
    r = cfg.rollout
    if r.backend == "vllm":
        from lmpo.rollout.vllm import VLLMGenerator, vllm_options

        return VLLMGenerator(model, tokenizer, vllm_options(r.vllm), seed=cfg.train.seed, dtype=cfg.model.dtype)
    return HFGenerator(model, tokenizer, batch_size=r.batch_size, autocast=cfg.model.autocast, prepack=r.prepack,
                       decode_kernel=r.decode_kernel, lean=r.lean_decode, sampler=r.sampler)


def close_generators(ctx: RolloutContext | None) -> None:
    """Stop the rollout engines' processes (a vLLM engine or server); nothing for the in-process sampler."""
    if ctx is None:
        return
    for gen in (ctx.generator, ctx.train_generator, getattr(ctx.train_generator, "sampler", None)):
        close = getattr(gen, "close", None)
        if callable(close):
            close()


def rollout_context(cfg: Config, model, tokenizer, task, rewards, pipeline: Pipeline) -> RolloutContext:
    r = cfg.rollout
    generator = build_generator(cfg, model, tokenizer)
    return RolloutContext(
        generator=generator,
        tokenizer=tokenizer, reward_set=rewards, pipeline=pipeline,
        params=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens),
        num_generations=r.num_generations, system_prompt=task.system_prompt,
        train_generator=build_train_generator(r.mode, r.mode_params, model, tokenizer, r.batch_size, cfg.model.autocast,
                                              sampler=generator if r.backend != "hf" else None),
    )


def evaluate_run(cfg: Config, run_dir: Path | None = None, checkpoint: str | None = None) -> dict[str, float]:
    """Held-out metrics of a run's latest (or given) checkpoint, or of the configured base model."""
    setup_inference(cfg)  # threads and measured precision, as a run's start (lmpo.engine)
    pipeline = build_pipeline(cfg)
    task = build_task(cfg.task.name, **cfg.task.params)
    rewards = build_rewards(cfg, task)
    model, tokenizer, _ = setup_model(cfg, need_ref=False)  # no reference model needed for evaluation
    ckpt = Path(checkpoint) if checkpoint else (latest_checkpoint(run_dir) if run_dir else None)
    if run_dir is not None and ckpt is None:
        raise LmpoError(f"No checkpoint under {str(run_dir)!r}; nothing to evaluate (train it first).")
    if ckpt is not None and dist_checkpoint.is_sharded(ckpt):  # written on several ranks
        dist_checkpoint.load(ckpt, model, None, None, None)
    elif ckpt is not None:
        saved = load_checkpoint(ckpt, model).get("components", {})
        for key, fn in rewards.stateful().items():  # a reward's state at that step (mpo_judge's evolved rubric)
            if key in saved:
                fn.load_state_dict(saved[key])
    ctx = rollout_context(cfg, model, tokenizer, task, rewards, pipeline)
    try:
        out = evaluate(ctx, task.eval[: cfg.eval.num_prompts], cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                       cfg.eval.correct_threshold, cfg.eval.pass_k)
    finally:
        close_generators(ctx)
    return {"checkpoint": str(ckpt) if ckpt else None, **out}


@dataclass
class Run:
    """One training run, everything built and validated before its folder is written (:func:`open_run`)."""

    cfg: Config
    folder: RunFolder
    pipeline: Pipeline
    rewards: RewardSet
    model: torch.nn.Module
    runner: PolicyRunner
    ref: ReferencePolicy | None
    opt: TrainOptimizer
    ctx: RolloutContext
    stream: PromptStream
    eval_rows: list[dict[str, Any]]
    start: int = 0
    eval_before: dict[str, float] = field(default_factory=dict)
    log: MetricsLog | None = None
    threads: ThreadTuner | None = None  # train.threads over the run (lmpo.engine.threads)
    critic: Critic | None = None  # the value model, when a component needs values (lmpo.train.critic)
    rollouts: SyncRollouts | AsyncRollouts | None = None  # collection, in this thread or ahead of it (train.async)
    dist: dist_.DistRun | None = None  # this process's rank under several ranks (lmpo.train.dist)

    @property
    def dir(self) -> Path:
        return self.folder.path

    def stateful(self) -> dict[str, Any]:
        """Checkpoint entry -> object with state: the pipeline's stateful components and the folded optimizer."""
        out = self.pipeline.stateful()
        out.update(self.rewards.stateful())  # rewards with state (mpo_judge's rubric), as ``reward:<name>``
        if self.opt.folded is not None:  # its clip-factor guess, so a resumed run folds as the uninterrupted one
            out["optimizer_in_backward"] = self.opt
        if self.critic is not None:  # its head (and separate model), and its optimizer
            out["critic"] = self.critic
        return out

    def restore(self, ckpt: Path) -> None:
        if dist_checkpoint.is_sharded(ckpt):  # written on several ranks (torch.distributed.checkpoint)
            state = dist_checkpoint.load(ckpt, self.model, self.opt.optimizer, self.opt.scheduler, self.dist,
                                         seed=self.cfg.train.seed)
        elif self.dist is not None:  # a single process's checkpoint on several ranks: each keeps its part
            state = dist_checkpoint.load_whole(ckpt, self.model, self.opt.optimizer, self.opt.scheduler, self.dist,
                                               seed=self.cfg.train.seed)
        else:
            state = load_checkpoint(ckpt, self.model, self.opt.optimizer, self.opt.scheduler)
        self.start, self.eval_before = state["step"], state.get("eval_before", {})
        self.stream.load_state_dict(state["data"])
        self.rollouts.load_state_dict(state.get("async"))  # train.async's queued batches (None: synchronous)
        for key, obj in self.stateful().items():
            if key == "optimizer_in_backward" and key not in state["components"]:  # saved before it existed
                continue
            if key not in state["components"]:
                raise LmpoError(f"Checkpoint {ckpt} holds no state for {key!r} (saved: {sorted(state['components'])}); "
                                "it was written by a run with other components or rewards. Resume with the config "
                                "that wrote it, or start a new run.")
            obj.load_state_dict(state["components"][key])
        set_rng_state(state["rng"])  # this rank's (lmpo.train.dist_checkpoint)

    def checkpoint(self, step: int) -> None:
        queued = self.rollouts.state_dict(step)  # first: train.async waits for its in-flight steps to be queued
        extra = {"data": self.stream.state_dict(), "eval_before": self.eval_before,
                 "components": {k: c.state_dict() for k, c in self.stateful().items()}}
        if queued is not None:
            extra["async"] = queued
        if self.dist is not None:  # sharded: every rank writes its part (lmpo.train.dist_checkpoint)
            with self.dist.sharded():  # FSDP2: the parameters as their shards while DCP reads them
                dist_checkpoint.save(self.dir, step, self.model, self.opt.optimizer, self.opt.scheduler, self.dist,
                                     keep=self.cfg.output.keep_checkpoints, extra=extra)
            return
        save_checkpoint(self.dir, step, self.model, self.opt.optimizer, self.opt.scheduler,
                        keep=self.cfg.output.keep_checkpoints, extra=extra)

    def evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        return evaluate(self.ctx, self.eval_rows, e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                        e.correct_threshold, e.pass_k)

    def settings(self) -> UpdateSettings:
        t, r = self.cfg.train, self.cfg.rollout
        return UpdateSettings(ppo_epochs=t.ppo_epochs, num_minibatches=t.num_minibatches,
                              micro_batch_size=t.micro_batch_size, kl=self.pipeline.kl, entropy_coef=t.entropy_coef,
                              horizon=policy_horizon(r.mode, r.mode_params, r.max_new_tokens), critic=self.critic,
                              dist=self.dist)


def open_run(cfg: Config, folder: RunFolder, plan: Plan, dist: dist_.DistRun | None = None) -> Run:
    """Build and validate everything a run needs (pipeline, task, rewards, model, optimizer, checkpoint), then
    write its folder (:meth:`RunFolder.begin`): a run that cannot start leaves nothing behind and changes nothing.

    ``dist``: this rank under several ranks (lmpo.train.dist): the same build on every rank, the model wrapped for
    gradient synchronisation, this rank's share of the prompts, its own sampling seed, the folded AdamW off."""
    check_available(cfg.output.report_to)  # the trackers' packages (output.report_to)
    # the order below fixes which random numbers each part draws (runs are reproducible from the seed)
    seed_everything(cfg.train.seed)
    threads = setup_process(cfg)  # threads, allocator, measured precision (lmpo.engine)
    pipeline = build_pipeline(cfg)
    if dist is not None:
        why = dist_.unsupported(cfg, pipeline, dist.world)
        if why:
            raise LmpoError(f"This config cannot run on {dist.world} ranks: {why} (docs/distributed.md).")
    task = build_task(cfg.task.name, **cfg.task.params)
    rewards = build_rewards(cfg, task)
    if dist is not None and rewards.stateful():
        raise LmpoError(f"This config cannot run on {dist.world} ranks: reward {next(iter(rewards.stateful()))[7:]!r} "
                        "keeps state across steps and each rank would see only its share (docs/distributed.md).")
    model, tokenizer, ref_model = setup_model(cfg, need_ref=pipeline.plan.ref_logprobs)
    m, t = cfg.model, cfg.train
    if dist is not None:
        if t.optimizer_in_backward is True:
            raise LmpoError("train.optimizer_in_backward=true steps each weight inside backward, before the ranks have "
                            "summed its gradient; set it to auto or false under several ranks (docs/distributed.md).")
        t = dataclasses.replace(t, optimizer_in_backward=False)  # auto: off under several ranks
        dist.wrap(model)
    runner = PolicyRunner(model, cfg.rollout.temperature, m.chunk_size, m.autocast, packed=m.packed_forward,
                          recompute="attention" if m.gradient_checkpointing == "attention" else None)
    ctx = rollout_context(cfg, model, tokenizer, task, rewards, pipeline)
    stream = PromptStream(task.train, t.seed)
    if dist is not None:  # every rank draws the step's rows in the same order and keeps its own groups
        stream = dist_.ShardedStream(stream, dist.rank, dist.world)
        runner.train_call = dist.train_call
    params = [p for p in model.parameters() if p.requires_grad]
    critic = build_critic(cfg, model, runner) if pipeline.plan.values else None
    # a shared critic's head takes gradient from the policy's backward: AdamW is then not folded into it
    opt = build_optimizer(params, t, t.steps * t.ppo_epochs * t.num_minibatches,
                          single_use=(m.gradient_checkpointing is True or runner.packed_applies())
                          and not (critic is not None and critic.shared))
    ref = None
    if pipeline.plan.ref_logprobs:  # the frozen copy, or the LoRA model with its adapters disabled
        ref = (ReferencePolicy(PolicyRunner(ref_model, runner.temperature, runner.chunk_size, runner.autocast,
                                            packed=runner.packed)) if ref_model is not None
               else ReferencePolicy(runner, model.disable_adapter))
    r = cfg.rollout
    per_rank = r.prompts_per_step // (dist.world if dist is not None else 1)
    rollouts = (SyncRollouts(ctx, stream, per_rank, r.refill_rounds) if t.async_ is None else
                AsyncRollouts(ctx, stream, r.prompts_per_step, r.refill_rounds, t.async_.max_staleness, t.steps, t.seed,
                              runner, t.micro_batch_size))
    run = Run(cfg, folder, pipeline, rewards, model, runner, ref, opt, ctx, stream, task.eval[: cfg.eval.num_prompts],
              threads=threads, critic=critic, rollouts=rollouts, dist=dist)
    if dist is not None and dist.rank > 0:  # its own sampling stream (a checkpoint restores each rank's own)
        seed_everything(dist_.rank_seed(t.seed, dist.rank))
    if plan.checkpoint is not None:
        run.restore(plan.checkpoint)
    if dist is not None:
        dist.gathered()  # FSDP2: whole weights for sampling (every rank, together); nothing under DDP
    folder.begin(plan)  # everything validated: the first write (lock, clean-up, config.yaml)
    resume_step = run.start if plan.checkpoint is not None else None
    if dist is not None and not dist.main:  # rank 0 writes the metrics and evaluates
        run.log, run.eval_rows = dist_.NullLog(), []
        return run
    run.log = tracked_log(MetricsLog(folder.path / "metrics.jsonl", resume_step=resume_step), cfg, folder.path,
                          run_name(cfg), resume_step=resume_step)  # metrics.jsonl, and output.report_to's trackers
    return run


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One step: collect -> prepare -> update -> observe; returns the step's metrics."""
    p, t = run.pipeline, run.cfg.train
    t0 = time.perf_counter()
    threads = run.threads.before_step() if run.threads is not None else None  # auto: measured again (long steps)
    got = run.rollouts.next(step)  # collected here, or taken from train.async's queue (waiting for it)
    batch, raw, t_gen = got.batch, got.raw, got.generate_s
    # rewards that learn across steps (mpo_judge's rubric) see the step's samples, after they were scored
    run.rewards.after_step([m.get("prompt", "") for m in raw.meta], [m.get("completion", "") for m in raw.meta],
                           raw.reward_components)
    metrics: dict[str, Any] = {**got.stats, **rollout_metrics(raw, run.rewards.names), **got.metrics,
                               **run.rewards.pop_metrics()}  # scorers' failure counts (lmpo.rewards.scorer_base)
    if batch is not None:  # None: every group was filtered out (nothing to learn from this step)
        t1 = time.perf_counter()
        batch, prep = prepare(batch, p, run.runner, run.ref, t.micro_batch_size, run.critic,
                              behaviour=got.behaviour)
        t2 = time.perf_counter()
        metrics.update(prep)
        metrics.update(policy_update(run.runner, run.opt, batch, p.loss, p.aggregator, run.settings(), step,
                                     p.hook("lr_scale"), p.calls("after_optimizer_step")))
        if run.dist is not None:  # FSDP2: the updated shards gathered into whole weights (the sampler's weight sync)
            run.dist.gathered()
        for observe in p.calls("observe"):  # per-prompt trackers learn from the step
            observe(batch, lambda b: run.runner.logprobs_nograd(b, t.micro_batch_size))
        metrics.update({"perf/logprob_s": t2 - t1, "perf/update_s": time.perf_counter() - t2})
    t_sync = time.perf_counter()
    run.ctx.generator.sync_weights()  # an external engine (rollout.backend=vllm) gets the changed weights
    if getattr(run.ctx.generator, "last_sync_s", None) is not None:
        metrics["perf/sync_s"] = time.perf_counter() - t_sync
    if threads is not None:
        metrics["perf/threads"] = threads
    step_s = time.perf_counter() - t0
    if run.threads is not None:
        run.threads.after_step(step_s)
    metrics.update({"perf/step_s": step_s, "perf/generate_s": t_gen,
                    "perf/tokens_per_s": float(metrics.pop("_tokens")) / max(t_gen, 1e-9),
                    "perf/peak_rss_gb": peak_rss_gb()})
    if run.dist is not None:  # one row for the run: means over every rank's rows, sums, the slowest rank's times
        return run.dist.reduce_metrics(metrics, raw.batch_size)
    return metrics


def rollout_metrics(raw: RolloutBatch, reward_names: list[str]) -> dict[str, Any]:
    lengths = ops.response_lengths(raw.response_attn)
    out = {"reward/mean": raw.rewards.mean(), "reward/std": raw.rewards.std() if raw.batch_size > 1 else 0.0,
           "rollout/length": lengths.mean(), "rollout/truncated": raw.truncated.float().mean(),
           "_tokens": raw.response_mask.sum()}  # generated tokens (not a multi-turn episode's observations)
    out.update({f"reward/{name}": raw.reward_components[:, k].mean() for k, name in enumerate(reward_names)})
    return out


def due(every: int, step: int, last: int) -> bool:
    return bool(every and step % every == 0) or step == last


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> RunResult:
    """One run; under ``torchrun`` (``WORLD_SIZE`` > 1) this process's rank of it (lmpo.train.dist); with
    ``train.dist.placement: ray`` the controller of ranks started as Ray actors (lmpo.train.ray_placement)."""
    if cfg.train.dist.placement == "ray" and dist_.world_size() <= 1:
        from lmpo.train.ray_placement import train_on_ray

        return train_on_ray(cfg, resume, overwrite)
    if cfg.preference is not None and dist_.world_size() > 1:
        raise LmpoError("The offline preference stage (preference:) runs in one process; start it without torchrun "
                        "(docs/distributed.md).")
    dist = dist_.init(cfg)
    clean = False
    try:
        result = _open_and_run(cfg, resume, overwrite, dist)
        clean = True
        return result
    finally:
        dist_.shutdown(dist, clean)


def _open_and_run(cfg: Config, resume: bool, overwrite: bool, dist: dist_.DistRun | None) -> RunResult:
    """The run folder's plan (rank 0 owns the folder; the other ranks follow its plan), then the stage."""
    path = Path(cfg.output.dir) / run_name(cfg)
    if dist is not None and not dist.main:  # rank 0 owns the folder; the others follow its plan
        plan = dist_.shared_plan(dist, None, resume, overwrite, cfg.train.steps)
        if plan.finished:
            return RunResult(path, plan.step)
        return _run(cfg, dist_.FollowerFolder(path), plan, dist)
    with RunFolder(path, cfg) as folder:  # one writer; a failed start leaves nothing
        # read-only checks, before anything is built
        plan = (folder.plan(resume, overwrite, cfg.train.steps) if dist is None else
                dist_.shared_plan(dist, folder, resume, overwrite, cfg.train.steps))
        if plan.finished:  # says so and changes nothing
            return RunResult(folder.path, plan.step, **folder.finished_run(plan))
        if cfg.preference is not None:  # the offline preference stage: pairs instead of rollouts
            from lmpo.train.preference import train_preference

            return train_preference(cfg, folder, plan)
        return _run(cfg, folder, plan, dist)


def _run(cfg: Config, folder, plan: Plan, dist: dist_.DistRun | None) -> RunResult:
    run = open_run(cfg, folder, plan, dist)
    try:
        return run_steps(run)
    finally:  # on success, error and Ctrl-C alike: no engine process outlives the run
        try:
            close_generators(run.ctx)
        finally:
            close_log(run.log)


def run_steps(run: Run) -> RunResult:
    """The training steps of an opened run: collect -> prepare -> update -> observe -> evaluate -> checkpoint."""
    eval_after = drive(run, lambda step: train_step(run, step),  # collect -> prepare -> update -> observe
                       evaluates=bool(run.eval_rows), show=run.dist is None or run.dist.main,
                       before=lambda: run.rollouts.start(run.model, run.start),  # train.async: sampling ahead
                       after_step=lambda step: run.rollouts.publish(run.model, step),  # weights: version `step`
                       close=run.rollouts.close)
    return finish(run, eval_after)


class Driven(Protocol):
    """What :func:`drive` needs of a run (the RL run, the preference run, the scorer stage's run)."""

    cfg: Config
    start: int  # the last step done (0: a new run)
    eval_before: dict[str, float]
    log: Any  # MetricsLog-like: write(step, metrics) -> row
    dir: Path

    def evaluate(self) -> dict[str, float]: ...

    def checkpoint(self, step: int) -> None: ...


def drive(run: Driven, step_fn: Callable[[int], dict[str, Any]], *, evaluates: bool = True, show: bool = True,
          stats: dict[str, Any] | None = None, stats_alone: bool = False,
          before: Callable[[], None] | None = None, after_step: Callable[[int], None] | None = None,
          close: Callable[[], None] | None = None) -> dict[str, float]:
    """The outer step loop every training stage shares; returns the last held-out metrics.

    evaluate at start (a new run; row 0 = ``stats`` and the metrics, or ``stats`` alone with ``stats_alone``) ->
    for each step: ``step_fn(step)`` -> evaluate every ``eval.every`` -> metrics row -> checkpoint every
    ``output.checkpoint_every`` -> progress bar (``show``) -> ``after_step(step)``. ``evaluates``: whether the run
    has anything to evaluate on; ``before``/``close``: around the steps (``close`` always). A
    :class:`TrainingDiverged` comes back naming the last completed step and the last good checkpoint."""
    cfg, steps = run.cfg, run.cfg.train.steps
    if run.start == 0:
        if cfg.eval.at_start and evaluates:
            run.eval_before = run.evaluate()
            run.log.write(0, {**(stats or {}), **run.eval_before})
        elif stats_alone:
            run.log.write(0, dict(stats or {}))
    eval_after, last_good = dict(run.eval_before), run.start
    with progress_bar(cfg, run.start, show=show) as progress:
        try:
            if before is not None:
                before()
            for step in range(run.start + 1, steps + 1):
                metrics = step_fn(step)
                if due(cfg.eval.every, step, steps) and evaluates:
                    eval_after = run.evaluate()
                    metrics.update(eval_after)
                row = run.log.write(step, metrics)
                last_good = step
                if due(cfg.output.checkpoint_every, step, steps):
                    run.checkpoint(step)
                progress(row)
                if after_step is not None:
                    after_step(step)
        except TrainingDiverged as exc:
            saved = latest_checkpoint(run.dir)
            where = f"the last good checkpoint is {str(saved)!r}" if saved else "no checkpoint had been written yet"
            raise TrainingDiverged(f"{exc} (Last completed step: {last_good}; {where}.)") from None
        finally:
            if close is not None:
                close()
    return eval_after


@contextlib.contextmanager
def progress_bar(cfg: Config, start: int, show: bool = True):
    """A callable that advances a progress bar by one step (showing a few of the row's metrics), or does nothing."""
    if not cfg.output.progress or not show:
        yield lambda row: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.steps, initial=start, desc=run_name(cfg), dynamic_ncols=True)

    def advance(row: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in
                         ("reward/mean", "loss/kl", "loss/entropy", "perf/tokens_per_s") if k in row})

    try:
        yield advance
    finally:
        bar.close()


def finish(run: Run, eval_after: dict[str, float]) -> RunResult:
    """Curves and summary.json of a finished run."""
    cfg = run.cfg
    if run.dist is not None and not run.dist.main:  # rank 0 writes them
        return RunResult(run.dir, cfg.train.steps, run.eval_before, eval_after, [])
    history = read_metrics(run.dir / "metrics.jsonl")
    if cfg.output.plot and history:
        plot_run(history, run.dir / "curves.png", run_name(cfg))
    run.folder.write_summary(  # atomically; "steps" is the latest checkpoint's step
        {"eval_before": run.eval_before, "eval_after": eval_after, "steps": cfg.train.steps,
         "peak_rss_gb": peak_rss_gb(),
         # the device the run used (device: auto resolved, lmpo.engine.device) and, on CUDA, its peak memory
         "device": cfg.device, "peak_gpu_gb": peak_gpu_gb(),
         # what model.autocast resolved to on this machine ("auto" measures at start), null = float32
         "autocast": cfg.model.autocast,
         # the intra-op thread count, how it was chosen (config, or train.threads: auto's probe with its timings),
         # the steps run at each count, and OpenMP's spin-wait setting (lmpo.engine.threads)
         "threads": run.threads.summary() if run.threads is not None else None})
    return RunResult(run.dir, cfg.train.steps, run.eval_before, eval_after, history)
