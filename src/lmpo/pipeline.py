"""The pipeline: the configured components, each extension point resolved to its providers, and the data plan.

Built once from the config (:func:`build_pipeline`), before anything is generated or written. It is the only place
that asks which component provides what: the trainer calls the components and the providers this object holds.
What the build checks, so a run never discovers it half-way:

- every ``needs`` entry of every component is a known need (:data:`lmpo.methods.base.NEEDS`); a misspelt or
  unknown one is a :class:`~lmpo.errors.ConfigError` naming the component and the nearest valid name;
- needs served by the training forward (hidden states, current entropy, layer noise) come from the policy loss;
- ``candidate_logprobs`` has a rollout mode that provides the candidate tokens;
- an extension point declared single (at most one provider) has at most one.

The data plan (:class:`DataPlan`) says which optional fields the batch preparation computes for this pipeline and
training schedule; :func:`missing_needs` lets each stage check that a component gets what it declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError, DataError, did_you_mean
from lmpo.methods.base import EXTENSION_POINTS, FORWARD_NEEDS, NEEDS
from lmpo.models.token_stats import STAT_NEEDS

BATCH_FIELD_NEEDS = ("old_logprobs", "ref_logprobs", "sampler_logprobs")  # needs that are RolloutBatch fields
EXTRAS_NEEDS = {"entropy": "entropy", "vocab_mean_logprobs": "vocab_mean_logprobs",
                "candidate_logprobs": "candidate_ids", "values": "values",
                "score_sq_norm": "old_score_sq_norm", "step_rewards": "step_rewards", "real_rows": "real_answer",
                "opponent_rows": "opponent"}  # need -> the extras key the component then reads
PREPARED_STATS = frozenset({"score_sq_norm"})  # pi_old statistics computed before the advantages even on-policy


@dataclass(frozen=True)
class KLPenalty:
    """The KL term to the reference policy, decided once: ``beta * KL`` added to the per-token loss (``in_reward``
    False) or ``-beta * KL(pi_old || pi_ref)`` added to the token rewards before the advantages (True)."""

    beta: float
    estimator: str
    in_reward: bool
    k3_clamp: float | None = None

    def token_rewards(self, batch: RolloutBatch) -> Tensor:
        """-beta KL(pi_old || pi_ref) per token (0 off the mask), for the rewards before the advantages."""
        kl = ops.kl_estimate(batch.old_logprobs, batch.ref_logprobs, self.estimator, self.k3_clamp)
        return torch.where(batch.response_mask, -self.beta * kl, 0.0)

    def loss_term(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        """The per-token KL estimate of the policy being optimised (with gradient); the loss adds beta times it
        when the penalty is not in the rewards."""
        return ops.kl_estimate(logprobs, ref_logprobs, self.estimator, self.k3_clamp)


@dataclass(frozen=True)
class DataPlan:
    """Which optional batch fields the preparation stage computes (lmpo.train.prepare)."""

    on_policy: bool  # one optimizer step per batch: pi_old is the policy of the update's own forward
    old_pass: bool  # a no-grad pass under the pre-update weights (old log-probs for the update or the KL reward,
    #                 and/or entropies)
    old_logprobs: bool  # the update receives old_logprobs from that pass (several optimizer steps per batch)
    old_from_forward: bool  # the update's old_logprobs = the detached log-probs of its own forward (on-policy)
    entropy: bool  # extras["entropy"] from the old pass
    old_stats: frozenset[str]  # pi_old's full-distribution statistics, as extras["old_<stat>"] (several steps)
    ref_logprobs: bool
    values: bool = False  # a critic: its values before the advantages, its targets after (lmpo.train.critic)


@dataclass
class Pipeline:
    """The components of a run and, for each extension point, its providers (build with :func:`build_pipeline`, or
    :meth:`assemble` for components made by hand)."""

    advantage: Any = None
    loss: Any = None
    aggregator: Any = None
    shapers: list = field(default_factory=list)
    selectors: list = field(default_factory=list)
    planners: list = field(default_factory=list)
    kl: KLPenalty | None = None
    plan: DataPlan | None = None
    providers: dict[str, list] = field(default_factory=dict)  # extension point -> providers, pipeline order

    @property
    def roles(self) -> dict[str, Any]:
        """Role -> component in pipeline order (the roles name checkpoint entries: advantage, loss, shaper0, ...)."""
        out = {k: c for k, c in (("advantage", self.advantage), ("loss", self.loss), ("aggregator", self.aggregator))
               if c is not None}
        for prefix, items in (("shaper", self.shapers), ("selector", self.selectors), ("planner", self.planners)):
            out.update({f"{prefix}{i}": c for i, c in enumerate(items)})
        return out

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(needs_of(c) for c in self.roles.values()))

    @classmethod
    def assemble(cls, **components: Any) -> "Pipeline":
        """A pipeline of the given components (advantage, loss, aggregator, shapers, selectors, planners): needs
        checked and extension points resolved; no KL penalty and no data plan (those come from a config)."""
        p = cls(**components)
        for role, c in p.roles.items():
            _check_needs(role, c)
        p.providers = resolve_providers(p.roles)
        return p

    def hook(self, point: str) -> Callable | None:
        """The provider's method of a single extension point, or None."""
        if not EXTENSION_POINTS[point].single:
            raise ValueError(f"{point} may have several providers: use Pipeline.calls")
        found = self.providers.get(point, [])
        return getattr(found[0], point) if found else None

    def calls(self, point: str) -> list[Callable]:
        """The providers' methods of an extension point, in pipeline order."""
        return [getattr(c, point) for c in self.providers.get(point, [])]

    def stateful(self) -> dict[str, Any]:
        """Role -> component for every component with state (saved in checkpoints under its role)."""
        ids = {id(c) for c in self.providers.get("state_dict", [])}
        return {role: c for role, c in self.roles.items() if id(c) in ids}


