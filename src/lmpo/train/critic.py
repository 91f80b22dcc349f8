"""The critic (value model) of PPO with a learned baseline, built by the trainer when a component needs ``values``.

    prepare: V_old = critic(batch) (no gradient) -> extras["values"] -> advantages -> targets R = value_targets(batch)
    update:  each micro-batch adds the clipped value loss 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2), a token
             mean over the mini-batch (verl's ``compute_value_loss``, TRL's PPOTrainer); the critic's own AdamW
             steps after the policy's, once per mini-batch.

``critic.model: shared`` (TRL's value head on the policy, ``AutoModelForCausalLMWithValueHead``): a linear head on
the policy's last hidden state, the LM-head input that predicts token t, i.e. the state before token t (the
positions verl's critic reads). The value loss, times ``vf_coef``, joins the policy's loss, so the trunk (its LoRA
adapters, or all weights) learns from it through the policy's optimizer, and the head through the critic's.
``critic.model: separate`` (verl's critic worker): a copy of the policy model at the start (same LoRA or full
setting) plus a head, with its own forward, backward and optimizer; the policy's loss never sees the value loss.

The head starts at zero (V = 0 at the first step, and no random numbers are drawn, so a run with a critic draws the
same numbers as before for everything else). Its state (head, a separate model's trainable weights, the AdamW state)
travels in every checkpoint under ``critic`` and is restored on ``--resume``.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.models.logprobs import split_body_and_head
from lmpo.train.step import PolicyRunner


class Critic:
    def __init__(self, policy: nn.Module, runner: PolicyRunner, shared: bool = True, vf_coef: float = 0.1,
                 cliprange_value: float | None = 0.2, learning_rate: float = 1e-5, betas=(0.9, 0.999),
                 weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> None:
        self.shared, self.vf_coef, self.cliprange_value, self.max_grad_norm = shared, vf_coef, cliprange_value, \
            max_grad_norm
        hidden = split_body_and_head(policy)[1].in_features
        self.head = nn.Linear(hidden, 1, device=next(policy.parameters()).device)  # beside the policy (cfg.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.model = None if shared else copy.deepcopy(policy)
        self.runner = runner if shared else dataclasses.replace(runner, model=self.model)
        params = list(self.head.parameters())
        if self.model is not None:
            params += [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=tuple(betas), weight_decay=weight_decay)

    # ------------------------------------------------------------------ values
    def values(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """V(s_t) (B, T) from the LM-head inputs (B, T, H), float32, 0 off ``mask``."""
        return ops.zero_outside(self.head(hidden.float()).squeeze(-1), mask)

    @torch.no_grad()
    def values_nograd(self, batch: RolloutBatch, micro_batch_size: int | None) -> Tensor:
        """The pre-update critic's values of the whole batch, ``micro_batch_size`` rows at a time."""
        parts = batch.split(max(1, -(-batch.batch_size // micro_batch_size))) if micro_batch_size else [batch]
        device = self.head.weight.device  # the masks go to the pass's device; the values come back to the batch's
        return torch.cat([self.values(self.runner.forward(p, hidden=True)[2], p.response_mask.to(device))
                          for p in parts], 0).to(batch.response_mask.device)

    # ------------------------------------------------------------------ loss and update
    def loss(self, values: Tensor, mb: RolloutBatch, n_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped value loss of a micro-batch, summed over its tokens and divided by the mini-batch's token count
        ``n_tokens`` (so micro-batches add up to the mini-batch's token mean); and its metrics."""
        if "values" not in mb.extras or "returns" not in mb.extras:
            raise DataError("the critic's loss needs extras['values'] and extras['returns'] (set when the batch is "
                            "prepared); the batch carries neither.")
        mask = mb.response_mask
        per_token, clipped = ops.clipped_value_loss(values, mb.extras["values"], mb.extras["returns"],
                                                    self.cliprange_value)
        loss = ops.masked_sum(per_token, mask) / n_tokens
        return loss, {"critic/value_loss": ops.masked_mean(per_token, mask).detach(),
                      "critic/vf_clipfrac": ops.masked_mean(clipped.float(), mask)}

    def shared_loss(self, hidden: Tensor, mb: RolloutBatch, n_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``vf_coef`` x the value loss from the policy forward's LM-head inputs (added to the policy's loss)."""
        loss, metrics = self.loss(self.values(hidden, mb.response_mask), mb, n_tokens)
        return self.vf_coef * loss, metrics

    def separate_backward(self, mb: RolloutBatch, n_tokens: Tensor) -> dict[str, Tensor]:
        """The separate critic's own forward and backward on one micro-batch."""
        hidden = self.runner.forward(mb, hidden=True)[2]
        loss, metrics = self.loss(self.values(hidden, mb.response_mask), mb, n_tokens)
        loss.backward()
        return metrics

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> Tensor:
        """Clip the critic's gradient and take its AdamW step; returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.zero_grad()
        return norm.detach()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        state = {"head": {k: v.detach().clone() for k, v in self.head.state_dict().items()},
                 "optimizer": copy.deepcopy(self.optimizer.state_dict())}
        if self.model is not None:
            state["model"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return state

    def load_state_dict(self, state: dict) -> None:
        expected = {"head", "optimizer"} | ({"model"} if self.model is not None else set())
        if set(state) != expected:
            raise DataError(f"Critic.load_state_dict: the saved state has keys {sorted(state)}, expected "
                            f"{sorted(expected)} (a checkpoint of a run with another critic.model?).")
        self.head.load_state_dict(state["head"])
        if self.model is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, v in state["model"].items():
                    params[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])


def build_critic(cfg, model: nn.Module, runner: PolicyRunner) -> Critic:
    """The critic of a config (its ``critic`` and ``train`` sections) for the policy ``model``."""
    c, t = cfg.critic, cfg.train
    return Critic(model, runner, shared=c.model == "shared", vf_coef=c.vf_coef, cliprange_value=c.cliprange_value,
                  learning_rate=c.learning_rate or t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                  weight_decay=t.weight_decay, max_grad_norm=c.max_grad_norm)
