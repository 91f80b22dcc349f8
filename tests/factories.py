"""Shared test factories (one copy; ``tests/conftest.py`` exposes them as fixtures too).

- :func:`from_config`: build a registered component as a config does (ranges checked, errors name the key).
- RolloutBatch builders, smallest first:
  :func:`make_batch` (a hand case from the few fields a maths test cares about), :func:`random_batch` (random group
  structure: sizes, singletons, non-contiguous ids), :func:`random_full_batch` (fixed groups, every field the trainer
  fills: the contract tests' batch), :func:`episode_batch` (multi-turn episodes as ``rollout.mode: episodes`` lays
  them out: turn ids, observation tokens, per-turn rewards and observation keys), :func:`tagged_batch` (every field set, each row recognisable: select / split /
  concat tests), :func:`policy_batch` (token ids for a real model forward).
- Batch transforms for the contracts: :func:`with_extras`, :func:`grad_extras`, :func:`pad_columns`, :func:`permute`.
- Policy-loss inputs: :func:`token_loss_inputs`, :func:`run_token_loss`.
- Model-free collection fakes: :class:`EchoGenerator`, :func:`exact_reward`.

Every builder is deterministic in its ``seed`` (or in its explicit inputs): tests compare against numbers derived by
hand or by loops, so a builder's draws must never change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import lmpo.methods  # noqa: F401  (registers components)
from lmpo.batch import RolloutBatch
from lmpo.registry import ALL_REGISTRIES
from lmpo.rollout.base import GenerationOutput

# --------------------------------------------------------------------------- components
# The config key a component of each kind sits under in a run config (list kinds: the first entry).
CONFIG_KEY = {"advantage": "advantage", "loss": "loss", "aggregator": "aggregator", "selector": "selectors[0]",
              "shaper": "shapers[0]", "planner": "planners[0]", "reward": "rewards[0]", "task": "task",
              "preference": "preference.loss"}


def from_config(cls: type, *, where: str | None = None, **kwargs: Any) -> Any:
    """Build the registered component class ``cls`` through its registry, as a config does (types coerced, declared
    ranges checked, errors naming ``where.<key>``); ``where`` defaults to the kind's config key (``loss``,
    ``selectors[0]``, ...)."""
    for kind, reg in ALL_REGISTRIES.items():
        for e in reg.entries():
            if e.obj is cls:
                return reg.build(e.name, where=CONFIG_KEY[kind] if where is None else where, **kwargs)
    raise LookupError(f"{cls.__name__} is not a registered component")


# --------------------------------------------------------------------------- batches for method maths
def _t(x, dtype):
    return x.to(dtype) if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype)


def make_batch(rewards, group_ids=None, mask=None, *, T: int | None = None, advantages=None, old_logprobs=None,
               token_rewards=None, truncated=None, dtype=torch.float32) -> RolloutBatch:
    """A valid RolloutBatch from the few fields a maths test cares about; the rest are zeros.

    ``mask`` may be a (B, T) bool-like nested list/tensor or a list of lengths (right-padded prefix masks).
    """
    rewards = _t(rewards, dtype)
    B = rewards.shape[0]
    group_ids = torch.zeros(B, dtype=torch.long) if group_ids is None else _t(group_ids, torch.long)
    if mask is None:
        mask = torch.ones(B, T or 1, dtype=torch.bool)
    else:
        m = mask if isinstance(mask, Tensor) else torch.tensor(mask)
        if m.dim() == 1:  # lengths
            width = T if T is not None else int(m.max())
            m = torch.arange(width)[None, :] < m[:, None]
        mask = m.bool()
    T = mask.shape[1]
    opt = lambda v: None if v is None else _t(v, dtype)  # noqa: E731
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        response_ids=torch.zeros(B, T, dtype=torch.long),
        response_mask=mask,
        group_ids=group_ids,
        rewards=rewards,
        sampler_logprobs=torch.zeros(B, T, dtype=dtype),
        advantages=opt(advantages),
        old_logprobs=opt(old_logprobs),
        token_rewards=opt(token_rewards),
        truncated=None if truncated is None else _t(truncated, torch.bool),
    )


def random_groups(g: torch.Generator, max_groups: int = 5, max_size: int = 5) -> Tensor:
    """Random group ids: random sizes (singletons included), non-contiguous ids, rows shuffled."""
    n_groups = int(torch.randint(1, max_groups + 1, (1,), generator=g))
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=g)
    labels = torch.randperm(100, generator=g)[:n_groups] * 3 + 7  # arbitrary, unsorted, non-contiguous ids
    ids = labels.repeat_interleave(sizes)
    return ids[torch.randperm(ids.numel(), generator=g)]


def random_mask(g: torch.Generator, B: int, T: int, holes: bool = True) -> Tensor:
    """Right-padded masks of random length (>= 1), optionally with holes (tool/env tokens not trained on)."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) > 0.2
        mask[torch.arange(B), 0] = True  # keep at least one token per row
    return mask


