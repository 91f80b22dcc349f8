"""Guidance in the collect stage: the ``guide`` extension point's :class:`Guide` (docs/guidance.md).

A guidance provider (Scaf-GRPO, AMPO, RL-PLUS, ICPO, InT) sees each scoring round's raw batch and mixes *guided rows*
into its groups. The Guide builds those rows, each a complete :class:`~lmpo.batch.RolloutBatch` row scored by the
run's rewards, with its **own behaviour log-probs** in ``sampler_logprobs`` so that importance corrections stay
correct:

- :meth:`Guide.hinted` -- the policy samples under a prompt with a hint (tiered hints, few-shot demonstrations).
  ``rescore=False``: the row keeps the hinted prompt and is on-policy for it (Scaf-GRPO; ``off_policy`` 0).
  ``rescore=True``: the reply is re-attached to the plain prompt and its behaviour is the hinted sampler's
  log-probs pi(y | hint, q) (ICPO's implicit expert; ``off_policy`` 1).
- :meth:`Guide.traces` -- given texts (a data column's reference solution, an expert trace, an InT splice)
  teacher-forced on the plain prompt (``off_policy`` 1: the policy did not write them). ``behaviour="policy"``:
  pi_old's own log-probs of the trace (a plain ratio pi/mu is then 1 on-policy; RL-PLUS's MIS starts from them); a
  float c: the declared constant c per token (0.0 = probability 1, LUFFY/AMPO's
  convention for traces whose behaviour is unknown); ``"teacher:<model spec>"``: that model's log-probs.
- :meth:`Guide.teacher` -- a teacher model (any spec :func:`lmpo.models.load.load_model` loads: ``tiny:3``, a
  SmolLM2 folder) samples replies on the plain prompt; behaviour = the teacher's sampler log-probs. Teachers must
  share the policy's tokenizer (the behaviour log-probs are per policy token); loaded once and kept in the context.

:meth:`Guide.mix` puts guided rows into their groups (swapping out the group's lowest-reward unguided rows, or
appending), keeping groups contiguous, and adds the marker extras ``guided`` / ``off_policy`` / ``guide_tier`` (0
on the policy's own rows) that losses read. Guided rows' ``meta[i]["guide"]`` says source, tier and behaviour.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.models.load import format_prompt
from lmpo.models.logprobs import response_logprobs
from lmpo.train.data import prompt_key

MARKERS = ("guided", "off_policy", "guide_tier")
_OPTIONAL = ("reward_components", "token_rewards", "turn_ids", "truncated", "prompt_mask", "response_attn")


def failed_groups(batch: RolloutBatch, threshold: float = 0.0) -> list[int]:
    """Group ids (in batch order) whose every reward is <= ``threshold`` (the all-zero groups of 0/1 rewards)."""
    out = []
    for g in torch.unique_consecutive(batch.group_ids).tolist():
        if float(batch.rewards[batch.group_ids == g].max()) <= threshold:
            out.append(g)
    return out


def flat_fraction(batch: RolloutBatch) -> float:
    """Fraction of groups whose rewards are all equal (GRPO's advantage is 0 on every row)."""
    groups = torch.unique(batch.group_ids)
    flat = [float(batch.rewards[batch.group_ids == g].std(unbiased=False)) < 1e-8 for g in groups.tolist()]
    return sum(flat) / max(1, len(flat))


def with_markers(batch: RolloutBatch) -> RolloutBatch:
    """The batch with zero marker extras (the policy's own rows) where it has none."""
    if all(k in batch.extras for k in MARKERS):
        return batch
    zeros = torch.zeros(batch.batch_size)
    return batch.replace(extras={**batch.extras, **{k: zeros.clone() for k in MARKERS if k not in batch.extras}})


def mix(batch: RolloutBatch, guided: RolloutBatch, replace: bool = True) -> RolloutBatch:
    """``batch`` with the ``guided`` rows in their groups (``guided.group_ids`` name them).

    ``replace=True``: each guided row takes the place of its group's lowest-reward unguided row (the last among
    ties), so group sizes stay; a group with no unguided row left is an error. ``replace=False``: guided rows are
    appended to their groups (groups grow). Groups stay contiguous and in batch order.
    """
    batch, guided = with_markers(batch), with_markers(guided)
    if set(batch.extras) != set(guided.extras):
        raise DataError("guide: guided rows must carry the same extras as the batch; the batch has "
                        f"{sorted(batch.extras)}, the guided rows {sorted(guided.extras)} (guidance cannot combine with "
                        "components or rollout modes that add their own per-row extras at collection).")
    drop = {f: None for f in _OPTIONAL if getattr(batch, f) is None and getattr(guided, f) is not None}
    guided = guided.replace(**drop) if drop else guided  # fields the batch does not carry
    lacking = [f for f in _OPTIONAL if getattr(batch, f) is not None and getattr(guided, f) is None]
    if lacking:
        raise DataError(f"guide: the guided rows lack {', '.join(lacking)}, which the batch carries.")
    B = batch.batch_size
    unknown = sorted(set(guided.group_ids.tolist()) - set(batch.group_ids.tolist()))
    if unknown:
        raise DataError(f"guide: guided rows name groups {unknown[:5]} that are not in the batch.")
    joined = RolloutBatch.concat([batch, guided])
    if replace:
        index = list(range(B))
        taken = batch.extras["guided"] > 0
        for j, g in enumerate(guided.group_ids.tolist()):
            free = [i for i in range(B) if int(batch.group_ids[i]) == g and not taken[i]]
            if not free:
                raise DataError(f"guide: group {g} has no unguided row left to replace.")
            low = min(float(batch.rewards[i]) for i in free)
            victim = [i for i in free if float(batch.rewards[i]) == low][-1]
            taken[victim] = True
            index[victim] = B + j
    else:
        index = []
        for g in torch.unique_consecutive(batch.group_ids).tolist():
            index += (batch.group_ids == g).nonzero().flatten().tolist()
            index += [B + j for j, h in enumerate(guided.group_ids.tolist()) if h == g]
    return joined.select(torch.tensor(index, dtype=torch.long))


class Guide:
    """What a ``guide`` provider may do in one scoring round: build guided rows (see the module docstring).

    Args:
        ctx: the rollout context whose generator is the plain sampler (the policy).
        step: the training step (schedules: exemption periods, annealed bonuses).
    """

    def __init__(self, ctx, step: int) -> None:
        self.ctx, self.step = ctx, int(step)
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers for providers
    @staticmethod
    def rows_of(batch: RolloutBatch, groups: list[int]) -> list[dict[str, Any]]:
        """The task row of each group (``meta[i]["row"]``, set by the rollout stage)."""
        first = {}
        for m, g in zip(batch.meta, batch.group_ids.tolist()):
            first.setdefault(g, m.get("row"))
        missing = [g for g in groups if first.get(g) is None]
        if missing:
            raise DataError(f"guide: groups {missing[:5]} carry no task row (meta['row']); guided rows need it.")
        return [first[g] for g in groups]

    failed_groups = staticmethod(failed_groups)
    mix = staticmethod(mix)

    def count(self, key: str, n: float = 1.0) -> None:
        """Add ``n`` to the step metric ``guide/<key>``."""
        self.stats[f"guide/{key}"] = self.stats.get(f"guide/{key}", 0.0) + float(n)

    # ------------------------------------------------------------------ guided rows
    def hinted(self, rows: list[dict[str, Any]], prompts: list[str], groups: list[int], n: int = 1, *,
               rescore: bool = False, tier: int = 1, source: str = "hint") -> RolloutBatch:
        """``n`` policy samples per row under the hinted prompt ``prompts[i]`` (the full user prompt text, hint
        included), scored against the row's columns and attached to group ``groups[i]``. ``rescore``: the reply is
        re-attached to the row's plain prompt (behaviour = the hinted sampler's log-probs)."""
        from lmpo.train.rollouts import score  # the rollout stage scores guided rows exactly like the policy's

        hinted_rows = [{**r, "prompt": p} for r, p in zip(rows, prompts)]
        out = score(self.ctx, hinted_rows, n, self.ctx.params)
        out = out.replace(group_ids=torch.tensor(groups, dtype=torch.long).repeat_interleave(n))
        src = [i for i in range(len(rows)) for _ in range(n)]
        if rescore:
            ids, mask = self._encode([self._plain(rows[i]) for i in src])
            out = out.replace(prompt_ids=ids, prompt_mask=mask)
        behaviour = "hinted sampler" + (" (reply re-attached to the plain prompt)" if rescore else "")
        return self._mark(out, [rows[i] for i in src], source, tier, off_policy=rescore, behaviour=behaviour)

    def traces(self, rows: list[dict[str, Any]], texts: list[str], groups: list[int], *,
               behaviour: str | float = "policy", tier: int = 0, source: str = "data") -> RolloutBatch:
        """The texts as replies to the rows' plain prompts (EOS appended, cut at ``max_new_tokens``), scored, with
        behaviour log-probs ``behaviour``: ``"policy"``, a float constant, or ``"teacher:<spec>"``."""
        if not texts:
            raise DataError("guide.traces: no texts given.")
        tok = self.ctx.tokenizer
        eos = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
        limit = self.ctx.params.max_new_tokens
        seqs = [(tok(t, add_special_tokens=False)["input_ids"] + eos)[:limit] for t in texts]
        T = max(1, max(len(s) for s in seqs))
        pad = int(tok.pad_token_id)
        resp = torch.tensor([s + [pad] * (T - len(s)) for s in seqs], dtype=torch.long)
        attn = torch.tensor([[j < len(s) for j in range(T)] for s in seqs], dtype=torch.bool)
        prompts = [self._plain(r) for r in rows]
        p_ids, p_mask = self._encode(prompts)
        completions = [tok.decode(s, skip_special_tokens=True) for s in seqs]
        rewards, comps = self._rewards(prompts, completions, rows)
        if isinstance(behaviour, (int, float)):
            logp = torch.where(attn, torch.full(attn.shape, float(behaviour)), 0.0)
        elif behaviour == "policy":
            logp = self._logprobs(self._policy_model(), p_ids, p_mask, resp, attn)
        elif isinstance(behaviour, str) and behaviour.startswith("teacher:"):
            logp = self._logprobs(self._teacher(behaviour[len("teacher:"):]).model, p_ids, p_mask, resp, attn)
        else:
            raise DataError(f"guide.traces: behaviour must be 'policy', a number or 'teacher:<model spec>', got "
                            f"{behaviour!r}.")
        out = RolloutBatch(prompt_ids=p_ids, prompt_mask=p_mask, response_ids=resp, response_attn=attn,
                           response_mask=attn.clone(), group_ids=torch.tensor(groups, dtype=torch.long),
                           rewards=rewards, reward_components=comps, sampler_logprobs=logp,
                           truncated=torch.tensor([not (eos and s[-1] == eos[0]) for s in seqs]),
                           meta=[{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])
        return self._mark(out, rows, source, tier, off_policy=True, behaviour=str(behaviour))

    def teacher(self, spec: str, rows: list[dict[str, Any]], groups: list[int], n: int = 1, *,
                tier: int = 0) -> RolloutBatch:
        """``n`` replies per row sampled by the teacher model ``spec`` on the plain prompt; behaviour = its log-probs."""
        teacher = self._teacher(spec)
        ctx = dataclasses.replace(self.ctx, generator=teacher)
        from lmpo.train.rollouts import score

        out = score(ctx, rows, n, self.ctx.params)
        out = out.replace(group_ids=torch.tensor(groups, dtype=torch.long).repeat_interleave(n))
        src = [r for r in rows for _ in range(n)]
        return self._mark(out, src, f"teacher:{spec}", tier, off_policy=True, behaviour=f"teacher:{spec}")

    def sample(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """One policy reply per user prompt text (the plain sampler, the run's sampling settings): text the provider
        reads (e.g. InT's proposed intervention), not a training row."""
        params = self.ctx.params
        if max_new_tokens is not None:
            params = dataclasses.replace(params, max_new_tokens=int(max_new_tokens))
        texts = [format_prompt(self.ctx.tokenizer, p, self.ctx.system_prompt) for p in prompts]
        self.count("proposals", len(texts))
        return list(self.ctx.generator.generate(texts, params).completions)

    def policy_logprobs(self, batch: RolloutBatch) -> Tensor:
        """log pi_old of every reply of ``batch`` under its own prompt (no gradient; the sampling temperature)."""
        return self._logprobs(self._policy_model(), batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                              batch.response_attn)

    def answer_prob(self, rows: list[dict[str, Any]], contexts: list[str], answers: list[str]) -> Tensor:
        """Mean per-token probability (N,) the policy gives ``answers[i]`` right after row i's plain prompt followed
        by ``contexts[i]`` (no gradient): how well the policy follows a trace to the gold answer (AMPO's
        comprehension score, RLPR's probability reward)."""
        tok = self.ctx.tokenizer
        ids, mask = self._encode([self._plain(r) + c for r, c in zip(rows, contexts)])
        seqs = [tok(a, add_special_tokens=False)["input_ids"] or [int(tok.pad_token_id)] for a in answers]
        T = max(len(s) for s in seqs)
        resp = torch.tensor([s + [int(tok.pad_token_id)] * (T - len(s)) for s in seqs], dtype=torch.long)
        attn = torch.tensor([[j < len(s) for j in range(T)] for s in seqs], dtype=torch.bool)
        lp = self._logprobs(self._policy_model(), ids, mask, resp, attn)
        return (lp.exp() * attn).sum(1) / attn.sum(1)

    # ------------------------------------------------------------------ internals
    def _plain(self, row: dict[str, Any]) -> str:
        return format_prompt(self.ctx.tokenizer, row["prompt"], self.ctx.system_prompt)

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        seqs = [self.ctx.tokenizer(t, add_special_tokens=False)["input_ids"] or [int(self.ctx.tokenizer.pad_token_id)]
                for t in texts]
        P = max(len(s) for s in seqs)
        pad = int(self.ctx.tokenizer.pad_token_id)
        ids = torch.tensor([[pad] * (P - len(s)) + s for s in seqs], dtype=torch.long)
        mask = torch.tensor([[j >= P - len(s) for j in range(P)] for s in seqs], dtype=torch.bool)
        return ids, mask

    def _rewards(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]):
        from lmpo.tasks.base import columns_of

        rewards, comps = self.ctx.reward_set(prompts, completions, columns_of(rows))
        return rewards.float(), comps.float()

    def _policy_model(self):
        model = getattr(self.ctx.generator, "model", None)
        if model is None:
            raise DataError("guide: behaviour 'policy' needs the policy in process (rollout.backend=hf); with another "
                            "backend declare a constant behaviour log-prob instead.")
        return model

    def _logprobs(self, model, p_ids, p_mask, resp, attn) -> Tensor:
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                lp, _ = response_logprobs(model, p_ids.to(device), p_mask.to(device), resp.to(device), attn.to(device),
                                          temperature=max(self.ctx.params.temperature, 1e-6))
        finally:
            model.train(was)
        return torch.where(attn, lp.float().cpu(), 0.0)

    def _teacher(self, spec: str):
        cache = self.ctx.teachers
        if spec not in cache:
            from lmpo.models.load import load_model
            from lmpo.rollout.hf import HFGenerator

            model, tok = load_model(spec)
            policy = getattr(self.ctx.generator, "model", None)
            if policy is not None:  # beside the policy (a GPU when the policy is on one)
                model = model.to(next(policy.parameters()).device)
            if tok.get_vocab() != self.ctx.tokenizer.get_vocab():
                raise DataError(f"guide: teacher {spec!r} has another tokenizer than the policy; its log-probs would "
                                "not be per policy token. Use a teacher of the same family, or its texts as data "
                                "traces with a declared constant behaviour.")
            cache[spec] = HFGenerator(model, tok)
        return cache[spec]

    def _mark(self, out: RolloutBatch, rows: list[dict[str, Any]], source: str, tier: int, *, off_policy: bool,
              behaviour: str) -> RolloutBatch:
        n = out.batch_size
        meta = [{**(m or {}), "prompt_key": prompt_key(r), "row": r,
                 "guide": {"source": source, "tier": int(tier), "behaviour": behaviour}}
                for m, r in zip(out.meta or [{}] * n, rows)]
        extras = {**out.extras, "guided": torch.ones(n), "off_policy": torch.full((n,), float(off_policy)),
                  "guide_tier": torch.full((n,), float(tier))}
        self.count("rows", n)
        return out.replace(meta=meta, extras=extras, rewards=out.rewards.float())


def run_guide(provider, guide: Guide, batch: RolloutBatch) -> RolloutBatch:
    """Call the ``guide`` provider on a round's raw batch and check what it returns."""
    out = provider(guide, with_markers(batch))
    if not isinstance(out, RolloutBatch):
        raise DataError(f"guide must return a RolloutBatch, got {type(out).__name__}.")
    out = with_markers(out)
    if set(out.group_ids.tolist()) - set(batch.group_ids.tolist()):
        raise DataError("guide returned rows of groups that were not in the batch; build guided rows with the Guide "
                        "and mix them in with Guide.mix.")
    g = out.group_ids
    if torch.unique_consecutive(g).numel() != torch.unique(g).numel():
        raise DataError("guide returned a batch whose groups are not contiguous; mix guided rows in with Guide.mix.")
    return out
