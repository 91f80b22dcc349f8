"""Preference pairs from a local JSONL / JSON / Parquet file, in TRL's preference format, and their tokenization.

A row holds ``prompt``, ``chosen`` and ``rejected`` (TRL's names; other column names are mapped with
``prompt_column`` / ``chosen_column`` / ``rejected_column``). Each is plain text, or a list of chat messages
(``{"role", "content"}``): the "conversational" format. Without a prompt column (``prompt_column: null``) the prompt
is implicit, as in TRL: the longest common prefix of the chosen and rejected conversations, and each response is the
rest of its conversation.

The public API (also used to train reward models):

- :func:`load_pairs` ``(path, ...) -> list[dict]``: rows ``{"prompt", "chosen", "rejected"}`` (plus the file's other
  columns), the unusable ones (an empty side, identical sides) counted in ``skipped`` instead of kept;
- :func:`tokenize_pairs` ``(rows, tokenizer, ...) -> list[dict]``: token ids per pair, the prompt rendered as the
  rollouts render it (:func:`lmpo.models.load.format_prompt`), each response followed by EOS, over-long prompts
  counted in ``skipped``, over-long responses truncated (TRL's ``max_completion_length``);
- :func:`collate_pairs` ``(pairs, pad_id) -> PreferenceBatch``;
- :class:`PairData`: the ``preference.data`` config section (file, columns, budgets, held-out split).
"""

from __future__ import annotations

import random
from pathlib import Path
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from lmpo.batch import PreferenceBatch
from lmpo.errors import ConfigError, DataError, did_you_mean
from lmpo.tasks.base import prompt_problem
from lmpo.tasks.local import _load

SKIP_REASONS = {
    "empty_side": "the chosen or the rejected response is empty",
    "identical": "the chosen and rejected responses are identical",
    "prompt_too_long": "the prompt is longer than max_prompt_length tokens",
    "small_gap": "the pair's score gap is below min_gap (a hard pair, MPO's split)",
}