def random_batch(seed: int, *, T: int | None = None, token_rewards: bool = False, discrete_rewards: bool = False,
                 holes: bool = True, dtype=torch.float32) -> RolloutBatch:
    """A :func:`make_batch` with a random group structure (:func:`random_groups`), rewards and masks."""
    g = torch.Generator().manual_seed(seed)
    group_ids = random_groups(g)
    B = group_ids.numel()
    T = T or int(torch.randint(1, 7, (1,), generator=g))
    if discrete_rewards:
        rewards = torch.randint(0, 2, (B,), generator=g).to(dtype)
    else:
        rewards = torch.randn(B, generator=g, dtype=dtype)
    mask = random_mask(g, B, T, holes)
    tr = torch.randn(B, T, generator=g, dtype=dtype) if token_rewards else None
    return make_batch(rewards, group_ids, mask, token_rewards=tr, dtype=dtype)


# --------------------------------------------------------------------------- batches as the trainer fills them
def random_full_batch(seed: int = 0, groups: int = 3, group_size: int = 4, T: int = 5, P: int = 3,
                      equal_rewards: bool = False, logprob_scale: float = 1.0) -> RolloutBatch:
    """``groups`` contiguous groups of ``group_size`` rows with every field the trainer fills (sampler / old /
    reference log-probs, advantages, truncation), right-padded responses of random length."""
    g = torch.Generator().manual_seed(seed)
    B = groups * group_size
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.ones(B) if equal_rewards else torch.randint(0, 2, (B,), generator=g).float() + 0.1 * torch.randn(B, generator=g)
    lp = lambda: (-torch.rand(B, T, generator=g) * 2.0) * logprob_scale  # noqa: E731
    return RolloutBatch(
        prompt_ids=torch.randint(0, 16, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.bool),
        response_ids=torch.randint(0, 16, (B, T), generator=g), response_mask=mask, response_attn=mask.clone(),
        group_ids=torch.arange(groups).repeat_interleave(group_size), rewards=rewards,
        sampler_logprobs=lp() * mask, old_logprobs=lp() * mask, ref_logprobs=lp() * mask,
        truncated=lengths == T, advantages=torch.randn(B, T, generator=g) * mask,
    )


