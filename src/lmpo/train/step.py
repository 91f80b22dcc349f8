"""One policy update: log-prob passes, the loss of each micro-batch, gradient accumulation and the optimizer step.

The loss of a mini-batch is ``aggregator(per_token, mask, normaliser)`` summed over its micro-batches, where the
normaliser is computed once on the whole mini-batch, so any micro-batch split gives the same gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import TrainingDiverged
from lmpo.models.logprobs import response_logprobs


@dataclass
class PolicyRunner:
    """How to run the policy: the model plus the numerics shared by every log-prob pass."""

    model: torch.nn.Module
    temperature: float = 1.0
    chunk_size: int = 1024
    autocast: str | None = None

    def autocast_ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=getattr(torch, self.autocast))

    def logprobs(self, batch: RolloutBatch, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        with self.autocast_ctx():
            return response_logprobs(
                self.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, attn,
                temperature=self.temperature, chunk_size=self.chunk_size, with_entropy=with_entropy,
            )

    @torch.no_grad()
    def logprobs_nograd(self, batch: RolloutBatch, micro_batch_size: int | None) -> Tensor:
        parts = batch.split(max(1, -(-batch.batch_size // micro_batch_size))) if micro_batch_size else [batch]
        return torch.cat([self.logprobs(p)[0] for p in parts], 0)


@dataclass
class UpdateSettings:
    ppo_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int | None = None
    max_grad_norm: float | None = 1.0
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    kl_in_loss: bool = True
    entropy_coef: float = 0.0
    horizon: int = 64


def minibatch_loss(runner: PolicyRunner, mb: RolloutBatch, loss_fn, aggregator, s: UpdateSettings, normaliser: Tensor,
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, already divided by the mini-batch normaliser (ready for ``backward``)."""
    lp, ent = runner.logprobs(mb, with_entropy=True)
    if mb.old_logprobs is None:  # on-policy single update: pi_old = pi, no separate pass needed
        mb = mb.replace(old_logprobs=lp.detach())
    out = loss_fn(lp, mb)
    per_token = out.per_token
    mask = mb.response_mask
    metrics = dict(out.metrics)
    if s.kl_beta > 0 and s.kl_in_loss:
        kl = ops.kl_estimate(lp, mb.ref_logprobs, s.kl_estimator)
        per_token = per_token + s.kl_beta * kl
        metrics["loss/kl"] = ops.masked_mean(kl, mask).detach()
    elif mb.ref_logprobs is not None:
        metrics["loss/kl"] = ops.masked_mean(ops.kl_estimate(lp.detach(), mb.ref_logprobs, s.kl_estimator), mask)
    if s.entropy_coef:
        per_token = per_token - s.entropy_coef * ent
    metrics["loss/entropy"] = ops.masked_mean(ent.detach(), mask)
    loss = aggregator(per_token, mask, normaliser)
    return loss, metrics


def policy_update(runner: PolicyRunner, optimizer, scheduler, batch: RolloutBatch, loss_fn, aggregator,
                  s: UpdateSettings, step: int) -> dict[str, Tensor]:
    """PPO-style epochs x mini-batches x micro-batches over ``batch``; returns averaged detached metrics."""
    model = runner.model
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, Tensor] = {}
    count = 0
    B = batch.batch_size
    n_mb = min(s.num_minibatches, B)
    for _ in range(s.ppo_epochs):
        order = torch.randperm(B) if n_mb > 1 else torch.arange(B)
        for mb_idx in order.tensor_split(n_mb):
            mb = batch.select(mb_idx)
            normaliser = aggregator.normaliser(mb.response_mask, s.horizon)
            n_micro = max(1, -(-mb.batch_size // s.micro_batch_size)) if s.micro_batch_size else 1
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros(())
            for micro in mb.split(n_micro):
                loss, metrics = minibatch_loss(runner, micro, loss_fn, aggregator, s, normaliser)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"The loss became {loss.item()} at step {step}; no update was applied. The last good "
                        "checkpoint is kept. Lower train.learning_rate, set train.max_grad_norm, or check the "
                        "reward functions for extreme values, then resume with --resume."
                    )
                loss.backward()
                total = total + loss.detach()
                w = micro.batch_size / mb.batch_size
                for k, v in metrics.items():
                    sums[k] = sums.get(k, torch.zeros(())) + w * v.float()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm else float("inf"))
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(
                    f"The gradient norm became {grad_norm.item()} at step {step}; no update was applied. The last "
                    "good checkpoint is kept. Lower train.learning_rate or enable autocast-free float32, then resume."
                )
            optimizer.step()
            if not all(torch.isfinite(p).all() for p in params):
                raise TrainingDiverged(
                    f"The weights became non-finite after the optimizer step of step {step} (learning rate "
                    f"{scheduler.get_last_lr()[0]:g}); this step is not saved. Lower train.learning_rate, then resume."
                )
            scheduler.step()
            sums["loss/total"] = sums.get("loss/total", torch.zeros(())) + total
            sums["loss/grad_norm"] = sums.get("loss/grad_norm", torch.zeros(())) + grad_norm.detach()
            count += 1
    optimizer.zero_grad(set_to_none=True)
    out = {k: v / count for k, v in sums.items()}
    out["loss/lr"] = torch.tensor(scheduler.get_last_lr()[0])
    return out
