"""The data that flows through the pipeline.

``B`` = prompts x samples, ``T`` = response tokens (right-padded), ``P`` = prompt tokens (left-padded),
``K`` = reward components. Every tensor field is validated on construction; errors name the field.
Text and per-row metadata ride in ``meta`` and never enter the maths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmpo.errors import DataError

# field -> (dims spec, dtype kind); dims use B/T/P/K symbols
_SPEC: dict[str, tuple[tuple[str, ...], str]] = {
    "prompt_ids": (("B", "P"), "long"),
    "response_ids": (("B", "T"), "long"),
    "response_mask": (("B", "T"), "bool"),
    "group_ids": (("B",), "long"),
    "rewards": (("B",), "float"),
    "sampler_logprobs": (("B", "T"), "float"),
    "prompt_mask": (("B", "P"), "bool"),
    "response_attn": (("B", "T"), "bool"),
    "reward_components": (("B", "K"), "float"),
    "old_logprobs": (("B", "T"), "float"),
    "ref_logprobs": (("B", "T"), "float"),
    "token_rewards": (("B", "T"), "float"),
    "turn_ids": (("B", "T"), "long"),
    "advantages": (("B", "T"), "float"),
    "truncated": (("B",), "bool"),
}


def _check_dtype(name: str, t: Tensor, kind: str) -> None:
    ok = {
        "long": t.dtype in (torch.int64, torch.int32),
        "bool": t.dtype == torch.bool,
        "float": t.is_floating_point(),
    }[kind]
    if not ok:
        raise DataError(f"RolloutBatch.{name} must have a {kind} dtype, got {t.dtype}.")


@dataclass
class RolloutBatch:
    """One step's rollouts.

    Attributes:
        prompt_ids: (B, P) long, left-padded prompt tokens.
        response_ids: (B, T) long, right-padded sampled tokens.
        response_mask: (B, T) bool, tokens we train on (False on padding and tool/env output).
        group_ids: (B,) long, same prompt -> same id.
        rewards: (B,) float outcome reward after shaping.
        sampler_logprobs: (B, T) float log-probs under the rollout engine's sampling distribution.
        prompt_mask: (B, P) bool attention mask of the prompt (False on left padding).
        response_attn: (B, T) bool attention mask of the response: every generated token, EOS included. It can be
            wider than ``response_mask`` (a shaper may exclude tokens from training, never from attention).
        reward_components: (B, K) float per reward function, before weighting.
        old_logprobs / ref_logprobs: (B, T) trainer log-probs before the update / under the reference model.
        token_rewards: (B, T) process rewards.
        turn_ids: (B, T) long, which turn or step each token belongs to.
        advantages: (B, T) written by the advantage stage.
        truncated: (B,) bool, the response hit the length limit without EOS.
        extras: named tensors declared by the components that need them (leading dim B).
        meta: per-row metadata (prompt text, completion text, answer, ...), never used in the maths.
    """

    prompt_ids: Tensor
    response_ids: Tensor
    response_mask: Tensor
    group_ids: Tensor
    rewards: Tensor
    sampler_logprobs: Tensor
    prompt_mask: Tensor | None = None
    response_attn: Tensor | None = None
    reward_components: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    token_rewards: Tensor | None = None
    turn_ids: Tensor | None = None
    advantages: Tensor | None = None
    truncated: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        dims: dict[str, int] = {}
        for name, (spec, kind) in _SPEC.items():
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise DataError(f"RolloutBatch.{name} must be a torch.Tensor, got {type(t).__name__}.")
            if t.dim() != len(spec):
                raise DataError(
                    f"RolloutBatch.{name} must have shape ({', '.join(spec)}), got {tuple(t.shape)}."
                )
            _check_dtype(name, t, kind)
            for sym, size in zip(spec, t.shape):
                if sym in dims and dims[sym] != size:
                    raise DataError(
                        f"RolloutBatch.{name} has {sym}={size} but earlier fields have {sym}={dims[sym]} "
                        f"(shape {tuple(t.shape)})."
                    )
                dims.setdefault(sym, size)
        B = dims["B"]
        for k, v in self.extras.items():
            if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != B:
                raise DataError(f"RolloutBatch.extras[{k!r}] must be a tensor with leading dimension B={B}.")
        if self.meta and len(self.meta) != B:
            raise DataError(f"RolloutBatch.meta has {len(self.meta)} rows, expected B={B}.")

    # ------------------------------------------------------------------ helpers
    @property
    def batch_size(self) -> int:
        return int(self.response_ids.shape[0])

    def _tensor_fields(self) -> list[str]:
        return [f for f in _SPEC if getattr(self, f) is not None]

    def replace(self, **changes: Any) -> "RolloutBatch":
        return dataclasses.replace(self, **changes)

    def select(self, idx: Tensor) -> "RolloutBatch":
        """Rows ``idx`` (a (B,) bool mask or a 1-D long index) of every per-row field."""
        if idx.dtype == torch.bool:
            idx = idx.nonzero(as_tuple=True)[0]
        idx = idx.to(self.response_ids.device)
        kw: dict[str, Any] = {f: getattr(self, f).index_select(0, idx) for f in self._tensor_fields()}
        kw["extras"] = {k: v.index_select(0, idx.to(v.device)) for k, v in self.extras.items()}
        kw["meta"] = [self.meta[i] for i in idx.tolist()] if self.meta else []
        return RolloutBatch(**kw)

    def split(self, n: int) -> list["RolloutBatch"]:
        """Split into ``n`` contiguous micro-batches of (near) equal size."""
        chunks = torch.arange(self.batch_size).tensor_split(n)
        return [self.select(c) for c in chunks if len(c)]

    def to(self, device: torch.device | str) -> "RolloutBatch":
        kw: dict[str, Any] = {f: getattr(self, f).to(device) for f in self._tensor_fields()}
        kw["extras"] = {k: v.to(device) for k, v in self.extras.items()}
        kw["meta"] = self.meta
        return RolloutBatch(**kw)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Concatenate batches row-wise, right-padding T and left-padding P to the widest."""
        if not batches:
            raise DataError("Cannot concatenate an empty list of RolloutBatch.")
        T = max(b.response_ids.shape[1] for b in batches)
        P = max(b.prompt_ids.shape[1] for b in batches)
        kw: dict[str, Any] = {}
        for name, (spec, _) in _SPEC.items():
            vals = [getattr(b, name) for b in batches]
            if all(v is None for v in vals):
                continue
            if any(v is None for v in vals):
                raise DataError(f"Cannot concatenate batches where only some have RolloutBatch.{name}.")
            if spec == ("B", "T"):
                vals = [torch.nn.functional.pad(v, (0, T - v.shape[1])) for v in vals]
            elif spec == ("B", "P"):
                vals = [torch.nn.functional.pad(v, (P - v.shape[1], 0)) for v in vals]
            kw[name] = torch.cat(vals, 0)
        keys = set(batches[0].extras)
        if any(set(b.extras) != keys for b in batches):
            raise DataError(
                f"Cannot concatenate batches with different extras keys: {[sorted(b.extras) for b in batches]}."
            )
        kw["extras"] = {k: torch.cat([b.extras[k] for b in batches], 0) for k in keys}
        kw["meta"] = [m for b in batches for m in b.meta]
        return RolloutBatch(**kw)