def episode_batch(turn_rewards, group_ids=None, *, tokens=None, obs_tokens: int = 1, obs_keys=None,
                  rewards=None, max_turns: int | None = None, pad: int = 0, seed: int = 0) -> RolloutBatch:
    """A multi-turn batch laid out as ``rollout.mode: episodes`` lays it out (one row per episode).

    Row i plays ``len(turn_rewards[i])`` policy turns; turn t has ``tokens[i][t]`` policy tokens (default 1), and
    every turn but the last is followed by ``obs_tokens`` observation tokens (attended, never trained, same turn id);
    then ``pad`` extra padding columns. Fields: ``response_mask`` = policy tokens, ``response_attn`` = all tokens,
    ``turn_ids`` = t on turn t's policy and observation tokens (0 on padding), ``rewards`` = ``rewards`` or the sum
    of the turn rewards; extras ``turn_rewards`` (B, max_turns), ``num_turns``, ``env_return``, ``policy_mask`` and,
    given ``obs_keys`` (per row, one key per turn), ``turn_observation_keys`` (0 after the last turn). Random token
    ids and log-probs, deterministic in ``seed``.
    """
    B = len(turn_rewards)
    n = [len(r) for r in turn_rewards]
    M = max_turns or max(n)
    tokens = [[1] * k for k in n] if tokens is None else tokens
    rows = []  # per row: list of (turn, is_policy)
    for i in range(B):
        row = []
        for t in range(n[i]):
            row += [(t, True)] * tokens[i][t]
            if t < n[i] - 1:
                row += [(t, False)] * obs_tokens
        rows.append(row)
    T = max(len(r) for r in rows) + pad
    g = torch.Generator().manual_seed(seed)
    turn = torch.zeros(B, T, dtype=torch.long)
    policy = torch.zeros(B, T, dtype=torch.bool)
    attn = torch.zeros(B, T, dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, (t, is_policy) in enumerate(row):
            turn[i, j], policy[i, j], attn[i, j] = t, is_policy, True
    tr = torch.tensor([list(r) + [0.0] * (M - len(r)) for r in turn_rewards], dtype=torch.float32)
    ret = tr.sum(-1)
    extras = {"turn_rewards": tr, "num_turns": torch.tensor(n, dtype=torch.float32), "env_return": ret,
              "policy_mask": policy.clone()}
    if obs_keys is not None:
        extras["turn_observation_keys"] = torch.tensor([list(k) + [0] * (M - len(k)) for k in obs_keys],
                                                       dtype=torch.long)
    return RolloutBatch(
        prompt_ids=torch.randint(0, 16, (B, 2), generator=g), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.randint(0, 16, (B, T), generator=g), response_mask=policy, response_attn=attn,
        group_ids=torch.zeros(B, dtype=torch.long) if group_ids is None else _t(group_ids, torch.long),
        rewards=ret.clone() if rewards is None else _t(rewards, torch.float32),
        sampler_logprobs=-torch.rand(B, T, generator=g) * policy, turn_ids=turn, extras=extras,
    )


def tagged_batch(B: int = 3, T: int = 4, P: int = 2, K: int = 2, offset: int = 0) -> RolloutBatch:
    """Every field set; row i of every per-row tensor is recognisable (holds 100*i + offset + ...)."""
    row = torch.arange(B)[:, None] * 100 + offset
    lengths = torch.tensor([(i % T) + 1 for i in range(B)])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    f = lambda w: (row + torch.arange(w)[None, :]).float()  # noqa: E731
    return RolloutBatch(
        prompt_ids=row + torch.arange(P)[None, :], response_ids=row + torch.arange(T)[None, :] + 50,
        response_mask=mask, group_ids=torch.arange(B) // 2 + offset, rewards=row[:, 0].float(),
        sampler_logprobs=-f(T), prompt_mask=torch.ones(B, P, dtype=torch.bool), response_attn=mask.clone(),
        reward_components=f(K), old_logprobs=-f(T) - 1, ref_logprobs=-f(T) - 2, token_rewards=f(T) * 0.5,
        turn_ids=torch.zeros(B, T, dtype=torch.long) + row, advantages=f(T) * 2, truncated=lengths == T,
        extras={"score": row[:, 0].float(), "vec": f(3)}, meta=[{"row": i + offset} for i in range(B)],
    )


def policy_batch(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, attn: Tensor, *,
                 advantages: Tensor | None = None, sampler_logprobs: Tensor | None = None,
                 extras: dict[str, Tensor] | None = None) -> RolloutBatch:
    """A one-group batch around given token ids, for a real policy forward (every attended token is trained).

    ``advantages`` default to ``torch.randn(B, T) * attn`` (global RNG) and ``sampler_logprobs`` to zeros.
    """
    B, T = response_ids.shape
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=attn,
        response_attn=attn.clone(), group_ids=torch.zeros(B, dtype=torch.long), rewards=torch.zeros(B),
        sampler_logprobs=torch.zeros(B, T) if sampler_logprobs is None else sampler_logprobs,
        advantages=torch.randn(B, T) * attn if advantages is None else advantages, extras=dict(extras or {}),
    )


