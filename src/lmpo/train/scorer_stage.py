"""The scorer stages of ``lmpo train``: a Bradley-Terry reward model on pairs (``stage: reward_model``) and a
process reward model on step labels (``stage: prm``), with the RL runs' folder, checkpoints, exact resume and
metrics.

    lmpo train configs/tiny-rm.yaml                # stage: reward_model, scorer.data: {builtin: copy_pairs}
    lmpo train configs/tiny-rm.yaml --resume       # continues bit for bit (batches are a function of seed, step)
    rewards: [{name: reward_model, path: runs/tiny-rm}]   # then, in an RL config

Reward model (Ouyang et al. 2022, arXiv:2203.02155, eq. 1; TRL's RewardTrainer): the scalar r(x, y) at the reply's
last token, loss ``-log sigmoid(r(x, y_c) - r(x, y_r) - margin)`` averaged over pairs, plus TRL's optional
``center_rewards_coefficient * mean((r_c + r_r)^2)``. PRM (Lightman et al. 2023, arXiv:2305.20050; TRL's
PRMTrainer): prompt, then each step followed by ``separator``; the head's logit at each step's last token is trained
with binary cross-entropy on the step's label (TRL trains a two-class token classifier at the same positions; one
logit is the same model with the class difference as the logit).

``scorer.objective: pointwise`` (Cappy's pre-training, arXiv:2311.06720): rows ``{prompt, completion, label}`` with a
label in [0, 1] (TRL's unpaired format, booleans as 0/1), binary cross-entropy with the soft label on the scalar at
the reply's last token. ``scorer.objective: crm`` trains two RMs that pick each other's pairs (CRM,
arXiv:2505.10597; :mod:`lmpo.train.crm`).

Metrics: ``loss``, ``scorer/accuracy`` per step; at ``eval.every`` on held-out rows (``scorer.eval_data``, else the
last ``scorer.eval_fraction`` of the data): ``eval/accuracy`` (pairs ranked right / steps classified right),
``eval/loss``, ``eval/ece`` (10-bin expected calibration error) and ``eval/calibration_mae`` (mean |p - label|); for
pairs p = sigmoid(r_c - r_r) in both orders (labels 1 and 0), for steps p = sigmoid(logit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmpo.errors import ConfigError, check_known_keys
from lmpo.rewards.prm import step_logits
from lmpo.rewards.reward_model import last_token_scores
from lmpo.rewards.scorer_base import build_scorer
from lmpo.train.crm import PeerPair, crm_step
from lmpo.tasks.scorer_data import load_pairs, load_pointwise, load_steps


@dataclass
class ScorerStageConfig:
    """The ``scorer:`` section of a scorer stage."""

    data: Any = None  # a .jsonl/.json/.parquet path or {builtin: copy_pairs | arithmetic_pairs | copy_steps, ...}
    eval_data: Any = None  # held-out rows; None: the last eval_fraction of data
    eval_fraction: float = 0.1
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 512
    center_rewards_coefficient: float | None = None  # TRL's RM option
    objective: str = "bradley_terry"  # reward_model: bradley_terry (pairs) | pointwise (soft labels, Cappy) | crm
    crm_drop_rate: float = 0.2  # crm: the fraction of each batch a peer drops (after the ramp)
    crm_ramp_steps: int = 10  # crm: steps over which the drop rate grows from 0
    separator: str = "\n"  # prm: appended to each step

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ScorerStageConfig:
        names = [f.name for f in fields(cls)]
        check_known_keys(d, names, "scorer")
        out = cls(**d)
        if out.data is None:
            raise ConfigError("stage needs scorer.data: a .jsonl/.json/.parquet file in TRL's format, or a built-in "
                              "set such as {builtin: copy_pairs} (reward_model) or {builtin: copy_steps} (prm).")
        if out.objective not in ("bradley_terry", "pointwise", "crm"):
            raise ConfigError(f'scorer.objective must be "bradley_terry" (pairs), "pointwise" (rows with a label in '
                              f'[0, 1]) or "crm" (two peer-reviewing RMs on pairs), got {out.objective!r}.')
        if not 0 <= out.crm_drop_rate < 1 or out.crm_ramp_steps < 0:
            raise ConfigError(f"scorer: need 0 <= crm_drop_rate < 1 and crm_ramp_steps >= 0; got {d}.")
        if not 0 <= out.eval_fraction < 1 or out.batch_size < 1 or out.max_length < 1:
            raise ConfigError(f"scorer: need 0 <= eval_fraction < 1, batch_size >= 1, max_length >= 1; got {d}.")
        return out


def batch_indices(n: int, bs: int, seed: int, step: int) -> list[int]:
    """Rows of training step ``step`` (1-based): consecutive slices of per-epoch permutations, a pure function of
    (n, bs, seed, step), so a resumed run sees exactly the batches an uninterrupted one would."""
    start = (step - 1) * bs
    out = []
    while len(out) < bs:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.extend(perm[pos: pos + bs - len(out)])
    return out


def calibration(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> tuple[float, float]:
    """(ECE with ``bins`` equal-width bins, mean |p - y|) of probabilities ``p`` for binary labels ``y``."""
    p, y = p.double().flatten(), y.double().flatten()
    idx = torch.clamp((p * bins).long(), max=bins - 1)
    ece = sum(float((idx == b).sum()) / len(p) * abs(float(p[idx == b].mean() - y[idx == b].mean()))
              for b in range(bins) if (idx == b).any())
    return ece, float((p - y).abs().mean())


def pair_rewards(model, tok, rows: list[dict], max_length: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of ``rows``, one forward pass over both sides."""
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    s = last_token_scores(model, tok, [r["prompt"] for r in rows] * 2, texts, max_length=max_length, grad=grad)
    return s[: len(rows)], s[len(rows):]