@dataclass
class PreferenceBatch:
    """Chosen/rejected pairs for preference optimisation (DPO-family losses).

    Attributes:
        prompt_ids: (N, P) long, left-padded.
        chosen_ids / rejected_ids: (N, T) long, right-padded responses.
        chosen_mask / rejected_mask: (N, T) bool.
        prompt_mask: (N, P) bool, False on the prompts' left padding (``None``: no padding).
        mismatched_logps / mismatched_ref_logps: (N,) summed log-probs of each row's *mismatched* pair (its prompt
            with another row's response) under the policy (no gradient) and the reference; filled by the preference
            stage only for a loss whose ``needs`` hold ``"mismatched_logprobs"`` (KTO's KL estimate), else ``None``.
    """

    prompt_ids: Tensor
    chosen_ids: Tensor
    chosen_mask: Tensor
    rejected_ids: Tensor
    rejected_mask: Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)
    prompt_mask: Tensor | None = None
    mismatched_logps: Tensor | None = None
    mismatched_ref_logps: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.prompt_ids.shape[0]
        for name in ("mismatched_logps", "mismatched_ref_logps"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n,):
                raise DataError(f"PreferenceBatch.{name} must have shape (N={n},), got {tuple(t.shape)}.")
        if self.prompt_mask is not None and self.prompt_mask.shape != self.prompt_ids.shape:
            raise DataError(f"PreferenceBatch.prompt_mask must match prompt_ids {tuple(self.prompt_ids.shape)}, got "
                            f"{tuple(self.prompt_mask.shape)}.")
        for name in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[0] != n:
                raise DataError(f"PreferenceBatch.{name} must have shape (N={n}, T), got {tuple(t.shape)}.")
        for a, b in (("chosen_ids", "chosen_mask"), ("rejected_ids", "rejected_mask")):
            if getattr(self, a).shape != getattr(self, b).shape:
                raise DataError(f"PreferenceBatch.{a} and {b} must have the same shape.")
        if self.chosen_mask.dtype != torch.bool or self.rejected_mask.dtype != torch.bool:
            raise DataError("PreferenceBatch masks must be bool tensors.")