# --------------------------------------------------------------------------- batch transforms (contracts)
def with_extras(batch: RolloutBatch, needs, seed: int = 0, hidden: int = 4, candidates: int = 3) -> RolloutBatch:
    """``batch`` plus plausible random ``extras`` for every key a component declares in ``needs``.

    What the trainer would put there (see lmpo.train.step / lmpo.models.token_stats), 0 on masked tokens:
    ``entropy`` (B, T) >= 0, detached (the pre-update policy's); ``current_entropy`` (B, T) >= 0 and ``hidden_states``
    -> ``hidden`` (B, T, H), both leaves with gradient (the policy being optimised); ``candidate_logprobs`` (B, T, M)
    <= 0 with gradient, plus ``candidate_ids`` (column 0 = the sampled token, so hits occur) and a detached
    ``old_candidate_logprobs``; ``vocab_mean_logprobs`` (B, T) <= -log 16 with gradient, plus a detached ``old_`` copy;
    ``layer_noise`` -> ``noise_seed`` (B,) int64; ``step_rewards`` -> the process_credit planner's layout (random step ends
    on trained tokens, ``token_rewards`` / ``turn_ids`` set to match, extras ``step_rewards`` / ``step_ends`` / ``num_steps``);
    ``real_rows`` -> ``real_answer`` (B,) 1.0 on each group's first row; ``opponent_rows`` -> ``opponent`` (B,) 1.0 on
    each group's last row; ``score_sq_norm`` -> a detached ``old_score_sq_norm`` in [0, 2). Needs that are batch fields
    (old_logprobs, ...) are already set.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    B, T = batch.response_mask.shape
    m = batch.response_mask
    leaf = lambda x: x.detach().requires_grad_(True)  # noqa: E731
    ex = dict(batch.extras)
    if "entropy" in needs:
        ex["entropy"] = torch.rand(B, T, generator=g) * 2.5 * m
    if "score_sq_norm" in needs:  # 1 - 2 pi(y) + sum pi^2 lies in [0, 2)
        ex["old_score_sq_norm"] = torch.rand(B, T, generator=g) * 1.9 * m
    if "current_entropy" in needs:
        ex["current_entropy"] = leaf(torch.rand(B, T, generator=g) * 2.5 * m)
    if "hidden_states" in needs:
        ex["hidden"] = leaf(torch.randn(B, T, hidden, generator=g) * m[..., None])
    if "candidate_logprobs" in needs:
        ids = torch.randint(0, 16, (B, T, candidates), generator=g)
        ids[..., 0] = batch.response_ids
        cand = -torch.rand(B, T, candidates, generator=g) * 3.0 * m[..., None]
        old = (cand + 0.1 * torch.randn(cand.shape, generator=g)).clamp(max=0) * m[..., None]
        ex.update(candidate_ids=ids, candidate_logprobs=leaf(cand), old_candidate_logprobs=old)
    if "vocab_mean_logprobs" in needs:
        vm = -(2.8 + torch.rand(B, T, generator=g)) * m
        ex.update(vocab_mean_logprobs=leaf(vm), old_vocab_mean_logprobs=(vm - 0.1 * torch.rand(B, T, generator=g)) * m)
    if "values" in needs:  # the pre-update critic's V(s_t), detached
        ex["values"] = torch.randn(B, T, generator=g) * m
    if "step_rewards" in needs:  # process_credit's layout: random step ends on trained tokens, the last on the last
        S = T
        ends = torch.full((B, S), -1, dtype=torch.long)
        scores, n = torch.zeros(B, S), torch.zeros(B, dtype=torch.long)
        turn = torch.zeros(B, T, dtype=torch.long)
        tok_r = torch.zeros(B, T)
        for i in range(B):
            live = m[i].nonzero().flatten()
            if not len(live):
                continue
            last = int(live[-1])
            cut = sorted(set((live[torch.rand(len(live), generator=g) < 0.4]).tolist()) | {last})
            k = len(cut)
            ends[i, :k], n[i] = torch.tensor(cut), k
            scores[i, :k] = torch.rand(k, generator=g) * 2 - 1
            tok_r[i, cut] = scores[i, :k]
            start = 0
            for j, e in enumerate(cut):
                turn[i, start:e + 1] = j
                start = e + 1
            turn[i, start:] = k - 1
        ex.update(step_rewards=scores, step_ends=ends, num_steps=n)
        batch = batch.replace(token_rewards=tok_r, turn_ids=turn)
    if "layer_noise" in needs:
        ex["noise_seed"] = torch.randint(0, 2**31, (B,), generator=g)
    if "real_rows" in needs:  # rollout.mode self_play: the first row of each group is the reference answer
        gid = batch.group_ids
        ex["real_answer"] = torch.tensor([float(i == 0 or gid[i] != gid[i - 1]) for i in range(B)])
    if "opponent_rows" in needs:  # rollout.mode mixture: the last row of each group is an (untrained) opponent
        gid = batch.group_ids
        ex["opponent"] = torch.tensor([float(i == B - 1 or gid[i] != gid[i + 1]) for i in range(B)])
    return batch.replace(extras=ex)


def grad_extras(batch: RolloutBatch) -> dict[str, Tensor]:
    """The extras that carry gradient (produced by the policy's own forward pass)."""
    return {k: v for k, v in batch.extras.items() if v.requires_grad}


def pad_columns(batch: RolloutBatch, extra: int) -> RolloutBatch:
    """Append ``extra`` padding columns to every (B, T) field, and to the T axis of every (B, T, ...) extra."""
    ex = {k: torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, extra)) if v.dim() >= 2 else v
          for k, v in batch.extras.items()}
    return RolloutBatch.concat([batch]).replace(extras=ex, **{
        f: torch.nn.functional.pad(getattr(batch, f), (0, extra))
        for f in ("response_ids", "response_mask", "response_attn", "sampler_logprobs", "old_logprobs",
                  "ref_logprobs", "advantages", "token_rewards", "turn_ids") if getattr(batch, f) is not None})


