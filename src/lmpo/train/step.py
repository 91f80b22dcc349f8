"""One policy update: log-prob passes, the loss of each micro-batch, gradient accumulation and the optimizer step.

The loss of a mini-batch is ``aggregator(per_token, mask, normaliser)`` summed over its micro-batches, where the
normaliser is computed once on the whole mini-batch, so any micro-batch split gives the same gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError, ModelError, TrainingDiverged
from lmpo.models.logprobs import DEFAULT_CHUNK_SIZE, LayerNoise, response_logprobs, split_body_and_head
from lmpo.engine.device import batch_to_device, host_to_device
from lmpo.engine.packed import packed_unsupported
from lmpo.models.token_stats import STAT_NEEDS, has_soft_inputs, response_stats
from lmpo.pipeline import KLPenalty, needs_of, require
from lmpo.engine.optim import TrainOptimizer


@dataclass
class PolicyRunner:
    """How to run the policy: the model plus the numerics shared by every log-prob pass."""

    model: torch.nn.Module
    temperature: float = 1.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    autocast: str | None = None
    packed: bool = True  # Llama-family forward via lmpo.engine.packed where it applies
    recompute: str | None = None  # what the packed forward recomputes in backward; None: "layers" under checkpointing
    # Layer noise of the training forward, set only on the per-loss copy made by ``for_loss`` (the default runner
    # has none): a LayerNoise and one seed per row.
    noise: LayerNoise | None = None
    noise_seeds: Tensor | None = None
    # ``train_call(fn, *args)`` runs ``fn(model, *args)`` for the passes that take gradient (set under several
    # ranks: through DDP, lmpo.train.dist); no-grad passes always call the model directly
    train_call: Callable[..., Any] | None = None

    def _run(self, fn, *args, **kwargs):
        if self.train_call is not None and torch.is_grad_enabled():
            return self.train_call(fn, *args, **kwargs)
        return fn(self.model, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Where the policy's weights are (``cfg.device``); batches stay on the host and move here per pass."""
        return next(self.model.parameters()).device

    def autocast_ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.autocast))

    def forward(self, batch: RolloutBatch, with_entropy: bool = False, entropy_grad: bool = True,
                hidden: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(logprobs, entropies or None, LM-head inputs or None)`` of the responses, from one forward pass."""
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        if has_soft_inputs(batch.extras):  # soft-thinking rollouts: every pass feeds the same embedding mixtures
            if hidden:
                raise ModelError("hidden_states were requested but the soft-input forward does not return them.")
            return (*self.logprobs_stats(batch, with_entropy)[:2], None)
        with self.autocast_ctx():
            out = self._run(
                response_logprobs, batch.prompt_ids, batch.prompt_mask, batch.response_ids, attn,
                temperature=self.temperature, chunk_size=self.chunk_size, with_entropy=with_entropy,
                return_hidden=hidden, entropy_grad=entropy_grad, packed=self.packed, recompute=self.recompute,
                noise=self.noise, noise_seeds=self.noise_seeds,
            )
        return out[0], out[1], out[2] if hidden else None

    def logprobs(self, batch: RolloutBatch, with_entropy: bool = False, entropy_grad: bool = True,
                 ) -> tuple[Tensor, Tensor | None]:
        return self.forward(batch, with_entropy, entropy_grad)[:2]

    def packed_applies(self) -> bool:
        """Whether the log-prob passes run through :mod:`lmpo.engine.packed` (every weight used once per pass)."""
        if not self.packed:
            return False
        with self.autocast_ctx():  # what the passes will see, autocast included (packed_unsupported decides)
            return packed_unsupported(split_body_and_head(self.model)[0], 0) == ""

    def for_loss(self, batch: RolloutBatch, needs: frozenset[str], loss_fn) -> "PolicyRunner":
        """This runner, or a copy whose training forward perturbs the layers as the loss asks (``layer_noise``)."""
        if "layer_noise" not in needs:
            return self
        return dataclasses.replace(self, noise=loss_fn.layer_noise(), noise_seeds=batch.extras.get("noise_seed"))

    @torch.no_grad()
    def logprobs_nograd(self, batch: RolloutBatch, micro_batch_size: int | None) -> Tensor:
        return self.logprobs_entropy_nograd(batch, micro_batch_size)[0]

    @torch.no_grad()
    def logprobs_entropy_nograd(self, batch: RolloutBatch, micro_batch_size: int | None, with_entropy: bool = False,
                                ) -> tuple[Tensor, Tensor | None]:
        """Log-probs (and entropies) of the whole batch in one no-grad pass, ``micro_batch_size`` rows at a time."""
        parts = batch.split(max(1, -(-batch.batch_size // micro_batch_size))) if micro_batch_size else [batch]
        outs = [self.logprobs(p, with_entropy=with_entropy) for p in parts]
        home = batch.response_ids.device  # results come back where the batch lives (the host on a CUDA run)
        return (torch.cat([o[0] for o in outs], 0).to(home),
                torch.cat([o[1] for o in outs], 0).to(home) if with_entropy else None)

    def logprobs_stats(self, batch: RolloutBatch, with_entropy: bool = False, stats: frozenset[str] = frozenset(),
                       ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Log-probs plus opt-in full-distribution statistics (:mod:`lmpo.models.token_stats`), chunked."""
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        with self.autocast_ctx():
            return self._run(response_stats, batch.prompt_ids, batch.prompt_mask, batch.response_ids, attn,
                                  batch.extras, temperature=self.temperature, chunk_size=self.chunk_size,
                                  with_entropy=with_entropy, stats=frozenset(stats))

    @torch.no_grad()
    def old_stats_nograd(self, batch: RolloutBatch, micro_batch_size: int | None, stats: frozenset[str],
                         ) -> dict[str, Tensor]:
        """``{"old_<stat>": (B, T[, M])}`` under the current (pre-update) weights."""
        parts = batch.split(max(1, -(-batch.batch_size // micro_batch_size))) if micro_batch_size else [batch]
        outs = [self.logprobs_stats(p, stats=stats)[2] for p in parts]
        home = batch.response_ids.device
        return {f"old_{k}": torch.cat([o[k] for o in outs], 0).to(home) for k in outs[0]}


@dataclass
class UpdateSettings:
    ppo_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int | None = None
    kl: KLPenalty | None = None  # the pipeline's KL penalty (added to the loss unless it is in the rewards)
    entropy_coef: float = 0.0
    horizon: int = 64
    critic: Any = None  # lmpo.train.critic.Critic when a component needs values
    dist: Any = None  # lmpo.train.dist.DistRun under several ranks: global normaliser, gradient sync

    @property
    def on_policy(self) -> bool:
        """One optimizer step per batch: the update's forward runs under the weights that collected it."""
        return self.ppo_epochs == 1 and self.num_minibatches == 1


def minibatch_loss(runner: PolicyRunner, mb: RolloutBatch, loss_fn, aggregator, s: UpdateSettings, normaliser: Tensor,
                   value_norm: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, already divided by the mini-batch normaliser (ready for ``backward``); with a shared
    critic, plus ``vf_coef`` x its value loss (divided by ``value_norm``, the mini-batch's token count)."""
    needs = needs_of(loss_fn)
    shared_critic = s.critic is not None and s.critic.shared
    hidden = None
    runner = runner.for_loss(mb, needs, loss_fn)
    stats = STAT_NEEDS & needs
    if stats:  # opt-in full-distribution statistics, and pi_old's: this forward's, detached, when on-policy
        lp, ent, extra = runner.logprobs_stats(mb, True, stats)
        missing = [f"old_{k}" for k in extra if f"old_{k}" not in mb.extras]
        if missing and not s.on_policy:
            raise DataError(f'loss "{type(loss_fn).__name__}" needs {", ".join(missing)} (pi_old\'s statistics) under '
                            "several optimizer steps per batch, but the batch does not carry them.")
        extra.update({k: extra[k[4:]].detach() for k in missing})
        mb = mb.replace(extras={**mb.extras, **extra})
    else:
        # the entropy is always reported; it needs a gradient only for an entropy bonus or a loss that uses it
        lp, ent, hidden = runner.forward(mb, with_entropy=True, hidden="hidden_states" in needs or shared_critic,
                                         entropy_grad=bool(s.entropy_coef) or "current_entropy" in needs)
        if hidden is not None and "hidden_states" in needs:  # the same forward's LM-head inputs, with gradient
            mb = mb.replace(extras={**mb.extras, "hidden": hidden})
    if "hidden_states" in needs and "hidden" not in mb.extras:
        raise ModelError("hidden_states were requested but this forward path (full-distribution statistics) does not "
                         "return them.")
    if "current_entropy" in needs:  # the entropy of the policy being optimised, with gradient
        mb = mb.replace(extras={**mb.extras, "current_entropy": ent})
    if "old_logprobs" in needs and mb.old_logprobs is None and s.on_policy:  # pi_old = the policy of this forward
        mb = mb.replace(old_logprobs=lp.detach())
    require(mb, loss_fn, "loss")
    out = loss_fn(lp, mb)
    per_token = out.per_token
    mask = mb.response_mask
    metrics = dict(out.metrics)
    if s.kl is not None and not s.kl.in_reward:
        kl = s.kl.loss_term(lp, mb.ref_logprobs)
        per_token = per_token + s.kl.beta * kl
        metrics["loss/kl"] = ops.masked_mean(kl, mask).detach()
    elif mb.ref_logprobs is not None:  # reported; in the rewards (kl.mode=reward) or asked for by a component
        estimator, clamp = (s.kl.estimator, s.kl.k3_clamp) if s.kl is not None else ("k3", None)
        metrics["loss/kl"] = ops.masked_mean(ops.kl_estimate(lp.detach(), mb.ref_logprobs, estimator, clamp), mask)
    if s.entropy_coef:
        per_token = per_token - s.entropy_coef * ent
    metrics["loss/entropy"] = ops.masked_mean(ent.detach(), mask)
    loss = aggregator(per_token, mask, normaliser)
    if shared_critic:  # the value head on this forward's LM-head inputs
        if hidden is None:
            raise ModelError("critic.model=shared reads the policy forward's hidden states, which this forward path "
                             "(full-distribution statistics) does not return; set critic.model=separate.")
        vloss, vmetrics = s.critic.shared_loss(hidden, mb, value_norm)
        loss = loss + vloss
        metrics.update(vmetrics)
    return loss, metrics


def weights_finite(params: list[Tensor]) -> bool:
    """True unless some weight is NaN or infinite: one summing pass per tensor (a NaN or inf anywhere makes its sum
    non-finite; a finite sum can overflow only for weights near 1e32, diverged anyway), far cheaper than an
    element-wise ``isfinite`` over every weight, which writes a boolean per weight (docs/results/performance.md)."""
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


def policy_update(runner: PolicyRunner, opt: TrainOptimizer, batch: RolloutBatch, loss_fn, aggregator, s: UpdateSettings,
                  step: int, lr_scale: Callable[[], float] | None = None,
                  after_step: Sequence[Callable[[], None]] = ()) -> dict[str, Tensor]:
    """PPO-style epochs x mini-batches x micro-batches over ``batch``; returns averaged detached metrics.

    ``opt`` is the trainer's optimizer (:mod:`lmpo.engine.optim`); ``lr_scale`` and ``after_step`` are the pipeline's
    ``lr_scale`` and ``after_optimizer_step`` extension points (asked / run once per optimizer step)."""
    params = opt.params
    sums: dict[str, Tensor] = {}
    count = 0
    B = batch.batch_size
    n_mb = min(s.num_minibatches, B)
    replays = opt.replays

    def add(key: str, value) -> None:
        sums[key] = sums.get(key, torch.zeros(())) + value

    if "layer_noise" in needs_of(loss_fn) and "noise_seed" not in batch.extras:
        batch = batch.replace(extras={**batch.extras, "noise_seed": torch.randint(0, 2**62, (B,))})  # one per row
    for _ in range(s.ppo_epochs):
        for mb_idx in minibatch_indices(batch.group_ids, n_mb):
            mb = batch.select(mb_idx)
            normaliser = (aggregator.normaliser(mb.response_mask, s.horizon) if s.dist is None else
                          s.dist.global_normaliser(aggregator, mb.response_mask, s.horizon))  # every rank's rows
            n_micro = max(1, -(-mb.batch_size // s.micro_batch_size)) if s.micro_batch_size else 1
            opt.zero_grad()
            value_norm = None
            if s.critic is not None:
                s.critic.zero_grad()
                value_norm = mb.response_mask.sum().clamp_min(1).float()  # the value loss: a token mean per mini-batch
            total = torch.zeros(())
            device = runner.device
            normaliser = host_to_device(normaliser, device) if isinstance(normaliser, Tensor) else normaliser
            value_norm = host_to_device(value_norm, device) if value_norm is not None else None
            micros = mb.split(n_micro)
            for i, micro in enumerate(micros):
                micro = batch_to_device(micro, device)  # host -> device (pinned, asynchronous on CUDA; CPU: as is)
                with s.dist.accumulate(last=i == len(micros) - 1) if s.dist is not None else contextlib.nullcontext():
                    loss, metrics = minibatch_loss(runner, micro, loss_fn, aggregator, s, normaliser, value_norm)
                    if s.critic is not None and not s.critic.shared:
                        metrics.update(s.critic.separate_backward(micro, value_norm))
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"The loss became {loss.item()} at step {step}; no update was applied. The last good "
                            "checkpoint is kept. Lower train.learning_rate, set train.max_grad_norm, or check the "
                            "reward functions for extreme values, then resume with --resume."
                        )
                    opt.backward(loss, whole=n_micro == 1)
                total = total + loss.detach()
                del loss  # frees the graph (kept for a possible second pass when the optimizer is folded in)
                w = micro.batch_size / mb.batch_size
                for k, v in metrics.items():
                    add(k, w * v.float())
            grad_norm = opt.clip()
            if not torch.isfinite(grad_norm):
                opt.zero_grad()
                raise TrainingDiverged(
                    f"The gradient norm became {grad_norm.item()} at step {step}; no update was applied. The last "
                    "good checkpoint is kept. Lower train.learning_rate or enable autocast-free float32, then resume."
                )
            scale = lr_scale() if lr_scale is not None else None
            if scale is not None:
                add("loss/lr_scale", float(scale))
            lr = opt.lr
            opt.step(scale)
            if s.critic is not None:  # the critic's own AdamW, after the policy's
                add("critic/grad_norm", s.critic.step())
            for hook in after_step:
                hook()
            if not weights_finite(params):
                raise TrainingDiverged(
                    f"The weights became non-finite after the optimizer step of step {step} (learning rate "
                    f"{lr:g}); this step is not saved. Lower train.learning_rate, then resume."
                )
            add("loss/total", total)
            add("loss/grad_norm", grad_norm.detach())
            count += 1
    opt.zero_grad()
    out = {k: v / count for k, v in sums.items()}
    out["loss/lr"] = torch.tensor(opt.lr)
    if opt.folded is not None:  # backward passes repeated because the clip factor changed (lmpo.engine.inbackward)
        out["perf/backward_replays"] = torch.tensor(float(opt.replays - replays))
    return out
