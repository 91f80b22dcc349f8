"""The contract of each component kind.

Every component is a frozen dataclass (hyper-parameters are its fields) with a ``__call__`` of the kind's signature
and a class attribute ``needs``: the optional :class:`~lmpo.batch.RolloutBatch` fields it reads (the training loop
computes ``old_logprobs`` / ``ref_logprobs`` / ``entropy`` only when some component needs them). The trainer never
branches on a component's name.

- Shaper      ``(batch) -> batch``                 rewrites rewards / masks (e.g. overlong penalty).
- Selector    ``(batch) -> (B,) bool``             rows to keep (e.g. DAPO dynamic sampling).
- AdvantageFn ``(batch) -> (B, T)``                per-token advantages, 0 on masked tokens.
- PolicyLoss  ``(logprobs (B, T), batch) -> LossOut``  per-token surrogate loss (to be minimised).
- Aggregator  ``(per_token, mask, normaliser) -> scalar`` and ``normaliser(mask, horizon) -> scalar``; the
  normaliser is computed once on the *global* batch so micro-batching never changes the loss.
- PreferenceLoss ``(PreferenceBatch, policy PairLogps, ref PairLogps | None) -> PreferenceOut`` per-pair loss
  (DPO family; chosen/rejected pairs, offline or built from rollouts).
- Planner     no call of its own: it provides collection extension points (e.g. Knapsack RL's budget allocator).

``needs`` entries must be names of :data:`NEEDS`. Beside the kinds, the extension points below
(:data:`EXTENSION_POINTS`) let a component shape collection or learn across steps; ``docs/adding-a-method.md``
shows each with a minimal example.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from lmpo.batch import PreferenceBatch, RolloutBatch
from lmpo.errors import DataError


@dataclass
class LossOut:
    """A policy loss's output: per-token loss (B, T) and detached scalar metrics keyed ``loss/*``."""

    per_token: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Shaper(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, batch: RolloutBatch) -> RolloutBatch: ...


class Selector(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, batch: RolloutBatch) -> Tensor: ...


class AdvantageFn(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, batch: RolloutBatch) -> Tensor: ...