def permute(batch: RolloutBatch, seed: int = 1) -> tuple[RolloutBatch, Tensor]:
    """The batch with its rows shuffled, and the permutation (row i of the result is row perm[i])."""
    perm = torch.randperm(batch.batch_size, generator=torch.Generator().manual_seed(seed))
    return batch.select(perm), perm


# --------------------------------------------------------------------------- policy-loss inputs
def token_loss_inputs(logr, adv, mask=None, *, old: float = -1.0, extras=None) -> tuple[RolloutBatch, Tensor]:
    """A float64 batch and leaf log-probs for a PolicyLoss: log-ratios ``logr`` (B, T) against old log-probs ``old``,
    advantages ``adv`` ((B,) broadcast over tokens, or (B, T)), optional ``extras``."""
    F64 = torch.float64
    logr = torch.as_tensor(logr, dtype=F64)
    B, T = logr.shape
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T).clone() if adv.dim() == 1 else adv
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    old_lp = torch.full((B, T), old, dtype=F64)
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old_lp, dtype=F64)
    if extras:
        b = b.replace(extras=extras)
    return b, (old_lp + logr).requires_grad_(True)


def run_token_loss(loss_fn, logr, adv, mask=None, **kw):
    """Call a PolicyLoss on :func:`token_loss_inputs`; returns (per-token loss, d sum / d logprobs, metrics)."""
    b, lp = token_loss_inputs(logr, adv, mask, **kw)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    return out.per_token.detach(), lp.grad, out.metrics