def needs_of(component: Any) -> frozenset[str]:
    return frozenset(getattr(component, "needs", frozenset()))


def _check_needs(role: str, component: Any) -> None:
    for need in sorted(needs_of(component)):
        if need not in NEEDS:
            raise ConfigError(
                f'{role} "{type(component).__name__}" declares needs {need!r}, which is not a known need.'
                f"{did_you_mean(need, NEEDS)} Known needs: {', '.join(sorted(NEEDS))} (lmpo.methods.base.NEEDS).")
        if need in FORWARD_NEEDS and role != "loss":
            raise ConfigError(f'{role} "{type(component).__name__}" declares needs {need!r}, which only a policy loss '
                              "can have (it is served by the training forward pass).")


def resolve_providers(roles: dict[str, Any]) -> dict[str, list]:
    """Extension point -> the distinct components providing it, in pipeline order; single points checked."""
    providers: dict[str, list] = {}
    for point, ext in EXTENSION_POINTS.items():
        # a provider defines the point's method (a hyper-parameter of the same name, e.g. CISPO's ``token_mask``
        # flag, is not one)
        found = list({id(c): c for c in roles.values()
                      if isinstance(c, ext.protocol) and callable(getattr(c, point, None))}.values())
        if ext.single and len(found) > 1:
            names = ", ".join(f"{r} ({type(c).__name__})" for r, c in roles.items() if c in found)
            raise ConfigError(f"Extension point {point!r} ({ext.protocol.__name__}) may have only one provider, but "
                              f"{names} all provide it; keep one of them.")
        if found:
            providers[point] = found
    return providers


def data_plan(needs: frozenset[str], kl: KLPenalty | None, ppo_epochs: int, num_minibatches: int) -> DataPlan:
    on_policy = ppo_epochs == 1 and num_minibatches == 1
    # the old log-probs need their own pass only when pi_old differs from the policy at update time; on-policy, the
    # update's forward runs under the very weights that collected the batch, so its detached log-probs are pi_old
    old = "old_logprobs" in needs and not on_policy
    kl_reward = kl is not None and kl.in_reward  # computed before the update, from the old pass
    return DataPlan(
        on_policy=on_policy, old_pass=old or kl_reward or "entropy" in needs, old_logprobs=old,
        old_from_forward="old_logprobs" in needs and on_policy, entropy="entropy" in needs,
        old_stats=(PREPARED_STATS if on_policy else STAT_NEEDS) & needs,
        ref_logprobs=kl is not None or "ref_logprobs" in needs, values="values" in needs,
    )