def _is_messages(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _empty(x: Any) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(not str(m.get("content") or "").strip() for m in x)


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _side(value: Any, where: str) -> Any:
    if isinstance(value, str) or _is_messages(value):
        return list(value) if not isinstance(value, str) else value
    raise DataError(f"{where} is a {type(value).__name__} ({str(value)[:60]!r}); expected a string or a list of chat "
                    "messages {'role': ..., 'content': ...}.")


def _unpaired(r: dict, completion_column: str, label_column: str, chosen_column: str) -> bool:
    return r.get(chosen_column) is None and r.get(completion_column) is not None and label_column in r


def load_pairs(path: str, *, prompt_column: str | None = "prompt", chosen_column: str = "chosen",
               rejected_column: str = "rejected", max_rows: int | None = None,
               skipped: Counter | None = None, what: str = "Pair file", completion_column: str = "completion",
               label_column: str = "label") -> list[dict[str, Any]]:
    """The usable pairs of ``path`` as rows ``{"prompt", "chosen", "rejected", ...}`` (module docstring).

    A missing column is a :class:`DataError` naming the column, the nearest column of the file, the file and the
    row; rows with an empty side or identical sides are dropped and counted in ``skipped`` (reason -> count)."""
    raw = _load(path, what)
    if max_rows is not None:
        raw = raw[:max_rows]
    if not raw:
        raise DataError(f'{what} "{path}" contains no rows; preference training needs at least one pair.')
    wanted = [("chosen_column", chosen_column), ("rejected_column", rejected_column)]
    if prompt_column is not None:
        wanted.insert(0, ("prompt_column", prompt_column))
    out: list[dict[str, Any]] = []
    for i, r in enumerate(raw):
        if _unpaired(r, completion_column, label_column, chosen_column):  # TRL's unpaired format (KTO)
            out.append(_unpaired_row(r, i, path, what, prompt_column, completion_column, label_column, skipped))
            continue
        for role, col in wanted:
            if r.get(col) is None:
                present = [k for k, v in r.items() if v is not None]
                raise DataError(
                    f'{what} "{path}" row {i} (0-based) has no column "{col}" (preference.data.{role}).'
                    f"{did_you_mean(col, present)} Columns of that row: {', '.join(present) or '(none)'}. Map the "
                    f"file's column with preference.data.{role}, or set prompt_column: null for implicit prompts "
                    f'(unpaired data: "{completion_column}" and "{label_column}" columns).')
        where = f'{what} "{path}" row {i} (0-based), column'
        chosen = _side(r[chosen_column], f'{where} "{chosen_column}"')
        rejected = _side(r[rejected_column], f'{where} "{rejected_column}"')
        if prompt_column is None:  # implicit prompt: the common prefix of the two conversations
            if isinstance(chosen, str) or isinstance(rejected, str):
                raise DataError(f"{where}s \"{chosen_column}\"/\"{rejected_column}\": an implicit prompt "
                                "(prompt_column: null) needs both sides as lists of chat messages.")
            n = _common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise DataError(f"{where}s \"{chosen_column}\"/\"{rejected_column}\": the two conversations share no "
                                "first message, so no prompt can be inferred; add a prompt column.")
        else:
            prompt = r[prompt_column]
        problem = prompt_problem(prompt)
        if problem:
            raise DataError(f'{where} "{prompt_column or chosen_column}": {problem}. Every pair needs a prompt.')
        reason = "empty_side" if _empty(chosen) or _empty(rejected) else "identical" if chosen == rejected else None
        if reason:
            if skipped is not None:
                skipped[reason] += 1
            continue
        extra = {k: v for k, v in r.items() if k not in (prompt_column, chosen_column, rejected_column)}
        out.append({**extra, "prompt": prompt, "chosen": chosen, "rejected": rejected, "row": i})
    return out


def _unpaired_row(r: dict, i: int, path: str, what: str, prompt_column: str | None, completion_column: str,
                  label_column: str, skipped: Counter | None) -> dict[str, Any] | None:
    """An unpaired example (prompt, completion, label) as a row with one side: chosen if the label is true (a
    desirable completion), rejected if false; the other side is empty (absent)."""
    where = f'{what} "{path}" row {i} (0-based)'
    if prompt_column is None or r.get(prompt_column) is None:
        raise DataError(f'{where}: an unpaired example ("{completion_column}", "{label_column}") needs a prompt column '
                        f'(preference.data.prompt_column, now {prompt_column!r}).')
    label = r[label_column]
    if not isinstance(label, bool):
        raise DataError(f'{where}, column "{label_column}": expected true (desirable) or false (undesirable), got '
                        f"{label!r}.")
    completion = _side(r[completion_column], f'{where}, column "{completion_column}"')
    problem = prompt_problem(r[prompt_column])
    if problem:
        raise DataError(f'{where}, column "{prompt_column}": {problem}. Every example needs a prompt.')
    side = "chosen" if label else "rejected"
    extra = {k: v for k, v in r.items() if k not in (prompt_column, completion_column, label_column)}
    return {**extra, "prompt": r[prompt_column], "chosen": "", "rejected": "", side: completion, "row": i,
            "unpaired": True}


def response_text(tokenizer, prompt: Any, response: Any, system_prompt: str | None = None) -> str:
    """The text a response adds after the rendered prompt: plain text as is; a list of messages as what the chat
    template renders after the prompt (the contents joined by newlines without a template)."""
    if isinstance(response, str):
        return response
    from lmpo.models.load import format_prompt

    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(str(m["content"]) for m in response)
    head = format_prompt(tokenizer, prompt, system_prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    full = tokenizer.apply_chat_template(messages + list(response), tokenize=False)
    if not full.startswith(head):
        return "\n".join(str(m["content"]) for m in response)
    text = full[len(head):]
    eos = tokenizer.eos_token or ""
    return text[: -len(eos)] if eos and text.rstrip().endswith(eos) and text.endswith(eos) else text


def tokenize_pairs(rows: list[dict[str, Any]], tokenizer, *, max_prompt_length: int, max_completion_length: int,
                   system_prompt: str | None = None, skipped: Counter | None = None) -> list[dict[str, Any]]:
    """Token ids of each pair: ``prompt_ids`` (the prompt as rollouts render it), ``chosen_ids`` and
    ``rejected_ids`` (the response, then EOS, truncated to ``max_completion_length``). A prompt over
    ``max_prompt_length`` tokens is skipped and counted (never silently cut: the answer may sit at its end)."""
    from lmpo.models.load import format_prompt

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for r in rows:
        p = tokenizer(format_prompt(tokenizer, r["prompt"], system_prompt), add_special_tokens=False)["input_ids"]
        if len(p) > max_prompt_length:
            if skipped is not None:
                skipped["prompt_too_long"] += 1
            continue
        sides = {}
        for side in ("chosen", "rejected"):
            if r.get("unpaired") and (r[side] == "" or r[side] == []):  # the absent side of an unpaired example
                sides[f"{side}_ids"], sides[f"{side}_truncated"] = [], False
                continue
            text = response_text(tokenizer, r["prompt"], r[side], system_prompt)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            sides[f"{side}_ids"] = ids[:max_completion_length]
            sides[f"{side}_truncated"] = len(ids) > max_completion_length
        if sides["chosen_ids"] == sides["rejected_ids"]:  # identical after truncation: no preference left
            if skipped is not None:
                skipped["identical"] += 1
            continue
        out.append({"prompt": r["prompt"], "prompt_ids": p, **sides, "row": r.get("row"),
                    "unpaired": bool(r.get("unpaired"))})
    return out


def collate_pairs(pairs: list[dict[str, Any]], pad_id: int) -> PreferenceBatch:
    """A :class:`PreferenceBatch` of tokenized pairs: prompts left-padded (with ``prompt_mask``), responses
    right-padded, each side to its own longest response."""
    if not pairs:
        raise DataError("collate_pairs: no pairs to collate.")
    P = max(len(p["prompt_ids"]) for p in pairs)
    prompt = torch.full((len(pairs), P), pad_id, dtype=torch.long)
    pmask = torch.zeros(len(pairs), P, dtype=torch.bool)
    for i, p in enumerate(pairs):
        n = len(p["prompt_ids"])
        prompt[i, P - n:] = torch.tensor(p["prompt_ids"], dtype=torch.long)
        pmask[i, P - n:] = True
    sides = {}
    for side in ("chosen", "rejected"):
        T = max(len(p[f"{side}_ids"]) for p in pairs)
        ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(pairs), T, dtype=torch.bool)
        for i, p in enumerate(pairs):
            n = len(p[f"{side}_ids"])
            ids[i, :n] = torch.tensor(p[f"{side}_ids"], dtype=torch.long)
            mask[i, :n] = True
        sides[f"{side}_ids"], sides[f"{side}_mask"] = ids, mask
    return PreferenceBatch(prompt_ids=prompt, prompt_mask=pmask, **sides,
                           meta=[{"row": p.get("row"), "index": p.get("index")} for p in pairs])


def shipped(path: str) -> str:
    """``lmpo:<relative path>`` names a file shipped in the package (``lmpo:tasks/data/pairs_copy.jsonl``)."""
    if path.startswith("lmpo:"):
        return str(Path(__file__).resolve().parents[1] / path[len("lmpo:"):])
    return path


@dataclass(frozen=True)
class PairData:
    """The ``preference.data`` section: a pair file in TRL's format and how to read it.

    Attributes:
        path: Pair file (``.jsonl``, ``.json`` or ``.parquet``); ``lmpo:tasks/data/<file>`` for a shipped one.
        eval_path: Held-out pair file; without it ``eval_fraction`` of ``path`` is held out (seeded).
        eval_fraction: Share of ``path`` held out for the pairwise evaluation (0: none).
        prompt_column: Column of the prompt; ``null``: implicit (common prefix of the two conversations).
        chosen_column, rejected_column: Columns of the preferred and dispreferred responses.
        max_prompt_length: Prompts over this many tokens are skipped (and counted).
        max_completion_length: Responses are truncated to this many tokens (EOS included).
        max_rows: Keep only the first rows of each file.
        seed: Seed of the held-out split.
        gap_column, min_gap: Keep only pairs whose ``gap_column`` (a reward model's score gap, chosen minus
            rejected) is at least ``min_gap``; the others are counted as ``small_gap`` (MPO's easy set,
            :func:`split_by_gap`).
    """

    path: str
    eval_path: str | None = None
    eval_fraction: float = 0.1
    prompt_column: str | None = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_prompt_length: int = 512
    max_completion_length: int = 512
    max_rows: int | None = None
    seed: int = 0
    gap_column: str | None = None
    min_gap: float | None = None

    def __post_init__(self) -> None:
        if (self.gap_column is None) != (self.min_gap is None):
            raise ConfigError("preference.data.gap_column and preference.data.min_gap go together (keep the pairs "
                              "whose score gap is at least min_gap); set both or neither.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"preference.data.eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        for key in ("max_prompt_length", "max_completion_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"preference.data.{key} must be >= 1, got {getattr(self, key)}.")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"preference.data.max_rows must be >= 1 or null, got {self.max_rows}.")

    def _read(self, path: str, tokenizer, system_prompt: str | None, what: str) -> tuple[list[dict], Counter]:
        skipped: Counter = Counter()
        path = shipped(path)
        rows = load_pairs(path, prompt_column=self.prompt_column, chosen_column=self.chosen_column,
                          rejected_column=self.rejected_column, max_rows=self.max_rows, skipped=skipped, what=what)
        if self.gap_column is not None:
            rows = self._easy(rows, path, what, skipped)
        pairs = tokenize_pairs(rows, tokenizer, max_prompt_length=self.max_prompt_length,
                               max_completion_length=self.max_completion_length, system_prompt=system_prompt,
                               skipped=skipped)
        if not pairs:
            why = "; ".join(f"{n} skipped: {SKIP_REASONS[k]}" for k, n in skipped.items()) or "no rows"
            raise DataError(f'{what} "{path}" has no usable pair ({why}). Fix the file, or raise '
                            "preference.data.max_prompt_length if the prompts are too long.")
        return pairs, skipped

    def _easy(self, rows: list[dict], path: str, what: str, skipped: Counter) -> list[dict]:
        gaps = []
        for r in rows:
            g = r.get(self.gap_column)
            if isinstance(g, bool) or not isinstance(g, (int, float)):
                raise DataError(f'{what} "{path}" row {r["row"]} (0-based), column "{self.gap_column}" '
                                f"(preference.data.gap_column): expected a number (the score gap), got {g!r}."
                                f"{did_you_mean(self.gap_column, list(r)) if g is None else ''}")
            gaps.append(float(g))
        easy, hard = split_by_gap(gaps, float(self.min_gap))
        if hard:
            skipped["small_gap"] += len(hard)
        return [rows[i] for i in easy]

    def build(self, tokenizer, system_prompt: str | None = None) -> tuple[list[dict], list[dict], dict[str, int]]:
        """``(train pairs, held-out pairs, skipped counts)``: tokenized, each pair tagged with its ``index``."""
        train, skipped = self._read(self.path, tokenizer, system_prompt, "Pair file")
        if self.eval_path is not None:
            held_out, more = self._read(self.eval_path, tokenizer, system_prompt, "Eval pair file")
            skipped = Counter({f"train/{k}": v for k, v in skipped.items()}) + \
                Counter({f"eval/{k}": v for k, v in more.items()})
        else:
            n_eval = round(len(train) * self.eval_fraction)
            if self.eval_fraction > 0 and len(train) > 1:
                n_eval = min(max(n_eval, 1), len(train) - 1)  # at least one pair on each side
            else:
                n_eval = 0  # a one-pair file trains on its pair and holds none out
            held = set(random.Random(self.seed).sample(range(len(train)), n_eval))
            train, held_out = ([p for i, p in enumerate(train) if i not in held],
                               [p for i, p in enumerate(train) if i in held])
        for i, p in enumerate(train):
            p["index"] = i
        for i, p in enumerate(held_out):
            p["index"] = i
        return train, held_out, dict(skipped)



def split_by_gap(gaps: list[float], delta: float) -> tuple[list[int], list[int]]:
    """MPO's data split (Xiao et al. 2024, arXiv:2403.19443): pair i is *easy* when its reward gap
    ``r(x, y_w) - r(x, y_l)`` is at least ``delta``, else *hard*. Returns (easy indices, hard indices)."""
    easy = [i for i, g in enumerate(gaps) if g >= delta]
    hard = [i for i, g in enumerate(gaps) if g < delta]
    return easy, hard


def pairs_from_task(rows: list[dict[str, Any]], seed: int = 0, reply: str = "{answer}") -> list[dict[str, Any]]:
    """Pairs from a task with numeric answers: the correct answer is chosen, a wrong one (the answer plus a seeded
    offset in [-9, 9] \\ {0}, kept non-negative) rejected, each written with ``reply`` (a format of the row's
    columns and ``answer``, e.g. ``"{a} + {b} = {answer}"``). Deterministic in ``seed``; the shipped pair files are
    made this way (``python -m lmpo.tasks.make_pairs``)."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        answer = int(r["answer"])
        wrong = answer
        while wrong == answer or wrong < 0:
            wrong = answer + rng.choice([d for d in range(-9, 10) if d])
        out.append({"prompt": r["prompt"], "chosen": reply.format(**{**r, "answer": r["answer"]}),
                    "rejected": reply.format(**{**r, "answer": wrong})})
    return out
