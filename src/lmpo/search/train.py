"""Training on search data: step-level preference pairs (through :data:`lmpo.registry.PREFERENCE_LOSSES`) and
supervised steps, plus the search-then-update iteration the search recipes share (:func:`iterate`).

This is a small self-contained loop (a model, its tokenizer, an optimizer) so the recipes can be tested and measured
on a CPU; it builds the :class:`~lmpo.batch.PreferenceBatch` of the preference contract and calls a registered
preference loss exactly as the offline preference stage does, so a recipe's pairs can also be written out and
trained there.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps
from lmpo.models.logprobs import response_logprobs
from lmpo.search.tree import StepPair, Tree


def _encode(tokenizer, texts: list[str], left: bool) -> tuple[Tensor, Tensor]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(1, max(len(x) for x in ids))
    pad = int(tokenizer.pad_token_id)
    rows = [([pad] * (width - len(x)) + x) if left else (x + [pad] * (width - len(x))) for x in ids]
    mask = [([0] * (width - len(x)) + [1] * len(x)) if left else ([1] * len(x) + [0] * (width - len(x))) for x in ids]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def preference_batch(tokenizer, pairs: list[StepPair]) -> PreferenceBatch:
    """Step pairs as a :class:`PreferenceBatch` (prompts left-padded, steps right-padded)."""
    prompt_ids, _ = _encode(tokenizer, [p.prompt for p in pairs], left=True)
    chosen, cmask = _encode(tokenizer, [p.chosen for p in pairs], left=False)
    rejected, rmask = _encode(tokenizer, [p.rejected for p in pairs], left=False)
    meta = [{"q_chosen": p.q_chosen, "q_rejected": p.q_rejected, "depth": p.depth} for p in pairs]
    return PreferenceBatch(prompt_ids, chosen, cmask, rejected, rmask, meta)


def write_pairs(pairs: list[StepPair], path: str) -> int:
    """Write step pairs as TRL-format JSONL (``prompt``, ``chosen``, ``rejected``, plus ``q_gap`` = Q_w - Q_l for
    ``preference.data.gap_column``) for the offline preference stage (docs/preference.md); returns the rows written.
    That stage appends EOS to each response: right for steps that end a turn (one equation a turn)."""
    import json

    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                "q_gap": p.q_chosen - p.q_rejected, "depth": p.depth}) + "\n")
    return len(pairs)


def completion_logps(model, tokenizer, prompts: list[str], completions: list[str]) -> tuple[Tensor, Tensor]:
    """Per-token log-probs (N, T) of ``completions`` after ``prompts`` and their mask (gradient when enabled)."""
    p, pm = _encode(tokenizer, prompts, left=True)
    c, cm = _encode(tokenizer, completions, left=False)
    lp = response_logprobs(model, p, pm, c, cm, packed=False, share_prompt=False)
    lp = lp[0] if isinstance(lp, tuple) else lp
    return lp * cm, cm


def pair_logps(model, tokenizer, pairs: list[StepPair]) -> PairLogps:
    prompts = [p.prompt for p in pairs]
    chosen, _ = completion_logps(model, tokenizer, prompts, [p.chosen for p in pairs])
    rejected, _ = completion_logps(model, tokenizer, prompts, [p.rejected for p in pairs])
    return PairLogps(chosen, rejected)


def mismatched_logps(model, tokenizer, pairs: list[StepPair]) -> Tensor:
    """(N,) summed log-probs of each pair's prompt followed by the previous pair's response (cyclically; its chosen
    step on even rows, its rejected one on odd rows), as the offline stage mismatches them."""
    if len(pairs) < 2:
        from lmpo.errors import DataError
        raise DataError("KTO's KL estimate (reference_point=mismatched) pairs each prompt with another pair's step, "
                        f"but this update has {len(pairs)} pair; use a loss without it or more pairs per update.")
    other = [(pairs[i - 1].chosen if i % 2 == 0 else pairs[i - 1].rejected) for i in range(len(pairs))]
    lp, mask = completion_logps(model, tokenizer, [p.prompt for p in pairs], other)
    return (lp * mask).sum(-1)


def preference_update(model, ref, tokenizer, optimizer, pairs: list[StepPair], loss) -> dict[str, float]:
    """One optimizer step of the preference ``loss`` (a PREFERENCE_LOSSES component) on ``pairs``."""
    batch = preference_batch(tokenizer, pairs)
    model.train()
    policy = pair_logps(model, tokenizer, pairs)
    with torch.no_grad():
        reference = pair_logps(ref, tokenizer, pairs) if "ref_logprobs" in loss.needs else None
        if "mismatched_logprobs" in loss.needs:  # KTO's KL estimate (lmpo.train.preference.attach_mismatched)
            batch = dataclasses.replace(batch, mismatched_logps=mismatched_logps(model, tokenizer, pairs),
                                        mismatched_ref_logps=mismatched_logps(ref, tokenizer, pairs))
    out = loss(batch, policy, reference)
    optimizer.zero_grad()
    out.per_pair.mean().backward()
    optimizer.step()
    model.eval()
    return {"loss": float(out.per_pair.detach().mean()), **{k: float(v) for k, v in out.metrics.items()}}


def sft_update(model, tokenizer, optimizer, examples: list[tuple[str, str]]) -> dict[str, float]:
    """One optimizer step of -mean_i sum_t log pi(step_i | prefix_i) on (prefix, step) examples."""
    model.train()
    lp, mask = completion_logps(model, tokenizer, [e[0] for e in examples], [e[1] for e in examples])
    loss = -(lp.sum(-1)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    return {"loss": float(loss.detach()), "tokens": float(mask.sum())}


@dataclass
class IterationLog:
    solved: list[float] = field(default_factory=list)  # share of prompts whose search found a success, per iteration
    examples: list[int] = field(default_factory=list)  # pairs / supervised examples collected per iteration
    metrics: list[dict[str, float]] = field(default_factory=list)


def iterate(recipe: Any, model, tokenizer, make_tree: Callable[[Any, int, int], Tree], prompts: list[Any],
            iterations: int, optimizer, updates: int = 1) -> IterationLog:
    """Search every prompt with the current policy (``make_tree(prompt, iteration, index)``), extract the recipe's
    data (``recipe.extract(tree)``), and make ``updates`` optimizer steps on it (``recipe.update``). The reference of
    the recipe's preference loss is refreshed to the current policy at the start of each iteration when
    ``recipe.ref_per_iteration`` (MCTS-DPO), else it stays the initial policy (TP-LLaMA's SFT model)."""
    log, ref = IterationLog(), copy.deepcopy(model).eval()
    for it in range(iterations):
        if getattr(recipe, "ref_per_iteration", False) and it:
            ref = copy.deepcopy(model).eval()
        trees = [make_tree(p, it, i) for i, p in enumerate(prompts)]
        data = [d for t in trees for d in recipe.extract(t)]
        log.solved.append(sum(t.solved for t in trees) / max(len(trees), 1))
        log.examples.append(len(data))
        for _ in range(updates if data else 0):
            log.metrics.append(recipe.update(model, ref, tokenizer, optimizer, data))
    return log
