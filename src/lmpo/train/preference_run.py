"""A preference run (:mod:`lmpo.train.preference`): open it, run its steps, checkpoint and resume it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmpo.config import Config
from lmpo.engine import setup_process
from lmpo.engine.optim import TrainOptimizer, build_optimizer
from lmpo.errors import DataError
from lmpo.registry import PREFERENCE_LOSSES
from lmpo.tasks import build_task
from lmpo.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from lmpo.train.data import PromptStream
from lmpo.train.metrics import MetricsLog, peak_rss_gb
from lmpo.train.preference import PairStep, attach_mismatched, cache_logps, check_preference, require_data
from lmpo.train.rollouts import RolloutContext
from lmpo.train.rundir import Plan, RunFolder
from lmpo.train.step import PolicyRunner
from lmpo.train.trackers import check_available, tracked_log

log = logging.getLogger(__name__)


@dataclass
class PreferenceRun:
    """One preference run, everything built and validated before its folder is written."""

    cfg: Config
    folder: RunFolder
    model: torch.nn.Module
    step_fn: PairStep
    opt: TrainOptimizer
    stream: PromptStream
    eval_pairs: list[dict]
    ctx: RolloutContext | None
    eval_rows: list[dict]
    data_stats: dict[str, int]
    start: int = 0
    eval_before: dict[str, float] = field(default_factory=dict)
    log: MetricsLog | None = None
    threads: Any = None
    dist: Any = None  # the RL loop's ``finish`` reads it; a preference run is single-process

    @property
    def dir(self) -> Path:
        return self.folder.path

    def evaluate(self) -> dict[str, float]:
        """The held-out pairs' metrics, and the task's own evaluation when it has eval prompts."""
        from lmpo.train.evaluate import evaluate

        out = self.step_fn.evaluate(self.eval_pairs)
        if self.eval_rows and self.ctx is not None:
            e = self.cfg.eval
            out.update(evaluate(self.ctx, self.eval_rows, e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                                e.correct_threshold, e.pass_k))
        return out

    def restore(self, ckpt: Path) -> None:
        state = load_checkpoint(ckpt, self.model, self.opt.optimizer, self.opt.scheduler)
        self.start, self.eval_before = state["step"], state.get("eval_before", {})
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])

    def checkpoint(self, step: int) -> None:
        save_checkpoint(self.dir, step, self.model, self.opt.optimizer, self.opt.scheduler,
                        keep=self.cfg.output.keep_checkpoints,
                        extra={"data": self.stream.state_dict(), "eval_before": self.eval_before, "components": {}})


def open_preference_run(cfg: Config, folder: RunFolder, plan: Plan) -> PreferenceRun:
    """Check the config, read and tokenize the pairs, compute the reference log-probs once, build the optimizer,
    restore a checkpoint; only then write the run folder (a run that cannot start leaves nothing behind)."""
    from lmpo.train.loop import build_rewards, rollout_context, run_name, seed_everything, setup_model
    from lmpo.pipeline import build_pipeline

    check_available(cfg.output.report_to)
    seed_everything(cfg.train.seed)
    threads = setup_process(cfg)
    loss, data = check_preference(cfg)
    data = require_data(data)
    task = build_task(cfg.task.name, **cfg.task.params)
    model, tokenizer, _ = setup_model(cfg, need_ref=False)  # the reference is cached below, before any update
    train_pairs, eval_pairs, skipped = data.build(tokenizer, task.system_prompt)
    unpaired = sum(p["unpaired"] for p in train_pairs + eval_pairs)
    if unpaired and not getattr(loss, "unpaired", False):
        ok = [e.name for e in PREFERENCE_LOSSES.entries() if getattr(e.obj, "unpaired", False)]
        raise DataError(f'{unpaired} examples of {data.path!r} are unpaired (a completion and a label), but '
                        f'preference.loss "{cfg.preference.loss["name"]}" needs a chosen and a rejected response per '
                        f"prompt; use a loss for unpaired feedback ({', '.join(ok)}) or a paired file.")
    eval_pairs = eval_pairs[: cfg.preference.eval_pairs]
    if "mismatched_logprobs" in loss.needs:  # KTO's KL estimate: each prompt with a neighbour's response
        attach_mismatched(train_pairs + eval_pairs)
    m, t = cfg.model, cfg.train
    runner = PolicyRunner(model, 1.0, m.chunk_size, m.autocast, packed=m.packed_forward,
                          recompute="attention" if m.gradient_checkpointing == "attention" else None)
    pad = tokenizer.pad_token_id
    size = t.micro_batch_size or cfg.preference.pairs_per_step
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    cache_logps(runner, eval_pairs + (train_pairs if "ref_logprobs" in loss.needs else []), pad, size)
    model.train(was_training)
    ref_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, t, t.steps, single_use=False)
    ctx = None
    eval_rows = task.eval[: cfg.eval.num_prompts]
    if eval_rows:
        ctx = rollout_context(cfg, model, tokenizer, task, build_rewards(cfg, task), build_pipeline(cfg))
    stats = {"data/train_pairs": len(train_pairs), "data/eval_pairs": len(eval_pairs), "perf/reference_s": ref_s,
             **{f"data/skipped/{k}": v for k, v in skipped.items()},
             "data/truncated": sum(p["chosen_truncated"] or p["rejected_truncated"] for p in train_pairs)}
    if skipped:
        log.warning("preference data: %s", ", ".join(f"{v} pairs skipped ({k})" for k, v in skipped.items()))
    run = PreferenceRun(cfg, folder, model, PairStep(loss, runner, opt, pad, t.micro_batch_size, size), opt,
                        PromptStream(train_pairs, t.seed), eval_pairs, ctx, eval_rows, stats, threads=threads)
    if plan.checkpoint is not None:
        run.restore(plan.checkpoint)
    folder.begin(plan)
    resume_step = run.start if plan.checkpoint is not None else None
    run.log = tracked_log(MetricsLog(folder.path / "metrics.jsonl", resume_step=resume_step), cfg, folder.path,
                          run_name(cfg), resume_step=resume_step)
    return run


def run_preference_steps(run: PreferenceRun):
    """take pairs -> loss -> optimizer step -> evaluate -> checkpoint (the RL loop's ``drive``), then its ``finish``."""
    from lmpo.train.loop import drive, finish

    def step(step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics = run.step_fn(run.stream.take(run.cfg.preference.pairs_per_step), step)
        metrics.update({"perf/step_s": time.perf_counter() - t0, "perf/peak_rss_gb": peak_rss_gb()})
        return metrics

    # row 0 holds the data's counts even without an evaluation at start
    return finish(run, drive(run, step, stats=run.data_stats, stats_alone=True))