def point_logits(model, tok, rows: list[dict], max_length: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of pointwise rows ``{prompt, completion, label}``: the scalar at the reply's last token."""
    lg = last_token_scores(model, tok, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                           max_length=max_length, grad=grad)
    return lg, torch.tensor([r["label"] for r in rows])


def rm_loss(rc, rr, margin, center: float | None) -> torch.Tensor:
    loss = -F.logsigmoid(rc - rr - margin).mean()
    if center:
        loss = loss + center * ((rc + rr) ** 2).mean()
    return loss


def prm_logits(model, tok, rows, cfg: ScorerStageConfig, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (N_steps,) logits and labels of ``rows`` (steps cut by max_length are left out)."""
    steps = [[s + cfg.separator for s in r["completions"]] for r in rows]
    logits = step_logits(model, tok, [r["prompt"] for r in rows], steps, batch_size=len(rows),
                         max_length=cfg.max_length, grad=grad)
    labels = [torch.tensor(r["labels"][: len(lg)], dtype=torch.float32) for r, lg in zip(rows, logits)]
    return torch.cat(logits), torch.cat(labels)


def evaluate_scorer(stage: str, model, tok, rows: list[dict], cfg: ScorerStageConfig) -> dict[str, float]:
    model.eval()
    bs = cfg.eval_batch_size
    if stage == "reward_model" and cfg.objective == "pointwise":
        parts = [point_logits(model, tok, rows[s: s + bs], cfg.max_length, grad=False) for s in range(0, len(rows), bs)]
        lg, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ece, mae = calibration(torch.sigmoid(lg), y)
        out = {"eval/accuracy": float(((lg > 0) == (y > 0.5)).float().mean()),
               "eval/loss": float(F.binary_cross_entropy_with_logits(lg, y))}
    elif stage == "reward_model":
        parts = [pair_rewards(model, tok, rows[s: s + bs], cfg.max_length, grad=False) for s in range(0, len(rows), bs)]
        rc, rr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        margin = torch.tensor([r["margin"] for r in rows])
        p = torch.sigmoid(rc - rr)
        ece, mae = calibration(torch.cat([p, 1 - p]), torch.cat([torch.ones_like(p), torch.zeros_like(p)]))
        out = {"eval/accuracy": float((rc > rr).float().mean()), "eval/loss": float(rm_loss(rc, rr, margin, None)),
               "eval/margin": float((rc - rr).mean())}
    else:
        with torch.no_grad():
            parts = [prm_logits(model, tok, rows[s: s + bs], cfg, grad=False) for s in range(0, len(rows), bs)]
        lg, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ece, mae = calibration(torch.sigmoid(lg), y)
        out = {"eval/accuracy": float(((lg > 0).float() == y).float().mean()),
               "eval/loss": float(F.binary_cross_entropy_with_logits(lg, y))}
    model.train()
    return {**out, "eval/ece": ece, "eval/calibration_mae": mae}


def scorer_data(cfg, sc: ScorerStageConfig, tok) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(train rows, held-out rows, skipped counts) of a scorer stage."""
    load = load_steps if cfg.stage == "prm" else load_pointwise if sc.objective == "pointwise" else load_pairs
    rows, skipped = load(sc.data, tok, "scorer.data")
    if sc.eval_data is not None:
        return rows, load(sc.eval_data, tok, "scorer.eval_data")[0], skipped
    k = int(round(len(rows) * sc.eval_fraction))
    return rows[: len(rows) - k], rows[len(rows) - k:], skipped


def evaluate_scorer_run(cfg, run_dir: Path | None = None, checkpoint: str | None = None) -> dict[str, float]:
    """``lmpo eval`` of a scorer stage: the held-out metrics of its latest (or given) checkpoint, or of the
    untrained backbone + head when there is no run folder."""
    from lmpo.errors import LmpoError
    from lmpo.train.checkpoint import latest_checkpoint, load_checkpoint

    sc = ScorerStageConfig.parse(dict(cfg.scorer))
    model, tok = build_scorer(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.train.seed, gguf_file=cfg.model.gguf_file)
    if sc.objective == "crm":
        model = PeerPair(model, build_scorer(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.train.seed + 1,
                                             gguf_file=cfg.model.gguf_file)[0])
    ckpt = Path(checkpoint) if checkpoint else (latest_checkpoint(run_dir) if run_dir is not None else None)
    if run_dir is not None and ckpt is None:
        raise LmpoError(f"lmpo eval: {str(run_dir)!r} has no checkpoint yet.")
    if ckpt is not None:
        load_checkpoint(ckpt, model)
    _, eval_rows, _ = scorer_data(cfg, sc, tok)
    if not eval_rows:
        raise LmpoError("lmpo eval: the scorer stage has no held-out rows (set scorer.eval_data or eval_fraction).")
    return evaluate_scorer(cfg.stage, model, tok, eval_rows, sc)


def objective_step(stage: str, sc: ScorerStageConfig, tok):
    """The training loss of the stage's objective: ``fn(model, batch, step) -> (loss, accuracy, extra metrics)``,
    chosen once before the steps."""

    def pointwise(model, batch, step):
        lg, y = point_logits(model, tok, batch, sc.max_length, grad=True)
        return F.binary_cross_entropy_with_logits(lg, y), ((lg > 0) == (y > 0.5)).float().mean(), {}

    def crm(model, batch, step):
        loss, extra = crm_step(model, lambda m, rows: pair_rewards(m, tok, rows, sc.max_length, True),
                               batch, step, sc.crm_drop_rate, sc.crm_ramp_steps)
        return loss, torch.tensor(extra.pop("acc")), extra

    def bradley_terry(model, batch, step):
        rc, rr = pair_rewards(model, tok, batch, sc.max_length, grad=True)
        loss = rm_loss(rc, rr, torch.tensor([r["margin"] for r in batch]), sc.center_rewards_coefficient)
        return loss, (rc > rr).float().mean(), {}

    def prm(model, batch, step):
        lg, y = prm_logits(model, tok, batch, sc, grad=True)
        return F.binary_cross_entropy_with_logits(lg, y), ((lg > 0).float() == y).float().mean(), {}

    if stage != "reward_model":
        return prm
    return {"pointwise": pointwise, "crm": crm, "bradley_terry": bradley_terry}[sc.objective]


@dataclass
class ScorerRun:
    """An opened scorer stage: what the RL loop's ``drive`` needs (start, evaluate, checkpoint, log)."""

    cfg: Any
    sc: ScorerStageConfig
    folder: Any  # RunFolder
    model: torch.nn.Module
    tok: Any
    opt: torch.optim.Optimizer
    sched: Any
    eval_rows: list[dict]
    start: int = 0
    eval_before: dict[str, float] = field(default_factory=dict)
    log: Any = None

    @property
    def dir(self) -> Path:
        return self.folder.path

    def evaluate(self) -> dict[str, float]:
        return evaluate_scorer(self.cfg.stage, self.model, self.tok, self.eval_rows, self.sc)

    def checkpoint(self, step: int) -> None:
        from lmpo.train.checkpoint import save_checkpoint

        save_checkpoint(self.dir, step, self.model, self.opt, self.sched, {"eval_before": self.eval_before},
                        keep=self.cfg.output.keep_checkpoints)


def train_scorer(cfg, resume: bool = False, overwrite: bool = False):
    """Train a reward model or PRM (module docstring); returns the RL trainer's ``RunResult``."""
    from lmpo.errors import TrainingDiverged
    from lmpo.train.checkpoint import latest_checkpoint, load_checkpoint, set_rng_state
    from lmpo.train.loop import RunResult, drive, run_name, seed_everything
    from lmpo.train.metrics import MetricsLog, plot_run, read_metrics
    from lmpo.train.rundir import METRICS, RunFolder

    sc = ScorerStageConfig.parse(dict(cfg.scorer))
    t = cfg.train
    with RunFolder(Path(cfg.output.dir) / run_name(cfg), cfg) as folder:
        plan = folder.plan(resume, overwrite, t.steps)
        if plan.finished:
            return RunResult(folder.path, plan.step, **folder.finished_run(plan))
        seed_everything(t.seed)
        model, tok = build_scorer(cfg.model.name, dtype=cfg.model.dtype, seed=t.seed, gguf_file=cfg.model.gguf_file)
        if sc.objective == "crm":  # a second RM (another seed) as the peer reviewer
            model = PeerPair(model, build_scorer(cfg.model.name, dtype=cfg.model.dtype, seed=t.seed + 1,
                                                 gguf_file=cfg.model.gguf_file)[0])
        train_rows, eval_rows, skipped = scorer_data(cfg, sc, tok)
        if not train_rows:
            raise ConfigError(f"scorer: no training rows left after holding out {len(eval_rows)} for evaluation.")
        model.requires_grad_(True).train()
        opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        warm = max(t.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        run = ScorerRun(cfg, sc, folder, model, tok, opt, sched, eval_rows)
        if plan.checkpoint is not None:
            state = load_checkpoint(plan.checkpoint, model, opt, sched)
            set_rng_state(state["rng"])
            run.start, run.eval_before = plan.step, state.get("eval_before", {})
        folder.begin(plan)
        run.log = MetricsLog(folder.path / METRICS, resume_step=plan.step if plan.checkpoint is not None else None)
        objective = objective_step(cfg.stage, sc, tok)  # the loss, chosen once

        def step(step: int) -> dict[str, Any]:
            batch = [train_rows[i] for i in batch_indices(len(train_rows), sc.batch_size, t.seed, step)]
            loss, acc, extra = objective(model, batch, step)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"stage {cfg.stage}: the loss is {float(loss)} at step {step}; lower "
                                       f"train.learning_rate (now {t.learning_rate}). Checkpoints so far are intact.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf)
            opt.step()
            sched.step()
            return {"loss": float(loss.detach()), "scorer/accuracy": float(acc), "scorer/grad_norm": float(gnorm),
                    "lr": sched.get_last_lr()[0], **extra}

        stats = {"data/train_rows": len(train_rows), "data/eval_rows": len(eval_rows),
                 **{f"data/skipped_{k}": v for k, v in skipped.items()}}  # row 0, with the evaluation at start
        last_eval = drive(run, step, evaluates=bool(eval_rows), show=False, stats=stats)
        history = read_metrics(folder.path / METRICS)
        if cfg.output.plot:
            plot_run(history, folder.path / "curves.png", run_name(cfg))
        ckpt = latest_checkpoint(folder.path)
        folder.write_summary({"eval_before": run.eval_before, "eval_after": last_eval, "stage": cfg.stage,
                              "steps": int(ckpt.name.split("_")[1]) if ckpt else 0})
        return RunResult(folder.path, t.steps, run.eval_before, last_eval, history)
