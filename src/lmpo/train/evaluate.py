"""Held-out evaluation: greedy accuracy, mean reward and (optionally) pass@k on fixed eval prompts."""

from __future__ import annotations

from dataclasses import replace

import torch

from lmpo.engine.device import rng_devices

from lmpo.train.rollouts import RolloutContext, score


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, arXiv:2107.03374, Eq. 1)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def evaluate(ctx: RolloutContext, rows: list[dict], max_new_tokens: int, correct_threshold: float,
             pass_k: int = 0) -> dict[str, float]:
    """Greedy decoding on ``rows``; a completion is correct when its first reward component >= threshold.

    Runs inside ``torch.random.fork_rng`` so evaluating never changes the training run's random stream.
    """
    if not rows:
        return {}
    if getattr(ctx.train_generator, "plays_episodes", False):  # rollout.mode=episodes: the task is its environment
        ctx = replace(ctx, generator=ctx.train_generator, train_generator=None)
    with torch.random.fork_rng(devices=rng_devices()):
        greedy = replace(ctx.params, greedy=True, max_new_tokens=max_new_tokens)
        batch = score(ctx, rows, 1, greedy)
        correct = batch.reward_components[:, 0] >= correct_threshold
        out = {
            "eval/accuracy": correct.float().mean().item(),
            "eval/reward": batch.rewards.float().mean().item(),
            "eval/length": batch.response_attn.float().sum(-1).mean().item(),
            "eval/truncated": batch.truncated.float().mean().item(),
        }
        if "num_turns" in batch.extras:  # multi-turn episodes
            out["eval/turns"] = batch.extras["num_turns"].float().mean().item()
            out["eval/invalid_actions"] = batch.extras["invalid_actions"].float().mean().item()
            calls, bad = batch.extras["tool_calls"].float(), batch.extras["invalid_tool_calls"].float()
            out["eval/tool_calls"] = calls.mean().item()
            out["eval/invalid_tool_calls"] = bad.mean().item()
            out["eval/tool_errors"] = batch.extras["tool_errors"].float().mean().item()
            # tool-call validity: the share of calls that were well-formed, of a known tool, with valid arguments
            out["eval/valid_tool_call_frac"] = ((calls.sum() - bad.sum()) / calls.sum()).item() if calls.sum() else 0.0
        if pass_k > 0:
            sampled = score(ctx, rows, pass_k, replace(ctx.params, max_new_tokens=max_new_tokens))
            c = (sampled.reward_components[:, 0] >= correct_threshold).view(len(rows), pass_k).sum(-1)
            out[f"eval/pass@{pass_k}"] = sum(pass_at_k(pass_k, int(ci), pass_k) for ci in c) / len(rows)
            out["eval/sampled_accuracy"] = c.float().sum().item() / (len(rows) * pass_k)
    return out
