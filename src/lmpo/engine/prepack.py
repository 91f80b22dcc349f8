"""Decode-time linear layers through oneDNN with weights pre-packed for the batch (CPU, float32; opt-in).

A KV-cached decode step multiplies a few rows by every weight of the model; MKL's general matrix multiply passes the
weights well below the memory-read bandwidth (`benchmarks/levers.py decode_matmul`). oneDNN with the weights packed
once per generation for the batch's row count (the layout PyTorch's Inductor uses for frozen CPU models) makes each
decode step cheaper (`benchmarks/levers.py decode_prepacked`), but packing all weights has to be redone after every
weight update, and in the training loop with short replies that cost ate the per-step saving: generation was not
faster. Hence off by default (``rollout.prepack: true`` or ``auto`` to use it; it can pay for long replies, not
measured). The products round differently from MKL's (logits differ at float-rounding level), so sampled streams
are not bit-identical to the unpacked path. Figures: docs/results/performance.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lmpo.engine.kernels.rowdot import float32_cpu_linears, large_model

def prepack_available() -> bool:
    """Whether this torch build has the oneDNN packed-linear operators."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def should_prepack(model: nn.Module, mode: str | bool, autocast: str | None) -> bool:
    """``mode``: ``"auto"`` (float32 CPU models of 10M+ parameters, :func:`lmpo.engine.kernels.rowdot.large_model`, no
    autocast), ``True`` (wherever the operators exist and the weights are float32 on the CPU) or ``False``."""
    if mode is False or autocast or not prepack_available() or not float32_cpu_linears(model):
        return False
    return mode is True or large_model(model)


@contextlib.contextmanager
def prepacked_linears(model: nn.Module, rows: int) -> Iterator[None]:
    """Inside, every ``nn.Linear`` of ``model`` (including peft's base layers) computes through oneDNN with its
    current weight packed for ``rows`` input rows; on exit the modules are as before. No-grad use only."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    try:
        for m in linears:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)

            def forward(x, m=m, packed=packed):
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, m.bias, "none", [], "")
                return y.reshape(*x.shape[:-1], y.shape[-1])

            m.forward = forward
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
