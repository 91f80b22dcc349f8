"""Preplan-and-Anchor: attention-derived credit, GRPO's non-negative advantages amplified on anchor tokens and on the
preplan tokens that introduce them (coupled rhythm credit).

Paper: "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy Optimization",
2025, arXiv:2510.13554 (no released code found); the equations below are the paper's Eqs. 7-18 as restated by a
third-party implementation spec (the card), with A^{l,h} the policy's attention maps on prompt + reply:
  head distance  d_{l,h} = mean_{t in R} sum_{s <= t} A^{l,h}_{t,s} (t - s); local heads = the lowest ``head_quantile``
                 of d, global heads = the highest; A_loc, A_glob = their mean maps
  WAAD_t = sum_{s <= t} A_loc[t, s] min(t - s, W)                   (windowed average attention distance)
  FAI_s  = mean_{t : s + H_lo <= t <= min(N, s + H_hi)} A_glob[t, s]  (future attention influence; N = last position)
  delta_t = |WAAD_t - WAAD_{t+1}|;  anchors T_glob = the top-q reply tokens by FAI
  D = {t in T_glob : WAAD_t <= tau_w and max_{u in [t-k, t-1]} delta_u >= tau_d} (locally dominated anchors),
  intro(t) = argmax_{u in [t-k, t-1]} delta_u, I(D) = {intro(t) : t in D};  tau_w, tau_d = medians over the reply
  gamma_t = 1 + (g - 1) 1[t in T_glob \\ D] + (1 - a)(g - 1) 1[t in D] + a (g - 1) 1[t in I(D)]
  A~_{i,t} = gamma_t A_i when A_i >= 0, else A_i         (A_i GRPO's advantage; the shaping is detached)
g = 1 (or no attention scores) is GRPO exactly.

The maps come from the policy itself during collection (this component's ``after_score``: one no-grad forward per
reply with eager attention on the in-process generator's model, ``rollout.backend: hf``), from ``layers`` evenly
spaced layers of the middle third (all layers when the model has fewer); rows are run 32 at a time with
padding, and each row's map is cut out of the padded one (masked keys get no attention); gamma is stored in
``extras["credit_scale"]`` (B, horizon).

Gaps filled (fidelity "reconstructed"): no official code; the starred defaults of the spec (g = 1.5, a = 0.5, k = 3,
medians as thresholds) may be the spec's own; the local-chunk and global-anchor single variants are not separate
presets (g with a = 0 / 1 approximates them); WAAD_{t+1} past the reply's end is taken as WAAD_t (delta 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def waad(a: Tensor, window: int) -> Tensor:
    """WAAD_t = sum_s A[t, s] min(t - s, W) for a causal map A (N, N)."""
    N = a.shape[-1]
    dist = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).clamp(min=0, max=window).to(a.dtype)
    return (a * dist).sum(-1)


def fai(a: Tensor, h_lo: int, h_hi: int) -> Tensor:
    """FAI_s = mean of A[t, s] over t in [s + h_lo, min(N - 1, s + h_hi)] (0 when that range is empty)."""
    N = a.shape[-1]
    t, s = torch.arange(N)[:, None], torch.arange(N)[None, :]
    win = ((t >= s + h_lo) & (t <= s + h_hi)).to(a.dtype)
    return (a * win).sum(0) / win.sum(0).clamp(min=1)


def head_maps(att: Tensor, start: int, quantile: float) -> tuple[Tensor, Tensor]:
    """(A_loc, A_glob) (N, N): mean maps of the heads with the lowest / highest mean attention distance over the
    reply positions ``start..N-1``; ``att`` (heads, N, N)."""
    N = att.shape[-1]
    dist = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).clamp(min=0).to(att.dtype)
    d = (att[:, start:] * dist[start:]).sum(-1).mean(-1)
    n = max(1, int(round(quantile * att.shape[0])))
    order = torch.argsort(d)
    return att[order[:n]].mean(0), att[order[-n:]].mean(0)


def rhythm_gamma(att: Tensor, start: int, *, window: int = 10, h_lo: int = 10, h_hi: int = 50, q: float = 0.4,
                 head_quantile: float = 0.3, g: float = 1.5, alpha: float = 0.5, k: int = 3) -> Tensor:
    """gamma_t (n,) for the reply positions ``start..N-1`` from attention maps ``att`` (heads, N, N)."""
    loc, glob = head_maps(att, start, head_quantile)
    w = waad(loc, window)[start:]
    f = fai(glob, h_lo, h_hi)[start:]
    n = w.shape[0]
    delta = torch.cat([(w[:-1] - w[1:]).abs(), w.new_zeros(1)])
    top = max(1, int(round(q * n)))
    anchors = set(torch.argsort(f, descending=True, stable=True)[:top].tolist())
    tau_w, tau_d = w.median(), delta.median()
    gamma = torch.ones(n, dtype=att.dtype)
    for t in sorted(anchors):
        lo = max(0, t - k)
        if t > lo and w[t] <= tau_w and delta[lo:t].max() >= tau_d:  # a locally dominated anchor
            gamma[t] += (1 - alpha) * (g - 1)
            gamma[lo + int(torch.argmax(delta[lo:t]))] += alpha * (g - 1)
        else:
            gamma[t] += g - 1
    return gamma


def middle_layers(L: int, n: int) -> list[int]:
    """``n`` evenly spaced layers of the middle third of ``L`` (all layers when L < 3)."""
    if L < 3:
        return list(range(L))
    mid = list(range(L // 3, 2 * L // 3))
    n = min(n, len(mid))
    return sorted({mid[round(j * (len(mid) - 1) / max(1, n - 1))] for j in range(n)})


@ADVANTAGES.register("preplan_anchor", paper="Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm "
                     "Enables Fine-Grained Policy Optimization", arxiv="2510.13554", fidelity="reconstructed")
@dataclass(frozen=True)
class PreplanAnchorAdvantage:
    """GRPO advantage x gamma_t (coupled rhythm credit) where the advantage is >= 0 (module docstring)."""

    g: float = hp(1.5, ge=1)
    alpha: float = hp(0.5, ge=0, le=1)
    k: int = hp(3, ge=1)
    q: float = hp(0.4, gt=0, le=1)
    window: int = hp(10, ge=1)
    h_lo: int = hp(10, ge=0)
    h_hi: int = hp(50, ge=0)
    head_quantile: float = hp(0.3, gt=0, le=0.5)
    layers: int = hp(5, ge=1)
    horizon: int = hp(64, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()

    @torch.no_grad()
    def after_score(self, ctx: Any, batch: RolloutBatch) -> RolloutBatch:  # ScoreAugmenter: attention -> gamma
        model = getattr(ctx.generator, "model", None)
        if model is None or not hasattr(model, "set_attn_implementation"):
            raise DataError("advantage: preplan_anchor reads the policy's attention maps from the in-process model; "
                            "use rollout.backend=hf.")
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        scale = torch.ones(batch.batch_size, self.horizon)
        prev = model.config._attn_implementation
        was_training = model.training
        model.eval()
        model.set_attn_implementation("eager")
        try:
            pick = middle_layers(model.config.num_hidden_layers, self.layers)
            device = next(model.parameters()).device
            pm = batch.prompt_mask if batch.prompt_mask is not None else torch.ones_like(batch.prompt_ids, dtype=torch.bool)
            ids_all = torch.cat([batch.prompt_ids, batch.response_ids], 1)
            mask_all = torch.cat([pm, attn], 1)
            for c0 in range(0, batch.batch_size, 32):  # padded rows in one forward; each row's map is cut out
                ids, m = ids_all[c0:c0 + 32], mask_all[c0:c0 + 32]
                pos = (m.long().cumsum(-1) - 1).clamp_min(0)
                out = model(input_ids=ids.to(device), attention_mask=m.long().to(device),
                            position_ids=pos.to(device), output_attentions=True)
                for j in range(ids.shape[0]):
                    i = c0 + j
                    live = m[j].nonzero().flatten()
                    cols = attn[i].nonzero().flatten()
                    if not len(cols):
                        continue
                    live_d = live.to(device)
                    att = torch.cat([out.attentions[layer][j][:, live_d][:, :, live_d] for layer in pick]).float().cpu()
                    gam = rhythm_gamma(att, int(pm[i].sum()), window=self.window, h_lo=self.h_lo, h_hi=self.h_hi,
                                       q=self.q, head_quantile=self.head_quantile, g=self.g, alpha=self.alpha, k=self.k)
                    keep = cols < self.horizon
                    scale[i, cols[keep]] = gam[keep].to(scale.dtype)
        finally:
            model.set_attn_implementation(prev)
            model.train(was_training)
        return batch.replace(extras={**batch.extras, "credit_scale": scale})

    def __call__(self, batch: RolloutBatch) -> Tensor:
        adv = GRPOAdvantage()(batch)
        sc = batch.extras.get("credit_scale")
        if sc is None or self.g == 1:
            return adv
        gamma = ops.fit_width(sc.detach(), adv, fill=1.0)
        return ops.zero_outside(torch.where(adv >= 0, gamma * adv, adv), batch.response_mask)


PRESETS = {
    "preplan_anchor": {
        "advantage": {"name": "preplan_anchor", "g": 1.5, "alpha": 0.5, "k": 3, "q": 0.4, "window": 10,
                      "h_lo": 10, "h_hi": 50},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
