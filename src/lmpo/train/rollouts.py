"""Rollout collection: prompts -> generation -> rewards -> shapers -> selectors (with refill rounds).

Components can shape collection through optional hooks (capabilities, never names; at most one component may
provide each hook). They are looked up on ``RolloutContext.planners`` (every configured component):

- ``prompt_weights(keys) -> weights``: prioritised prompt sampling; one non-negative weight per prompt key of the
  training set (see :func:`lmpo.train.data.prompt_key`).
- ``allocate(keys, n) -> counts``: a per-prompt number of generations (``n`` is ``rollout.num_generations``), so
  groups in one batch can have different sizes; group ops in :mod:`lmpo.ops` work on ``group_ids`` of any size.
- ``plan_group(n) -> [plan, ...]``: one dict per sample of a group of ``n``: ``max_new_tokens`` (its own length
  limit, capped at the rollout's), ``prompt_suffix`` (text appended to the formatted prompt) and ``tags`` (name ->
  number, gathered into ``batch.extras[name]``).
- ``prefix_budgets() -> [b_1, ..., b_S]``: also score every reply truncated to its first ``b_s`` tokens;
  ``batch.extras["prefix_rewards"]`` is then (B, S) (a reply shorter than ``b_s`` is scored whole).
Per-prompt identity rides in ``meta[i]["prompt_key"]``.

One hook may be provided by any number of components (each is called): ``after_collect(ctx, batch)`` runs once per
scoring round of a step, after collection ends, with the round's raw batch (before shapers and selectors) and a
context whose ``generator`` is the plain sampler, so a component can query the policy itself (e.g. CLPO rewrites
prompts and queues the results through ``inject_prompts``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError, DataError
from lmpo.models.load import format_prompt
from lmpo.rollout.base import Generator, SamplingParams
from lmpo.rollout.modes import bind_rows
from lmpo.tasks.base import columns_of
from lmpo.train.data import prompt_key

ROLLOUT_HOOKS = ("prompt_weights", "allocate", "plan_group", "prefix_budgets")
_PLAN_KEYS = {"max_new_tokens", "prompt_suffix", "tags"}


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
    planners: list = field(default_factory=list)  # components that may provide ROLLOUT_HOOKS
    train_generator: Generator | None = None  # rollout.mode's generator for training rollouts (lmpo.rollout.modes)


def rollout_hook(components: list, name: str) -> Callable | None:
    """The one component method called ``name`` among ``components`` (None if none has it)."""
    found = [c for c in components if callable(getattr(c, name, None))]
    if len(found) > 1:
        raise ConfigError(f"Two components provide the rollout hook {name!r} ({', '.join(type(c).__name__ for c in found)}); "
                          "only one may decide it.")
    return getattr(found[0], name) if found else None


def _expand_plans(counts: list[int], plan_group: Callable | None) -> list[dict[str, Any]]:
    plans: list[dict[str, Any]] = []
    for n in counts:
        group = list(plan_group(n)) if plan_group is not None else [{} for _ in range(n)]
        if len(group) != n or any(not isinstance(p, dict) or set(p) - _PLAN_KEYS for p in group):
            raise DataError(f"plan_group({n}) must return {n} dicts with keys among {sorted(_PLAN_KEYS)}, got {group!r}.")
        plans.extend(group)
    return plans


def _prefix_rewards(ctx: RolloutContext, out, prompts: list[str], columns: dict, budgets: Sequence[int]) -> torch.Tensor:
    ids, attn = out.response_ids.cpu(), out.response_attn.cpu()
    cols = []
    for b in budgets:
        texts = [ctx.tokenizer.decode(row[:b][keep[:b]].tolist(), skip_special_tokens=True) for row, keep in zip(ids, attn)]
        cols.append(ctx.reward_set(prompts, texts, columns)[0].float())
    return torch.stack(cols, 1)


def score(ctx: RolloutContext, rows: list[dict[str, Any]], repeats: int | Sequence[int], params: SamplingParams,
          group_offset: int = 0, plan_group: Callable | None = None, prefix_budgets: Sequence[int] | None = None,
          ) -> RolloutBatch:
    """Generate ``repeats`` completions per row (an int, or one count per row), score them, return an unshaped batch.

    ``plan_group`` and ``prefix_budgets`` are the hooks of the same name (module docstring).
    """
    counts = [int(repeats)] * len(rows) if isinstance(repeats, int) else [int(n) for n in repeats]
    if len(counts) != len(rows) or (counts and min(counts) < 1):
        raise DataError(f"score: need one generation count >= 1 per prompt ({len(rows)} prompts), got {counts}.")
    # a row's ``response_prefix`` (a partial solution, e.g. ReST-RL's prefix prompts) is continued by the policy
    texts = [format_prompt(ctx.tokenizer, r["prompt"], ctx.system_prompt) + (r.get("response_prefix") or "") for r in rows]
    src = [i for i, n in enumerate(counts) for _ in range(n)]
    plans = _expand_plans(counts, plan_group)
    expanded = [texts[i] + p.get("prompt_suffix", "") for i, p in zip(src, plans)]
    if getattr(ctx.generator, "wants_rows", False):  # rollout modes that read the task rows (reference answers)
        ctx = dataclasses.replace(ctx, generator=bind_rows(ctx.generator, [rows[i] for i in src]))
    limits = [min(int(p.get("max_new_tokens") or params.max_new_tokens), params.max_new_tokens) for p in plans]
    if all(n == params.max_new_tokens for n in limits):
        out = ctx.generator.generate(expanded, params)
    else:  # per-row length limits (budget sub-groups)
        out = ctx.generator.generate(expanded, params, max_new_tokens=limits)
    row_columns = columns_of(rows)
    columns = {k: [vals[i] for i in src] for k, vals in row_columns.items()}
    prefixes = columns.get("response_prefix")  # rewards score prefix + continuation (the whole solution)
    scored = [(p or "") + c for p, c in zip(prefixes, out.completions)] if prefixes else out.completions
    rewards, components = ctx.reward_set(expanded, scored, columns)
    group_ids = torch.arange(group_offset, group_offset + len(rows)).repeat_interleave(torch.tensor(counts, dtype=torch.long))
    keys = [prompt_key(r) for r in rows]
    meta = [{"prompt": p, "completion": c, "prompt_key": keys[i]} for p, c, i in zip(expanded, out.completions, src)]
    tag_names = {k for p in plans for k in p.get("tags", {})}
    if any(set(p.get("tags", {})) != tag_names for p in plans):
        raise DataError(f"plan_group: every sample must carry the same tags, got {[sorted(p.get('tags', {})) for p in plans]}.")
    extras = {k: torch.tensor([float(p["tags"][k]) for p in plans]) for k in sorted(tag_names)}
    if prefix_budgets:
        extras["prefix_rewards"] = _prefix_rewards(ctx, out, expanded, columns, prefix_budgets)
    extras.update(getattr(out, "extras", None) or {})  # per-row tensors recorded by the rollout mode
    for m, g in zip(meta, group_ids.tolist()):  # the source row (components that assemble new prompts read it)
        m["row"] = rows[g - group_offset]
    return RolloutBatch(
        prompt_ids=out.prompt_ids, prompt_mask=out.prompt_mask, response_ids=out.response_ids,
        response_attn=out.response_attn, response_mask=out.response_attn.clone(), group_ids=group_ids,
        rewards=rewards, reward_components=components, sampler_logprobs=out.sampler_logprobs,
        truncated=out.truncated, extras=extras, meta=meta,
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
    plain_ctx = ctx  # the ``after_collect`` hooks query the policy through the plain sampler
    if ctx.train_generator is not None:  # rollout.mode other than "sample" (evaluation keeps the plain sampler)
        ctx = dataclasses.replace(ctx, generator=ctx.train_generator, train_generator=None)
    stream = InjectingStream.wrap(stream, getattr(ctx, "planners", None) or [*ctx.shapers, *ctx.selectors])
    weights = rollout_hook(ctx.planners, "prompt_weights")
    allocate = rollout_hook(ctx.planners, "allocate")
    plan_group = rollout_hook(ctx.planners, "plan_group")
    prefix = rollout_hook(ctx.planners, "prefix_budgets")
    budgets = list(prefix()) if prefix is not None else None
    kept: list[RolloutBatch] = []
    raws: list[RolloutBatch] = []
    n_groups = 0
    first: RolloutBatch | None = None
    generated = rounds = 0
    offset = step * 1_000_000  # group ids unique within a step across refill rounds
    while True:
        need = prompts_per_step - n_groups
        rows = stream.take(need, weights=weights) if weights is not None else stream.take(need)
        counts = list(allocate([prompt_key(r) for r in rows], ctx.num_generations)) if allocate else ctx.num_generations
        raw = score(ctx, rows, counts, ctx.params, offset, plan_group, budgets)
        offset += need
        first = first or raw
        raws.append(raw)
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
    after = {id(c): c.after_collect for c in getattr(ctx, "planners", None) or [*ctx.shapers, *ctx.selectors]
             if callable(getattr(c, "after_collect", None))}
    for hook in after.values():
        for raw in raws:
            hook(plain_ctx, raw)
    stats = {"rollout/refill_rounds": float(rounds), "rollout/generated": float(generated),
             "rollout/kept_frac": float(sum(b.batch_size for b in kept)) / max(1, generated)}
    if allocate is not None:
        sizes = torch.unique(first.group_ids, return_counts=True)[1].float()
        stats.update({"rollout/group_size_min": float(sizes.min()), "rollout/group_size_max": float(sizes.max())})
    if not kept:
        return None, first, stats
    batch = RolloutBatch.concat(kept)
    if n_groups > prompts_per_step:  # a refill round can overshoot: keep the first groups
        uniq = torch.unique_consecutive(batch.group_ids)[:prompts_per_step]
        batch = batch.select(torch.isin(batch.group_ids, uniq))
    return batch, first, stats