# --------------------------------------------------------------------------- collection-stage fakes
class EchoGenerator:
    """A model-free generator: every completion is "7"; records the prompt texts it was given."""

    def __init__(self):
        self.seen: list[str] = []

    def generate(self, prompts, params, **_):
        self.seen += prompts
        n = len(prompts)
        return GenerationOutput(
            prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
            response_ids=torch.ones(n, 2, dtype=torch.long), response_attn=torch.ones(n, 2, dtype=torch.bool),
            sampler_logprobs=torch.zeros(n, 2), truncated=torch.zeros(n, dtype=torch.bool), completions=["7"] * n)

    def sync_weights(self):
        pass


def exact_reward(prompts, completions, columns):
    """1 where the completion equals the ``answer`` column, else 0; (rewards (B,), components (B, 1))."""
    r = torch.tensor([float(c == a) for c, a in zip(completions, columns["answer"])])
    return r, r[:, None]


def write_small_gguf(path) -> None:
    """A one-tensor GGUF file (a 64 x 32 embedding of ones) at ``path``, for tests of damaged model files."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------- multi-turn episode batches
def tool_episode_batch(turns, rewards=None, group_ids=None, *, turn_rewards=None, turn_tool_calls=None,
                  invalid_tool_calls=None, max_turns: int | None = None, T: int | None = None,
                  extras: dict[str, Tensor] | None = None, dtype=torch.float32) -> RolloutBatch:
    """A batch laid out as ``rollout.mode: episodes`` lays out its rows, built by hand.

    ``turns[i]`` lists row i's policy turns as ``(policy_tokens, observation_tokens)``: turn t's reply tokens, then
    the observation answering it, both with ``turn_ids == t``; ``response_mask`` is True on policy tokens only,
    ``response_attn`` on both; columns after the row's last token are padding (turn id 0). Extras as the rollout
    writes them: ``turn_rewards`` (B, max_turns; default zeros), ``turn_tool_calls`` (B, max_turns; default zeros),
    ``env_return`` / ``tool_calls`` / ``invalid_tool_calls`` / ``num_turns`` / ``episode_done`` (B,).
    ``rewards`` default to the per-turn rewards' sum (the ``env_return`` reward).
    """
    B = len(turns)
    K = max_turns or max(1, max(len(r) for r in turns))
    width = max(1, max(sum(p + o for p, o in r) for r in turns))
    T = T or width
    mask = torch.zeros(B, T, dtype=torch.bool)
    attn = torch.zeros(B, T, dtype=torch.bool)
    tid = torch.zeros(B, T, dtype=torch.long)
    for i, row in enumerate(turns):
        at = 0
        for t, (p, o) in enumerate(row):
            mask[i, at:at + p] = True
            attn[i, at:at + p + o] = True
            tid[i, at:at + p + o] = t
            at += p + o

    def per_turn(v):
        if v is None:
            return torch.zeros(B, K, dtype=dtype)
        out = torch.zeros(B, K, dtype=dtype)
        for i, r in enumerate(v):
            out[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
        return out

    tr, tc = per_turn(turn_rewards), per_turn(turn_tool_calls)
    rewards = tr.sum(-1) if rewards is None else _t(rewards, dtype)
    bad = torch.zeros(B, dtype=dtype) if invalid_tool_calls is None else _t(invalid_tool_calls, dtype)
    ex = {"turn_rewards": tr, "turn_tool_calls": tc, "env_return": tr.sum(-1), "tool_calls": tc.sum(-1),
          "invalid_tool_calls": bad, "num_turns": torch.tensor([float(len(r)) for r in turns]),
          "episode_done": torch.ones(B), "policy_mask": mask.clone()}
    ex.update(extras or {})
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
        response_ids=torch.zeros(B, T, dtype=torch.long), response_mask=mask, response_attn=attn,
        group_ids=torch.zeros(B, dtype=torch.long) if group_ids is None else _t(group_ids, torch.long),
        rewards=rewards, sampler_logprobs=torch.zeros(B, T, dtype=dtype), turn_ids=tid, extras=ex,
    )


# --------------------------------------------------------------------------- preference pairs
def pair_case(policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, requires_grad=True):
    """A PreferenceBatch and PairLogps from per-token log-prob lists (one list per pair and side; ragged lists are
    right-padded with 0 and masked), float64; the policy's tensors require grad. Returns (batch, policy, ref)."""
    from lmpo.batch import PreferenceBatch
    from lmpo.methods.base import PairLogps

    def pad(rows):
        T = max(len(r) for r in rows)
        vals = torch.tensor([list(r) + [0.0] * (T - len(r)) for r in rows], dtype=torch.float64)
        return vals, torch.tensor([[t < len(r) for t in range(T)] for r in rows])

    pc, cm = pad(policy_chosen)
    pr, rm = pad(policy_rejected)
    n = len(policy_chosen)
    batch = PreferenceBatch(prompt_ids=torch.ones(n, 1, dtype=torch.long), chosen_ids=torch.ones_like(cm, dtype=torch.long),
                            chosen_mask=cm, rejected_ids=torch.ones_like(rm, dtype=torch.long), rejected_mask=rm)
    policy = PairLogps(pc.requires_grad_(requires_grad), pr.requires_grad_(requires_grad))
    ref = None
    if ref_chosen is not None:
        ref = PairLogps(pad(ref_chosen)[0], pad(ref_rejected)[0])
    return batch, policy, ref


