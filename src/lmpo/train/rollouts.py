"""Rollout collection: prompts -> generation -> rewards -> shapers -> selectors (with refill rounds)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lmpo.batch import RolloutBatch
from lmpo.models.load import format_prompt
from lmpo.rollout.base import Generator, SamplingParams
from lmpo.rollout.modes import bind_rows
from lmpo.tasks.base import columns_of


@dataclass
class RolloutContext:
    """Everything collection needs besides the prompt stream (built once by the loop)."""

    generator: Generator
    tokenizer: Any
    reward_set: Any
    shapers: list
    selectors: list
    params: SamplingParams
    num_generations: int
    system_prompt: str | None = None
    train_generator: Generator | None = None  # rollout.mode's generator for training rollouts (lmpo.rollout.modes)


def score(ctx: RolloutContext, rows: list[dict[str, Any]], repeats: int, params: SamplingParams,
          group_offset: int = 0) -> RolloutBatch:
    """Generate ``repeats`` completions per row, score them, and return an (unshaped) batch."""
    # a row's ``response_prefix`` (a partial solution, e.g. ReST-RL's prefix prompts) is continued by the policy
    texts = [format_prompt(ctx.tokenizer, r["prompt"], ctx.system_prompt) + (r.get("response_prefix") or "") for r in rows]
    expanded = [t for t in texts for _ in range(repeats)]
    if getattr(ctx.generator, "wants_rows", False):  # rollout modes that read the task rows (reference answers)
        ctx = dataclasses.replace(ctx, generator=bind_rows(ctx.generator, [r for r in rows for _ in range(repeats)]))
    out = ctx.generator.generate(expanded, params)
    columns = {k: [v for v in vals for _ in range(repeats)] for k, vals in columns_of(rows).items()}
    prefixes = columns.get("response_prefix")  # rewards score prefix + continuation (the whole solution)
    scored = [(p or "") + c for p, c in zip(prefixes, out.completions)] if prefixes else out.completions
    rewards, components = ctx.reward_set(expanded, scored, columns)
    group_ids = torch.arange(group_offset, group_offset + len(rows)).repeat_interleave(repeats)
    meta = [{"prompt": p, "completion": c} for p, c in zip(expanded, out.completions)]
    for m, g in zip(meta, group_ids.tolist()):  # the source row (components that assemble new prompts read it)
        m["row"] = rows[g - group_offset]
    return RolloutBatch(
        prompt_ids=out.prompt_ids, prompt_mask=out.prompt_mask, response_ids=out.response_ids,
        response_attn=out.response_attn, response_mask=out.response_attn.clone(), group_ids=group_ids,
        rewards=rewards, reward_components=components, sampler_logprobs=out.sampler_logprobs,
        truncated=out.truncated, extras=dict(getattr(out, "extras", None) or {}), meta=meta,
    )


class InjectingStream:
    """Serves prompts made by components (their ``inject_prompts(n) -> rows`` hook: curricula, rewrites, prefix
    prompts) before the data set's; the components keep their queues in their own ``state_dict``."""

    def __init__(self, stream, hooks: list):
        self.stream, self.hooks = stream, hooks

    @classmethod
    def wrap(cls, stream, components: list):
        unique = list({id(c): c for c in components}.values())
        hooks = [c.inject_prompts for c in unique if callable(getattr(c, "inject_prompts", None))]
        return cls(stream, hooks) if hooks else stream

    def take(self, n: int, **kw: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for hook in self.hooks:
            if len(rows) < n:
                rows += list(hook(n - len(rows)))[: n - len(rows)]
        return rows + (self.stream.take(n - len(rows), **kw) if n > len(rows) else [])


def collect(ctx: RolloutContext, stream, prompts_per_step: int, refill_rounds: int, step: int,
            ) -> tuple[RolloutBatch | None, RolloutBatch, dict[str, float]]:
    """Returns (training batch or None if every group was filtered, the first round's raw batch, stats)."""
    if ctx.train_generator is not None:  # rollout.mode other than "sample" (evaluation keeps the plain sampler)
        ctx = dataclasses.replace(ctx, generator=ctx.train_generator, train_generator=None)
    stream = InjectingStream.wrap(stream, getattr(ctx, "planners", None) or [*ctx.shapers, *ctx.selectors])
    kept: list[RolloutBatch] = []
    n_groups = 0
    first: RolloutBatch | None = None
    generated = rounds = 0
    offset = step * 1_000_000  # group ids unique within a step across refill rounds
    while True:
        need = prompts_per_step - n_groups
        raw = score(ctx, stream.take(need), ctx.num_generations, ctx.params, offset)
        offset += need
        first = first or raw
        generated += raw.batch_size
        batch = raw
        for shaper in ctx.shapers:
            batch = shaper(batch)
        keep = torch.ones(batch.batch_size, dtype=torch.bool)
        for sel in ctx.selectors:
            keep &= sel(batch)
        if keep.any():
            part = batch.select(keep)
            kept.append(part)
            n_groups += int(torch.unique(part.group_ids).numel())
        if n_groups >= prompts_per_step or rounds >= refill_rounds:
            break
        rounds += 1
    stats = {"rollout/refill_rounds": float(rounds), "rollout/generated": float(generated),
             "rollout/kept_frac": float(sum(b.batch_size for b in kept)) / max(1, generated)}
    if not kept:
        return None, first, stats
    batch = RolloutBatch.concat(kept)
    if n_groups > prompts_per_step:  # a refill round can overshoot: keep the first groups
        uniq = torch.unique_consecutive(batch.group_ids)[:prompts_per_step]
        batch = batch.select(torch.isin(batch.group_ids, uniq))
    return batch, first, stats