class PolicyLoss(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut: ...


class Aggregator(Protocol):
    def normaliser(self, mask: Tensor, horizon: int) -> Tensor: ...

    def __call__(self, per_token: Tensor, mask: Tensor, normaliser: Tensor) -> Tensor: ...


@dataclass
class PairLogps:
    """Per-token log-probs of a pair's two responses under one model: ``chosen`` (N, Tc) and ``rejected`` (N, Tr),
    0 on padding (the masks are the :class:`~lmpo.batch.PreferenceBatch`'s). Sums, means and lengths come from
    :func:`lmpo.ops.masked_sum` / :func:`lmpo.ops.response_lengths` with those masks."""

    chosen: Tensor
    rejected: Tensor


@dataclass
class PreferenceOut:
    """A preference loss's output: the loss per pair (N,) to minimise (the stage averages it over the global batch
    of pairs) and detached scalar metrics keyed ``loss/*`` or ``rewards/*`` (``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` where the loss has implicit rewards)."""

    per_pair: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class PreferenceLoss(Protocol):
    """``(batch, policy, ref) -> PreferenceOut``: ``policy`` holds the trained model's per-token log-probs of both
    responses (with gradient), ``ref`` the reference's (no gradient; ``None`` unless ``ref_logprobs`` is in
    ``needs``). Registered in :data:`lmpo.registry.PREFERENCE_LOSSES`."""

    needs: ClassVar[frozenset[str]]

    def __call__(self, batch: PreferenceBatch, policy: PairLogps, ref: PairLogps | None) -> PreferenceOut: ...


NO_NEEDS: frozenset[str] = frozenset()


# =========================================================================== data needs
NEEDS: dict[str, str] = {
    # fields every batch carries need no declaration (prompt/response ids and masks, group_ids, rewards,
    # sampler_logprobs, reward_components, truncated, meta); these are computed only when declared:
    "old_logprobs": "log pi_old (B, T) under the weights that collected the batch: a no-grad pass before the update, "
                    "or the detached log-probs of the update's own forward when the step makes one optimizer step",
    "ref_logprobs": "log pi_ref (B, T): the frozen reference (the LoRA base, or a frozen copy of the initial weights)",
    "sampler_logprobs": "the rollout engine's log-probs (B, T) (always present; listed for documentation)",
    "entropy": "extras['entropy'] (B, T): per-token entropy of pi_old, no gradient (advantages that score tokens)",
    "vocab_mean_logprobs": "extras['vocab_mean_logprobs'] (B, T) (and old_ under several optimizer steps): the mean "
                           "log-prob over the vocabulary, chunked (ROVER)",
    "score_sq_norm": "extras['old_score_sq_norm'] (B, T): 1 - 2 pi_old(y_t) + sum_v pi_old(v)^2, the squared norm of "
                     "the logit-gradient of log pi_old(y_t), from pi_old's pass before the advantages (OTB)",
    "candidate_logprobs": "extras['candidate_logprobs'] (B, T, K) log-probs of extras['candidate_ids'], which the "
                          "rollout mode provides (rollout.mode reference / soft_thinking)",
    "real_rows": "extras['real_answer'] (B,): 1.0 on rows whose response is the task's reference answer, which the "
                 "rollout mode self_play provides (SPIN)",
    "opponent_rows": "extras['opponent'] (B,): 1.0 on untrained opponent rows sampled from the geometric mixture of "
                     "the policy and the reference, which the rollout mode mixture provides (Nash-MD)",
    "values": "extras['values'] (B, T): the critic's estimates V(s_t) before the update, no gradient; the trainer then "
              "builds a critic (lmpo.train.critic, the config's critic section), which regresses on the targets of the "
              "pipeline's value_targets provider (one must exist)",
    "step_rewards": "extras['step_rewards'], ['step_ends'] (B, S), ['num_steps'] (B,) and turn_ids: each reply's step "
                    "scores and step-end tokens, written during collection by the process_credit planner (which must "
                    "be in planners; lmpo.methods.plan.process_credit)",
    "hidden_states": "extras['hidden'] (B, T, H): LM-head inputs of the training forward, with gradient (losses only)",
    "current_entropy": "extras['current_entropy'] (B, T): entropy of the policy being optimised, with gradient "
                       "(losses only)",
    "layer_noise": "the loss's layer_noise() (a LayerNoise) perturbs the decoder layers' inputs during the training "
                   "forward, seeded per row by extras['noise_seed'] (drawn once per step when absent; losses only)",
}
"""Every name a component may list in ``needs``, with what the trainer then provides. An unknown name is a
configuration error when the pipeline is built (:func:`lmpo.pipeline.build_pipeline`)."""

FORWARD_NEEDS = frozenset({"hidden_states", "current_entropy", "layer_noise"})
"""Needs served by the training forward pass itself: only a policy loss may declare them."""


# =========================================================================== extension points
# Methods that shape *collection* or *learn across steps* plug in through these, beside the five kinds. Any
# component (of any kind) provides an extension point by defining its method; the pipeline resolves the providers
# once, when it is built, and enforces each point's scoping rule (``EXTENSION_POINTS``). The trainer calls only what
# the pipeline holds.
@runtime_checkable
class PromptPrioritizer(Protocol):
    """Prioritised prompt sampling: one non-negative weight per prompt key of the training set (``None``: uniform).
    At most one provider."""

    def prompt_weights(self, keys: list[str]) -> list[float] | None: ...


@runtime_checkable
class BudgetAllocator(Protocol):
    """Rollouts per prompt for one batch of prompt keys (``n`` = rollout.num_generations, the nominal count); the
    counts may differ between prompts. At most one provider."""

    def allocate(self, keys: list[str], n: int) -> list[int]: ...


@runtime_checkable
class GroupPlanner(Protocol):
    """One plan per sample of a group of ``n``: a dict with ``max_new_tokens`` (its own length limit, capped at the
    rollout's), ``prompt_suffix`` (text appended to the prompt) and ``tags`` (name -> number, gathered into
    ``batch.extras[name]``). At most one provider."""

    def plan_group(self, n: int) -> list[dict[str, Any]]: ...


@runtime_checkable
class PrefixScorer(Protocol):
    """Token budgets ``[b_1, ..., b_S]``: every reply is also scored truncated to its first ``b_s`` tokens, in
    ``batch.extras['prefix_rewards']`` (B, S). At most one provider."""

    def prefix_budgets(self) -> list[int]: ...


@runtime_checkable
class PromptSource(Protocol):
    """Up to ``n`` prompt rows made by the component (curricula, rewrites, prefix prompts), served before the data
    set's; the component keeps its queue in its state. Any number of providers, asked in pipeline order."""

    def inject_prompts(self, n: int) -> list[dict[str, Any]]: ...


@runtime_checkable
class CollectObserver(Protocol):
    """Called once per scoring round of a step, after collection ends, with the round's raw batch (before shapers
    and selectors) and a rollout context whose generator is the plain sampler (so it may query the policy). Any
    number of providers, in pipeline order."""

    def after_collect(self, ctx: Any, batch: RolloutBatch) -> None: ...


@runtime_checkable
class GuidanceSource(Protocol):
    """Off-policy guidance mixed into the step's groups (hints, teacher or data traces; docs/guidance.md). Called once
    per scoring round, right after the policy's rollouts are scored and before shapers and selectors, with a
    :class:`lmpo.train.guidance.Guide` (it builds guided rows, each with its own behaviour log-probs in
    ``sampler_logprobs``: the policy under a hinted prompt, a teacher model, the policy's own log-probs of a data
    trace, or a declared constant) and the round's raw batch. Returns the batch with guided rows swapped in or added
    by :meth:`Guide.mix` (same group ids; groups stay contiguous); every row then carries ``extras['guided']``,
    ``extras['off_policy']`` and ``extras['guide_tier']`` and guided rows ``meta[i]['guide']``. At most one provider."""

    def guide(self, guide: Any, batch: RolloutBatch) -> RolloutBatch: ...


@runtime_checkable
class ScoreAugmenter(Protocol):
    """Called on each scoring round's batch right after it is scored, before the shapers, with the rollout context
    (tokenizer, generator, reward set): returns the batch with fields added (process credit's ``token_rewards`` /
    ``turn_ids``, Monte-Carlo values from extra rollouts in ``extras``). Any number of providers, in pipeline order,
    each receiving the previous one's batch."""

    def after_score(self, ctx: Any, batch: RolloutBatch) -> RolloutBatch: ...


@runtime_checkable
class StepObserver(Protocol):
    """Called after each step's update with the training batch and ``logprobs_fn`` (batch -> log-probs under the
    updated policy, no gradient): per-prompt trackers learn here. Any number of providers, in pipeline order."""

    def observe(self, batch: RolloutBatch, logprobs_fn: Callable[[RolloutBatch], Tensor] | None = None) -> None: ...


@runtime_checkable
class TokenMask(Protocol):
    """Post-advantage token down-sampling: a (B, T) bool mask of the tokens to train on (ANDed into
    ``response_mask``; advantages are zeroed elsewhere). At most one provider."""

    def token_mask(self, batch: RolloutBatch) -> Tensor: ...


@runtime_checkable
class ValueTargets(Protocol):
    """The critic's regression targets (B, T) for a batch that carries ``extras['values']`` (e.g. GAE's returns
    ``A_t + V(s_t)``), asked once per step after the advantages; the trainer stores them in ``extras['returns']``.
    At most one provider; a pipeline that needs ``values`` must have one."""

    def value_targets(self, batch: RolloutBatch) -> Tensor: ...


@runtime_checkable
class LRScaler(Protocol):
    """A factor on this optimizer step's learning rate (e.g. VCPO's ESS rule), asked once per optimizer step
    after backward. At most one provider."""

    def lr_scale(self) -> float: ...


@runtime_checkable
class OptimizerHook(Protocol):
    """Runs once after every optimizer step (never per micro-batch): dual ascent, history commits. Any number of
    providers, in pipeline order."""

    def after_optimizer_step(self) -> None: ...


@runtime_checkable
class StatefulComponent(Protocol):
    """State that persists across steps and travels in checkpoints (see :class:`Stateful`). Any number."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ExtensionPoint:
    name: str  # the method a provider defines
    protocol: type
    single: bool  # True: at most one provider in a pipeline; False: any number, called in pipeline order
    stage: str  # where the trainer calls it


EXTENSION_POINTS: dict[str, ExtensionPoint] = {p.name: p for p in (
    ExtensionPoint("prompt_weights", PromptPrioritizer, True, "collect: choosing the step's prompts"),
    ExtensionPoint("allocate", BudgetAllocator, True, "collect: rollouts per prompt"),
    ExtensionPoint("plan_group", GroupPlanner, True, "collect: per-sample length limits, suffixes and tags"),
    ExtensionPoint("prefix_budgets", PrefixScorer, True, "collect: scoring truncated replies"),
    ExtensionPoint("inject_prompts", PromptSource, False, "collect: prompts made by components"),
    ExtensionPoint("guide", GuidanceSource, True, "collect: guided rows mixed into each scoring round's groups"),
    ExtensionPoint("after_score", ScoreAugmenter, False, "collect: each scoring round's batch, before the shapers"),
    ExtensionPoint("after_collect", CollectObserver, False, "collect: after the last scoring round"),
    ExtensionPoint("token_mask", TokenMask, True, "prepare: after the advantages"),
    ExtensionPoint("value_targets", ValueTargets, True, "prepare: the critic's targets, after the advantages"),
    ExtensionPoint("lr_scale", LRScaler, True, "update: before each optimizer step"),
    ExtensionPoint("after_optimizer_step", OptimizerHook, False, "update: after each optimizer step"),
    ExtensionPoint("observe", StepObserver, False, "observe: after the step's update"),
    ExtensionPoint("state_dict", StatefulComponent, False, "checkpoint: saved and restored with the run"),
)}


class Stateful:
    """Base of components whose state persists across steps (per-prompt trackers, curricula, dual variables).

    The whole state lives in ``self.state``, a dict of plain Python values that ``initial_state()`` builds (on first
    use), and nowhere else; hyper-parameters stay the dataclass fields. ``state_dict()`` is a deep copy of it and
    ``load_state_dict()`` replaces it, checking the keys when ``initial_state()`` declares a fixed set. Subclasses
    are plain (not frozen) dataclasses: the state changes, the hyper-parameters do not.
    """

    def initial_state(self) -> dict[str, Any]:
        return {}

    @property
    def state(self) -> dict[str, Any]:
        if "_state" not in self.__dict__:
            self.__dict__["_state"] = self.initial_state()
        return self.__dict__["_state"]

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(self.initial_state())
        if expected and set(state) != expected:
            raise DataError(f"{type(self).__name__}.load_state_dict: the saved state has keys {sorted(state)}, "
                            f"expected {sorted(expected)} (a checkpoint of another version or component?).")
        self.__dict__["_state"] = copy.deepcopy(dict(state))


from lmpo.methods.params import Rule, hp, ordered, rule  # noqa: E402,F401  (declared hyper-parameter ranges)