def build_pipeline(cfg, components: dict[str, Any] | None = None) -> Pipeline:
    """The pipeline of ``cfg`` (an :class:`lmpo.config.Config`); ``components`` as built by
    :func:`lmpo.config.build_components` (built here when not given)."""
    from lmpo.config import build_components
    from lmpo.rollout.modes import mode_extras

    comps = components if components is not None else build_components(cfg)
    kl = KLPenalty(cfg.kl.beta, cfg.kl.estimator, cfg.kl.mode == "reward", cfg.kl.k3_clamp) if cfg.kl.beta > 0 else None
    p = Pipeline.assemble(advantage=comps["advantage"], loss=comps["loss"], aggregator=comps["aggregator"],
                          shapers=list(comps["shapers"]), selectors=list(comps["selectors"]),
                          planners=list(comps.get("planners", [])))
    p.kl = kl
    if "candidate_logprobs" in p.needs and "candidate_ids" not in mode_extras(cfg.rollout.mode):
        who = [r for r, c in p.roles.items() if "candidate_logprobs" in needs_of(c)]
        raise ConfigError(f"{', '.join(who)} needs candidate_logprobs, which need candidate tokens from the rollout "
                          f"mode; rollout.mode={cfg.rollout.mode!r} provides none. Set rollout.mode to one of "
                          f"{', '.join(m for m in ('reference', 'soft_thinking'))}.")
    guide = p.providers.get("guide")
    clash = [pt for pt in ("plan_group", "prefix_budgets") if p.providers.get(pt)]
    if guide and (clash or cfg.rollout.mode != "sample"):
        what = f"the {', '.join(clash)} extension point" if clash else f"rollout.mode={cfg.rollout.mode!r}"
        raise ConfigError(f"{type(guide[0]).__name__} mixes guided rows into the groups (the guide extension point), "
                          f"which cannot be combined with {what}: those add per-row data that guided rows do not "
                          "have. Use rollout.mode=sample and drop the other planner (docs/guidance.md).")
    for need, key, mode, what in (("real_rows", "real_answer", "self_play", "the reference answer as a row of each group"),
                                  ("opponent_rows", "opponent", "mixture", "opponents from the policy/reference mixture")):
        if need in p.needs and key not in mode_extras(cfg.rollout.mode):
            who = [r for r, c in p.roles.items() if need in needs_of(c)]
            raise ConfigError(f"{', '.join(who)} needs {need} ({what}), which rollout.mode={cfg.rollout.mode!r} does "
                              f"not provide. Set rollout.mode={mode}.")
    if "step_rewards" in p.needs and not any(hasattr(c, "after_score") and "step_rewards" in
                                             getattr(c, "provides", ()) for c in p.providers.get("after_score", [])):
        who = [r for r, c in p.roles.items() if "step_rewards" in needs_of(c)]
        raise ConfigError(f"{', '.join(who)} needs step_rewards (per-step process scores), which the process_credit "
                          "planner writes; add planners: [{name: process_credit, scorer: ...}].")
    has_targets = bool(p.providers.get("value_targets"))
    if ("values" in p.needs) != has_targets:
        who = [r for r, c in p.roles.items() if "values" in needs_of(c)] or \
            [r for r, c in p.roles.items() if any(c is q for q in p.providers.get("value_targets", []))]
        raise ConfigError(f"{', '.join(who)} " + (
            "needs values (a critic), but no component provides value_targets (what the critic learns); use "
            "advantage gae (e.g. method=ppo)." if not has_targets else
            "provides value_targets for a critic, but no component needs values; nothing would use the critic."))
    p.plan = data_plan(p.needs, kl, cfg.train.ppo_epochs, cfg.train.num_minibatches)
    return p


def missing_needs(batch: RolloutBatch, needs: frozenset[str]) -> list[str]:
    """The declared needs a batch does not carry (forward needs are served later, by the training forward)."""
    out = [n for n in BATCH_FIELD_NEEDS if n in needs and getattr(batch, n) is None]
    out += [n for n, key in EXTRAS_NEEDS.items() if n in needs and key not in batch.extras]
    return out


def require(batch: RolloutBatch, component: Any, role: str) -> None:
    """Stop with a clear error when ``component`` would not get a field it declared in ``needs``."""
    missing = missing_needs(batch, needs_of(component))
    if missing:
        raise DataError(f'{role} "{type(component).__name__}" needs {", ".join(missing)}, but the batch does not carry '
                        f"{'it' if len(missing) == 1 else 'them'} at this stage (see lmpo.methods.base.NEEDS for who "
                        "provides each need).")
