"""One policy update: log-prob passes, the loss of each micro-batch, gradient accumulation and the optimizer step.

The loss of a mini-batch is ``aggregator(per_token, mask, normaliser)`` summed over its micro-batches, where the
normaliser is computed once on the whole mini-batch, so any micro-batch split gives the same gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ModelError, TrainingDiverged
from lmpo.models.logprobs import (DEFAULT_CHUNK_SIZE, LayerNoise, layer_noise, response_logprobs,
                                  split_body_and_head)
from lmpo.models.packed import packed_unsupported
from lmpo.models.token_stats import STAT_NEEDS, has_soft_inputs, response_stats
from lmpo.train.inbackward import BackwardAdamW


@dataclass
class PolicyRunner:
    """How to run the policy: the model plus the numerics shared by every log-prob pass."""

    model: torch.nn.Module
    temperature: float = 1.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    autocast: str | None = None
    packed: bool = True  # Llama-family forward via lmpo.models.packed where it applies
    recompute: str | None = None  # what the packed forward recomputes in backward; None: "layers" under checkpointing
    # Opt-in forward hooks, set only on the per-loss copy made by ``for_loss`` (the default runner has none).
    noise: LayerNoise | None = None
    noise_seeds: Tensor | None = None
    keep_hidden: bool = False
    captured: dict[str, Tensor] = field(default_factory=dict)

    def autocast_ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=getattr(torch, self.autocast))

    def logprobs(self, batch: RolloutBatch, with_entropy: bool = False, entropy_grad: bool = True,
                 ) -> tuple[Tensor, Tensor | None]:
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        if has_soft_inputs(batch.extras):  # soft-thinking rollouts: every pass feeds the same embedding mixtures
            return self.logprobs_stats(batch, with_entropy)[:2]
        with self.autocast_ctx(), layer_noise(self.model, self.noise, self.noise_seeds):
            out = response_logprobs(
                self.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, attn,
                temperature=self.temperature, chunk_size=self.chunk_size, with_entropy=with_entropy,
                return_hidden=self.keep_hidden, entropy_grad=entropy_grad, packed=self.packed,
                recompute=self.recompute,
            )
        if self.keep_hidden:
            self.captured["hidden"] = out[2]
        return out[0], out[1]

    def packed_applies(self) -> bool:
        """Whether the log-prob passes run through :mod:`lmpo.models.packed` (every weight used once per pass)."""
        if not self.packed:
            return False
        with self.autocast_ctx():  # what the passes will see, autocast included (packed_unsupported decides)
            return packed_unsupported(split_body_and_head(self.model)[0], 0) == ""

    def for_loss(self, batch: RolloutBatch, needs: frozenset[str], loss_fn) -> "PolicyRunner":
        """This runner, or a copy with the forward hooks the loss declared in ``needs`` (see ``HOOK_NEEDS``)."""
        if not HOOK_NEEDS & needs:
            return self
        noise = loss_fn.layer_noise() if "layer_noise" in needs else None
        return dataclasses.replace(self, noise=noise, noise_seeds=batch.extras.get("noise_seed") if noise else None,
                                   keep_hidden="hidden_states" in needs, captured={})

    @torch.no_grad()
    def logprobs_nograd(self, batch: RolloutBatch, micro_batch_size: int | None) -> Tensor:
        return self.logprobs_entropy_nograd(batch, micro_batch_size)[0]

    @torch.no_grad()
    def logprobs_entropy_nograd(self, batch: RolloutBatch, micro_batch_size: int | None, with_entropy: bool = False,
                                ) -> tuple[Tensor, Tensor | None]:
        """Log-probs (and entropies) of the whole batch in one no-grad pass, ``micro_batch_size`` rows at a time."""
        parts = batch.split(max(1, -(-batch.batch_size // micro_batch_size))) if micro_batch_size else [batch]
        outs = [self.logprobs(p, with_entropy=with_entropy) for p in parts]
        return torch.cat([o[0] for o in outs], 0), torch.cat([o[1] for o in outs], 0) if with_entropy else None

    def logprobs_stats(self, batch: RolloutBatch, with_entropy: bool = False, stats: frozenset[str] = frozenset(),
                       ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Log-probs plus opt-in full-distribution statistics (:mod:`lmpo.models.token_stats`), chunked."""
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        with self.autocast_ctx():
            return response_stats(self.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, attn,
                                  batch.extras, temperature=self.temperature, chunk_size=self.chunk_size,
                                  with_entropy=with_entropy, stats=frozenset(stats))

    @torch.no_grad()
    def old_stats_nograd(self, batch: RolloutBatch, micro_batch_size: int | None, stats: frozenset[str],
                         ) -> dict[str, Tensor]:
        """``{"old_<stat>": (B, T[, M])}`` under the current (pre-update) weights."""
        parts = batch.split(max(1, -(-batch.batch_size // micro_batch_size))) if micro_batch_size else [batch]
        outs = [self.logprobs_stats(p, stats=stats)[2] for p in parts]
        return {f"old_{k}": torch.cat([o[k] for o in outs], 0) for k in outs[0]}


HOOK_NEEDS = frozenset({"hidden_states", "current_entropy", "layer_noise"})
"""Opt-in ``needs`` of a policy loss served by the training forward pass itself (never a second pass):
``hidden_states`` -> ``extras["hidden"]`` (B, T, H), the LM-head inputs, with gradient; ``current_entropy`` ->
``extras["current_entropy"]`` (B, T), the entropy of the policy being optimised, with gradient; ``layer_noise`` ->
the loss's ``layer_noise()`` (a :class:`LayerNoise`) perturbs the decoder layers' inputs during that pass, seeded
per row by ``extras["noise_seed"]`` (drawn once per step by ``policy_update`` when absent)."""


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
    needs = getattr(loss_fn, "needs", frozenset())
    runner = runner.for_loss(mb, needs, loss_fn)
    stats = STAT_NEEDS & getattr(loss_fn, "needs", frozenset())
    if stats:  # opt-in full-distribution statistics; old_<stat> defaults to the detached current one (on-policy)
        lp, ent, extra = runner.logprobs_stats(mb, True, stats)
        extra.update({f"old_{k}": v.detach() for k, v in extra.items() if f"old_{k}" not in mb.extras})
        mb = mb.replace(extras={**mb.extras, **extra})
    else:
        # the entropy is always reported; it needs a gradient only for an entropy bonus or a loss that uses it
        lp, ent = runner.logprobs(mb, with_entropy=True,
                                  entropy_grad=bool(s.entropy_coef) or "current_entropy" in needs)
    if HOOK_NEEDS & needs:  # the same forward's LM-head inputs / entropy, with gradient
        got = {"hidden": runner.captured.get("hidden") if "hidden_states" in needs else None,
               "current_entropy": ent if "current_entropy" in needs else None}
        if "hidden_states" in needs and got["hidden"] is None:
            raise ModelError("hidden_states were requested but this forward path (soft inputs) does not return them.")
        mb = mb.replace(extras={**mb.extras, **{k: v for k, v in got.items() if v is not None}})
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


def weights_finite(params: list[Tensor]) -> bool:
    """True unless some weight is NaN or infinite: one summing pass per tensor (a NaN or inf anywhere makes its sum
    non-finite; a finite sum can overflow only for weights near 1e32, diverged anyway), about 15x cheaper than an
    element-wise ``isfinite`` over the 135M weights of the default model."""
    return bool(torch.isfinite(torch.stack([p.detach().sum() for p in params])).all()) if params else True


def minibatch_indices(group_ids: Tensor, n_mb: int) -> list[Tensor]:
    """Row indices of ``n_mb`` shuffled mini-batches that never split a prompt group.

    Group-relative losses (REAL, DisCO, VCPO, ...) compare the responses of one prompt, so a group must sit in one
    mini-batch. Whole groups are shuffled and dealt out; with fewer groups than mini-batches (or one mini-batch),
    rows are split as they are.
    """
    B = group_ids.numel()
    if n_mb <= 1:
        return [torch.arange(B)]
    groups = torch.unique(group_ids)
    if groups.numel() < n_mb:
        return list(torch.randperm(B).tensor_split(n_mb))
    order = groups[torch.randperm(groups.numel())]
    return [torch.cat([torch.nonzero(group_ids == g).flatten() for g in chunk]) for chunk in order.tensor_split(n_mb)]


def policy_update(runner: PolicyRunner, optimizer, scheduler, batch: RolloutBatch, loss_fn, aggregator,
                  s: UpdateSettings, step: int, inb: BackwardAdamW | None = None) -> dict[str, Tensor]:
    """PPO-style epochs x mini-batches x micro-batches over ``batch``; returns averaged detached metrics.

    ``inb`` (a :class:`BackwardAdamW` over ``optimizer``, kept across steps): mini-batches that fit one micro-batch
    fold the optimizer into their backward instead of holding every gradient (``train.optimizer_in_backward``)."""
    model = runner.model
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, Tensor] = {}
    count = 0
    B = batch.batch_size
    n_mb = min(s.num_minibatches, B)
    replays = inb.replays if inb is not None else 0
    if "layer_noise" in getattr(loss_fn, "needs", frozenset()) and "noise_seed" not in batch.extras:
        batch = batch.replace(extras={**batch.extras, "noise_seed": torch.randint(0, 2**62, (B,))})  # one per row
    for _ in range(s.ppo_epochs):
        for mb_idx in minibatch_indices(batch.group_ids, n_mb):
            mb = batch.select(mb_idx)
            normaliser = aggregator.normaliser(mb.response_mask, s.horizon)
            n_micro = max(1, -(-mb.batch_size // s.micro_batch_size)) if s.micro_batch_size else 1
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros(())
            in_backward = inb is not None and n_micro == 1  # the whole gradient comes from one backward
            for micro in mb.split(n_micro):
                loss, metrics = minibatch_loss(runner, micro, loss_fn, aggregator, s, normaliser)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"The loss became {loss.item()} at step {step}; no update was applied. The last good "
                        "checkpoint is kept. Lower train.learning_rate, set train.max_grad_norm, or check the "
                        "reward functions for extreme values, then resume with --resume."
                    )
                if in_backward:
                    grad_norm = inb.backward(loss, s.max_grad_norm)
                else:
                    loss.backward()
                total = total + loss.detach()
                del loss  # frees the graph (kept for a possible second pass in backward mode)
                w = micro.batch_size / mb.batch_size
                for k, v in metrics.items():
                    sums[k] = sums.get(k, torch.zeros(())) + w * v.float()
            if not in_backward:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm else float("inf"))
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(
                    f"The gradient norm became {grad_norm.item()} at step {step}; no update was applied. The last "
                    "good checkpoint is kept. Lower train.learning_rate or enable autocast-free float32, then resume."
                )
            # Optional loss hooks (stateful losses): ``lr_scale()`` scales this step's learning rate (VCPO's ESS rule);
            # ``after_optimizer_step()`` runs once per optimizer step (R2VPO's dual ascent), never per micro-batch.
            lr_scale = loss_fn.lr_scale() if hasattr(loss_fn, "lr_scale") else None
            base_lrs = [g["lr"] for g in optimizer.param_groups]
            if lr_scale is not None:
                for g in optimizer.param_groups:
                    g["lr"] = g["lr"] * float(lr_scale)
                sums["loss/lr_scale"] = sums.get("loss/lr_scale", torch.zeros(())) + float(lr_scale)
            inb.step() if in_backward else optimizer.step()
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr
            if hasattr(loss_fn, "after_optimizer_step"):
                loss_fn.after_optimizer_step()
            if not weights_finite(params):
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
    if inb is not None:  # backward passes repeated because the clip factor changed (lmpo.train.inbackward)
        out["perf/backward_replays"] = torch.tensor(float(inb.replays - replays))
    return out
