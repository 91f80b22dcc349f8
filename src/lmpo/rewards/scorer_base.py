"""What the learned scorers share: a scalar head on any loadable LM, loading a scorer from a spec, failure masking.

A scorer spec (the ``path`` of ``reward_model`` / ``process_reward_model``) is any of:

- an lmpo run folder of a scorer stage (``runs/rm/...``: its ``config.yaml`` says ``stage: reward_model`` or
  ``stage: prm``): the backbone named in that config plus the latest checkpoint's weights (head included);
- a Hugging Face ``...ForSequenceClassification`` folder (``config.json`` lists such an architecture): its own head;
- any spec :func:`lmpo.models.load.load_model` accepts (``tiny``, ``tiny:3``, ``default``, a ``.gguf``, a causal-LM
  folder): the LM's last hidden state and a new scalar head (seeded; ``scorer_head.pt`` in the folder if present).

Failures (a non-finite score, a verdict that cannot be parsed, a judge call that timed out) are never a crash: with
``on_failure: mask`` (the default) the sample gets the mean score of the *other* completions of its prompt (so its
group-relative advantage is 0: no signal, no push) and is counted in ``reward/<name>/failures``; with
``on_failure: error`` the step stops with an error naming the sample.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpo.errors import ModelError, RewardError

SCORER_STAGES = ("reward_model", "prm")
ON_FAILURE = ("mask", "error")


class ScalarHeadModel(nn.Module):
    """A scalar per token: ``head(h_t)`` on the LM's last hidden state (``kind="causal"``), or a sequence-
    classification model's own logits at each position (``kind="seqcls"``; only the last real token is meaningful)."""

    def __init__(self, lm: nn.Module, kind: str = "causal", head_seed: int = 0, label: int = -1):
        super().__init__()
        self.lm, self.kind, self.label = lm, kind, label
        if kind == "causal":
            hidden = lm.config.hidden_size
            self.head = nn.Linear(hidden, 1)
            gen = torch.Generator().manual_seed(head_seed)
            with torch.no_grad():  # small, seeded: the untrained score starts near 0 whatever the global RNG
                self.head.weight.copy_(torch.randn(1, hidden, generator=gen) / math.sqrt(hidden) * 0.1)
                self.head.bias.zero_()
            self.head.to(next(lm.parameters()).dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and attention mask -> (B, T) float32 scores."""
        if self.kind == "seqcls":
            # HF sequence classifiers pool at the last non-pad token themselves: run one row per real length.
            out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
            logits = self.lm(input_ids=ids, attention_mask=mask).logits.float()
            col = self.label if logits.shape[-1] > 1 else 0
            last = mask.long().sum(1) - 1
            out[torch.arange(ids.shape[0]), last] = logits[:, col]
            return out
        base = getattr(self.lm, self.lm.base_model_prefix, self.lm)
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def is_scorer_run(path: Path) -> bool:
    import yaml

    cfg = path / "config.yaml"
    if not cfg.is_file():
        return False
    try:
        return (yaml.safe_load(cfg.read_text()) or {}).get("stage") in SCORER_STAGES
    except yaml.YAMLError:
        return False


def build_scorer(spec: str, *, dtype: str = "float32", seed: int = 0, gguf_file: str | None = None,
                 want: str = "reward_model") -> tuple[ScalarHeadModel, Any]:
    """``(model, tokenizer)`` for a scorer spec (module docstring); the model in eval mode, gradients off."""
    from lmpo.models.load import load_model

    path = Path(str(spec)).expanduser()
    if path.is_dir() and is_scorer_run(path):
        model, tok = _from_run(path, want)
    elif path.is_dir() and _is_seqcls(path):
        if want == "prm":
            raise ModelError(f'"{spec}" is a sequence-classification model: it scores whole replies, not steps. A '
                             "process reward model needs a causal LM (a scalar per token) or an lmpo `stage: prm` run.")
        model, tok = _load_seqcls(path, dtype)
    else:
        lm, tok = load_model(str(spec), dtype=dtype, gguf_file=gguf_file, seed=seed)
        model = ScalarHeadModel(lm, head_seed=seed)
        head = path / "scorer_head.pt"
        if path.is_dir() and head.is_file():
            model.head.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval().requires_grad_(False), tok


def _is_seqcls(path: Path) -> bool:
    import json

    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def _load_seqcls(path: Path, dtype: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        lm = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=getattr(torch, dtype))
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f'Could not load the sequence-classification model in "{path}": {err}') from err
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return ScalarHeadModel(lm, kind="seqcls"), tok


def _from_run(path: Path, want: str):
    """The scorer a ``stage: reward_model`` / ``stage: prm`` run trained: its backbone + its latest checkpoint."""
    from lmpo.config import load_config
    from lmpo.train.checkpoint import latest_checkpoint, load_checkpoint

    cfg = load_config(str(path / "config.yaml"), [])
    if want == "prm" and cfg.stage != "prm":
        raise ModelError(f'"{path}" is a {cfg.stage} run: a process reward model needs a `stage: prm` run.')
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ModelError(f'Scorer run "{path}" has no checkpoint yet (output.checkpoint_every); train it first '
                         f"(`lmpo train {path / 'config.yaml'}`).")
    model, tok = build_scorer(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.train.seed, gguf_file=cfg.model.gguf_file)
    if (cfg.scorer or {}).get("objective") == "crm":  # two peer RMs were trained (lmpo.train.crm): score with A
        from lmpo.train.crm import PeerPair

        pair = PeerPair(model, build_scorer(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.train.seed + 1,
                                            gguf_file=cfg.model.gguf_file)[0])
        load_checkpoint(ckpt, pair)
        return pair.a, tok
    load_checkpoint(ckpt, model)
    return model, tok


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run a block with ``n`` intra-op threads (restored after); ``None`` leaves the setting alone."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_pair(tok, prompt: str, completion: str) -> list[int]:
    """Token ids of prompt then completion, each tokenised on its own (the completion's tokens never merge with the
    prompt's, so a score position is the same in training and in use)."""
    return tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]


def pad_right(rows: list[list[int]], pad: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and bool mask (at least one column)."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


class FailureLog:
    """Counts a scorer's failures between two ``pop_metrics()`` calls (the trainer logs them each step)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, kind: str, n: int = 1) -> None:
        if n:
            self.counts[kind] = self.counts.get(kind, 0) + n

    def pop(self) -> dict[str, float]:
        out, self.counts = {k: float(v) for k, v in self.counts.items()}, {}
        return out


def mask_failures(name: str, prompts: list, completions: list[str], scores: list[float | None], on_failure: str,
                  log: FailureLog, why: list[str] | None = None) -> list[float]:
    """Replace each ``None``/non-finite score (a failure) by the mean of its prompt's other scores (else the batch
    mean, else 0) and count it; or raise with ``on_failure="error"``."""
    bad = [i for i, s in enumerate(scores) if s is None or not math.isfinite(float(s))]
    if not bad:
        return [float(s) for s in scores]
    if on_failure == "error":
        i = bad[0]
        reason = why[i] if why else f"score {scores[i]!r}"
        raise RewardError(f'Scorer "{name}" failed on {len(bad)} of {len(scores)} samples; first: sample {i} '
                          f"(completion {completions[i][:60]!r}): {reason}. Set on_failure: mask to give failed "
                          "samples their group's mean score (no advantage) and count them instead.")
    log.add("failures", len(bad))
    bad_set = set(bad)
    good = {i: float(s) for i, s in enumerate(scores) if i not in bad_set}
    overall = sum(good.values()) / len(good) if good else 0.0
    out = []
    for i, s in enumerate(scores):
        if i in good:
            out.append(good[i])
            continue
        same = [good[j] for j in good if prompts[j] == prompts[i]]
        out.append(sum(same) / len(same) if same else overall)
    return out
