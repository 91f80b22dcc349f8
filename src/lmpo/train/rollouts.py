"""Rollout collection: prompts -> generation -> rewards -> shapers -> selectors (with refill rounds).

Collection-shaping methods plug in through the pipeline's extension points (:mod:`lmpo.methods.base`; resolved
once by :class:`lmpo.pipeline.Pipeline`): ``prompt_weights`` (prioritised sampling), ``allocate`` (rollouts per
prompt: groups of different sizes), ``plan_group`` (per-sample length limits, prompt suffixes, tags into
``batch.extras``), ``prefix_budgets`` (also score truncated replies: ``batch.extras["prefix_rewards"]`` (B, S)),
``inject_prompts`` (prompts made by components, served first), ``guide`` (guided rows mixed into each scoring round's
groups before shapers and selectors: :mod:`lmpo.train.guidance`), ``after_score`` (each round's batch just scored,
guided rows included, with the context: process credit, Monte-Carlo values) and ``after_collect`` (each scoring
round's raw batch, with a context whose generator is the plain sampler). Per-prompt identity rides in
``meta[i]["prompt_key"]``. The stats report every step's share of groups the policy failed entirely
(``rollout/all_fail_frac``) and of groups with equal rewards (``rollout/flat_frac``, GRPO's zero-advantage groups),
both before guidance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lmpo.batch import RolloutBatch
from lmpo.engine.device import HOST, batch_to_device
from lmpo.errors import DataError
from lmpo.models.load import format_prompt
from lmpo.pipeline import Pipeline
from lmpo.rollout.base import Generator, SamplingParams
from lmpo.rollout.modes import bind_rows
from lmpo.tasks.base import columns_of
from lmpo.train.data import prompt_key
from lmpo.train.guidance import Guide, failed_groups, flat_fraction, run_guide

_PLAN_KEYS = {"max_new_tokens", "prompt_suffix", "tags"}


@dataclass
class RolloutContext:
    """Everything collection needs besides the prompt stream (built once by the loop)."""

    generator: Generator
    tokenizer: Any
    reward_set: Any
    params: SamplingParams
    num_generations: int
    pipeline: Pipeline = field(default_factory=Pipeline)  # shapers, selectors and the collection extension points
    system_prompt: str | None = None
    train_generator: Generator | None = None  # rollout.mode's generator for training rollouts (lmpo.rollout.modes)
    teachers: dict = field(default_factory=dict)  # guidance teacher models, loaded once (lmpo.train.guidance)


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
    columns.update(getattr(out, "columns", None) or {})  # per-row values recorded by the rollout mode (env_return)
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
    fields = _mode_fields(out)
    fields["response_mask"] = out.response_attn & fields["response_mask"] if "response_mask" in fields \
        else out.response_attn.clone()
    batch = RolloutBatch(
        prompt_ids=out.prompt_ids, prompt_mask=out.prompt_mask, response_ids=out.response_ids,
        response_attn=out.response_attn, group_ids=group_ids,
        rewards=rewards, reward_components=components, sampler_logprobs=out.sampler_logprobs,
        truncated=out.truncated, extras=extras, meta=meta, **fields,
    )
    return batch_to_device(batch, HOST)  # batches live on the host (a GPU sampler's tensors come back; CPU: as is)


_EPISODE_STATS = ("env_return", "num_turns", "episode_done", "invalid_actions", "tool_calls", "invalid_tool_calls",
                  "tool_errors")
_MODE_FIELDS = ("response_mask", "turn_ids", "token_rewards")  # batch fields a rollout mode may set


def _mode_fields(out) -> dict[str, torch.Tensor]:
    """The :class:`RolloutBatch` fields a rollout mode set (``ModeOutput.batch_fields``)."""
    fields = dict(getattr(out, "batch_fields", None) or {})
    bad = sorted(set(fields) - set(_MODE_FIELDS))
    if bad:
        raise DataError(f"A rollout mode may set the batch fields {', '.join(_MODE_FIELDS)}; got {', '.join(bad)}.")
    return fields


class InjectingStream:
    """Serves prompts made by components (the ``inject_prompts(n) -> rows`` extension point: curricula, rewrites,
    prefix prompts) before the data set's; the components keep their queues in their own state."""

    def __init__(self, stream, sources: list[Callable[[int], list]]):
        self.stream, self.sources = stream, sources

    @classmethod
    def wrap(cls, stream, sources: list[Callable[[int], list]]):
        return cls(stream, sources) if sources else stream

    def take(self, n: int, **kw: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for source in self.sources:
            if len(rows) < n:
                rows += list(source(n - len(rows)))[: n - len(rows)]
        return rows + (self.stream.take(n - len(rows), **kw) if n > len(rows) else [])


def collect(ctx: RolloutContext, stream, prompts_per_step: int, refill_rounds: int, step: int,
            ) -> tuple[RolloutBatch | None, RolloutBatch, dict[str, float]]:
    """Returns (training batch or None if every group was filtered, the first round's raw batch, stats)."""
    plain_ctx = ctx  # the ``after_collect`` hooks query the policy through the plain sampler
    if ctx.train_generator is not None:  # rollout.mode other than "sample" (evaluation keeps the plain sampler)
        ctx = dataclasses.replace(ctx, generator=ctx.train_generator, train_generator=None)
    p = ctx.pipeline
    stream = InjectingStream.wrap(stream, p.calls("inject_prompts"))
    weights, allocate = p.hook("prompt_weights"), p.hook("allocate")
    plan_group, prefix = p.hook("plan_group"), p.hook("prefix_budgets")
    guide = p.hook("guide")
    guidance = Guide(plain_ctx, step) if guide is not None else None
    fails = flats = 0.0
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
        generated += raw.batch_size
        n_new = int(torch.unique(raw.group_ids).numel())
        fails += len(failed_groups(raw)) / max(1, n_new)
        flats += flat_fraction(raw)
        if guidance is not None:  # guided rows join the groups before after_score, shapers and selectors see them
            first = first or raw  # the policy's own rollouts (the step's reward metrics)
            raw = run_guide(guide, guidance, raw)
        for augment in p.calls("after_score"):  # process credit, Monte-Carlo values (they may generate)
            raw = augment(ctx, raw)
        first = first or raw
        raws.append(raw)
        batch = raw
        for shaper in p.shapers:
            batch = shaper(batch)
        keep = torch.ones(batch.batch_size, dtype=torch.bool)
        for sel in p.selectors:
            keep &= sel(batch)
        if keep.any():
            part = batch.select(keep)
            kept.append(part)
            n_groups += int(torch.unique(part.group_ids).numel())
        if n_groups >= prompts_per_step or rounds >= refill_rounds:
            break
        rounds += 1
    for hook in p.calls("after_collect"):
        for raw in raws:
            hook(plain_ctx, raw)
    stats = {"rollout/refill_rounds": float(rounds), "rollout/generated": float(generated),
             "rollout/kept_frac": float(sum(b.batch_size for b in kept)) / max(1, generated),
             "rollout/all_fail_frac": fails / (rounds + 1), "rollout/flat_frac": flats / (rounds + 1)}
    if guidance is not None:
        every = RolloutBatch.concat(raws) if len(raws) > 1 else raws[0]
        stats.update({"guide/rows": 0.0, **guidance.stats, "guide/flat_frac_after": flat_fraction(every),
                      "guide/guided_frac": float(every.extras["guided"].mean())})
    if "num_turns" in first.extras:  # multi-turn episodes (rollout.mode=episodes): per-episode means
        every = RolloutBatch.concat(raws) if len(raws) > 1 else first
        for key in _EPISODE_STATS:
            stats[f"rollout/{key}"] = every.extras[key].float().mean().item()
        stats["rollout/policy_token_frac"] = float(every.response_mask.sum()) / max(1, int(every.response_attn.sum()))
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
