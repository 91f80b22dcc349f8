"""Batch preparation: what the update needs beyond the rollouts, in one place and in this order.

    old pass (pi_old log-probs / entropies / full-distribution statistics)  -> reference log-probs
    -> KL penalty in the rewards (kl.mode=reward)  -> advantages  -> token mask (down-sampling)

What is computed follows the pipeline's data plan (:class:`lmpo.pipeline.DataPlan`), derived from the components'
declared ``needs``; nothing is computed that no component reads, and a component never runs without a field it
declared (:func:`lmpo.pipeline.require`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.models.token_stats import STAT_NEEDS
from lmpo.pipeline import Pipeline, require
from lmpo.train.step import PolicyRunner


@dataclass
class ReferencePolicy:
    """pi_ref: a frozen copy of the initial weights, or the LoRA policy with its adapters disabled."""

    runner: PolicyRunner
    context: Callable[[], contextlib.AbstractContextManager] | None = None

    def logprobs(self, batch: RolloutBatch, micro_batch_size: int | None) -> Tensor:
        with self.context() if self.context else contextlib.nullcontext():
            return self.runner.logprobs_nograd(batch, micro_batch_size)


def behaviour_pass(batch: RolloutBatch, p: Pipeline, runner: PolicyRunner, micro_batch_size: int | None,
                   ) -> RolloutBatch:
    """pi_old's fields under the weights of ``runner``, the policy that sampled ``batch``, for a batch trained on
    after later updates (``train.async``'s producer runs it on its snapshot): ``old_logprobs`` whenever a component or
    the KL reward reads them (on-policy too: the update's own forward is no longer the sampling policy), the entropies,
    and the full-distribution statistics as ``old_<stat>``."""
    plan = p.plan
    stats = STAT_NEEDS & p.needs
    if "old_logprobs" in p.needs or plan.old_pass:
        lp, ent = runner.logprobs_entropy_nograd(batch, micro_batch_size, with_entropy=plan.entropy)
        batch = batch.replace(old_logprobs=lp)
        if plan.entropy:
            batch = batch.replace(extras={**batch.extras, "entropy": ent})
    if stats:
        batch = batch.replace(extras={**batch.extras, **runner.old_stats_nograd(batch, micro_batch_size, stats)})
    return batch


def prepare(batch: RolloutBatch, p: Pipeline, runner: PolicyRunner, ref: ReferencePolicy | None,
            micro_batch_size: int | None, critic=None, behaviour: bool = False
            ) -> tuple[RolloutBatch, dict[str, Tensor]]:
    """The training batch with old/ref log-probs, KL rewards, critic values, advantages, critic targets and token
    mask; plus its metrics. ``critic``: the :class:`lmpo.train.critic.Critic` when the plan has values.

    ``behaviour``: the batch already carries pi_old's fields from the policy that sampled it
    (:func:`behaviour_pass`), which is not the trainer's current one (``train.async``): no old pass here, and the
    update reads pi_old from the batch, never from its own forward."""
    plan, metrics = p.plan, {}
    if plan.old_pass and not behaviour:  # one no-grad pass under the pre-update weights: log-probs and entropies
        lp_old, ent = runner.logprobs_entropy_nograd(batch, micro_batch_size, with_entropy=plan.entropy)
        batch = batch.replace(old_logprobs=lp_old)
        if plan.entropy:
            batch = batch.replace(extras={**batch.extras, "entropy": ent})
    if plan.old_stats and not behaviour:  # pi_old's full-distribution statistics (ROVER, OTR, SofT-GRPO) under several steps
        batch = batch.replace(extras={**batch.extras, **runner.old_stats_nograd(batch, micro_batch_size,
                                                                                plan.old_stats)})
    if plan.ref_logprobs:
        batch = batch.replace(ref_logprobs=ref.logprobs(batch, micro_batch_size))
    if p.kl is not None and p.kl.in_reward:
        kl = p.kl.token_rewards(batch)  # added to the token rewards already there (process rewards, a rollout mode's)
        batch = batch.replace(token_rewards=kl if batch.token_rewards is None else batch.token_rewards + kl)
        metrics["reward/kl_penalty"] = ops.masked_sum(kl, batch.response_mask, -1).mean()
    if plan.on_policy and not behaviour:  # the update reads pi_old from its own forward (DataPlan.old_from_forward)
        batch = batch.replace(old_logprobs=None)
    if plan.values:  # the pre-update critic's V(s_t), before the advantages that read them
        batch = batch.replace(extras={**batch.extras, "values": critic.values_nograd(batch, micro_batch_size)})
    require(batch, p.advantage, "advantage")
    batch = batch.replace(advantages=p.advantage(batch))
    if plan.values:  # the critic's regression targets (e.g. GAE returns), from the pipeline's value_targets provider
        values, returns = batch.extras["values"], p.hook("value_targets")(batch)
        batch = batch.replace(extras={**batch.extras, "returns": returns})
        metrics.update({"critic/values_mean": ops.masked_mean(values, batch.response_mask),
                        "critic/returns_mean": ops.masked_mean(returns, batch.response_mask),
                        "critic/explained_variance": ops.explained_variance(values, returns, batch.response_mask)})
    token_mask = p.hook("token_mask")
    if token_mask is not None:  # post-advantage down-sampling: train on a subset of tokens
        keep = token_mask(batch)
        batch = batch.replace(response_mask=batch.response_mask & keep, advantages=batch.advantages * keep)
    return batch, metrics
