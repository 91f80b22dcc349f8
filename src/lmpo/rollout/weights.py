"""The trainer's weights in the names and layout an inference engine loads (Hugging Face checkpoint names).

An external engine (vLLM, :mod:`lmpo.rollout.vllm`) holds its own copy of the policy; after each optimiser step the
trainer sends it what changed:

- full fine-tuning: every trainable parameter, under its Hugging Face name;
- LoRA (peft): each adapted linear layer's *merged* weight ``W + scale * B @ A`` computed out of place (the peft
  model is never merged and unmerged, so its base weights never drift by rounding), under the base layer's name.

:func:`export_folder` writes a complete Hugging Face folder (config, safetensors, tokenizer) that an engine starts
from; :func:`engine_weights` gives the tensors of a sync.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def _base(model: nn.Module) -> nn.Module:
    """The underlying Hugging Face model of a peft wrapper (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _lora_layers(base: nn.Module) -> dict[str, nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft missing: no LoRA layers can exist
        return {}
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def _hf_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _merged(layer: nn.Module) -> torch.Tensor:
    w = layer.base_layer.weight.detach()
    if getattr(layer, "merged", False):  # already merged in place by the user: the weight is the merged one
        return w.clone()
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if getattr(layer, "disable_adapters", False) or not active:
        return w.clone()
    with torch.no_grad():
        return w + sum(layer.get_delta_weight(a) for a in active).to(w.dtype)


def engine_weights(model: nn.Module, only_trainable: bool = True, dtype: torch.dtype | None = None
                   ) -> dict[str, torch.Tensor]:
    """The policy's weights under Hugging Face names, LoRA merged.

    Args:
        model: a Hugging Face causal LM, optionally peft-wrapped with LoRA.
        only_trainable: just what an optimiser step can change (the adapted layers under LoRA, the trainable
            parameters otherwise); ``False``: every tensor of the checkpoint (tied duplicates dropped).
        dtype: cast to this dtype (``None`` = as they are).
    """
    base = _base(model)
    lora = _lora_layers(base)
    out: dict[str, torch.Tensor] = {}
    if lora:
        for name, layer in lora.items():
            out[f"{name}.weight"] = _merged(layer)
        if only_trainable:  # a LoRA step changes the adapted layers only (modules_to_save aside)
            extra = {_hf_name(n): p.detach() for n, p in base.named_parameters()
                     if p.requires_grad and "lora_" not in n}
            out.update(extra)
    if not lora or not only_trainable:
        seen: set[int] = set()
        for n, p in list(base.named_parameters()) + list(base.named_buffers()):
            if "lora_" in n or (only_trainable and not p.requires_grad):
                continue
            key = _hf_name(n)
            if key in out or (key.endswith(".base_layer.weight")):
                continue
            if id(p) in seen:  # tied weights (lm_head = embed_tokens): the engine ties them itself
                continue
            seen.add(id(p))
            if isinstance(p, nn.Parameter) or n.endswith("weight") or n.endswith("bias"):
                out[key] = p.detach()
        out = {k: v for k, v in out.items() if "rotary_emb" not in k}  # computed buffers, not checkpoint tensors
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def export_folder(model: nn.Module, tokenizer, folder: str | Path, dtype: str = "float32") -> Path:
    """Write a Hugging Face folder an engine can load: ``config.json`` (architecture of the base model, ``dtype``),
    ``model.safetensors`` (the current weights, LoRA merged), ``generation_config.json`` and the tokenizer files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = _base(model)
    torch_dtype = getattr(torch, dtype)
    save_file(engine_weights(model, only_trainable=False, dtype=torch_dtype), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = base.config.to_dict()
    config["torch_dtype"] = config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_weights(weights: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``weights`` to one safetensors file (atomically: a reader sees the old file or the new one)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path