def smollm2_tokenizer():
    """The shipped SmolLM2 model's tokenizer from lmpo's model cache; skips the test when it is not there."""
    import glob
    import os

    import pytest
    from transformers import AutoTokenizer

    root = os.environ.get("LMPO_CACHE", os.path.expanduser("~/.cache/lmpo"))
    found = glob.glob(os.path.join(root, "models", "SmolLM2*", "tokenizer.json"))
    if not found:
        pytest.skip("the SmolLM2 tokenizer is not in the lmpo cache (run lmpo with model.name=default once)")
    return AutoTokenizer.from_pretrained(os.path.dirname(found[0]))


def step_batch(rows, rewards=None, group_ids=None, T=None, token_rewards=None):
    """A batch laid out as the process_credit planner lays it out: ``rows`` gives per row a list of (step score,
    step length in tokens); the score sits on the step's last token (``token_rewards``), ``turn_ids`` number the
    steps, extras ``step_rewards`` / ``step_ends`` / ``num_steps``."""
    T = T or max(sum(n for _, n in r) for r in rows)
    B, S = len(rows), max(len(r) for r in rows)
    mask = torch.zeros(B, T, dtype=torch.bool)
    turn = torch.zeros(B, T, dtype=torch.long)
    tok = torch.zeros(B, T)
    sr, se, ns = torch.zeros(B, S), torch.full((B, S), -1, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for i, r in enumerate(rows):
        t = 0
        for k, (score, n) in enumerate(r):
            mask[i, t:t + n], turn[i, t:t + n] = True, k
            t += n
            tok[i, t - 1], sr[i, k], se[i, k] = score, score, t - 1
        ns[i] = len(r)
    if token_rewards is not None:
        tok = tok + token_rewards
    return RolloutBatch(prompt_ids=torch.ones(B, 1, dtype=torch.long), response_ids=torch.ones(B, T, dtype=torch.long),
                        response_mask=mask, response_attn=mask.clone(),
                        group_ids=torch.tensor(group_ids or [0] * B), rewards=torch.tensor(rewards or [0.0] * B),
                        sampler_logprobs=torch.zeros(B, T), token_rewards=tok, turn_ids=turn,
                        extras={"step_rewards": sr, "step_ends": se, "num_steps": ns})
