"""Loss aggregation: how per-token losses become one scalar, kept apart from the surrogate.

``normaliser(mask, horizon)`` is computed once on the whole (global) batch and ``__call__`` sums the micro-batch's
contributions and divides by it, so accumulating gradients over micro-batches gives exactly the full-batch loss.

- token_mean:              sum_{i,t} l_{i,t} / sum_i |o_i|            DAPO, arXiv:2503.14476 Eq. 12
- seq_mean_token_mean:     (1/G) sum_i (1/|o_i|) sum_t l_{i,t}        GRPO, arXiv:2402.03300 Eq. 3
- seq_mean_token_sum_norm: sum_{i,t} l_{i,t} / (G * L_max)           Dr. GRPO, arXiv:2503.20783 (constant L_max)
- seq_mean_token_sum:      (1/G) sum_i sum_t l_{i,t}                  REINFORCE/RLOO sequence-level, arXiv:2402.14740
- token_sum:               sum_{i,t} l_{i,t}                          no normalisation (verl's loss_agg_mode "token-sum")

verl's names for the same reductions (``core_algos.agg_loss``): token-mean, seq-mean-token-mean, seq-mean-token-sum,
seq-mean-token-sum-norm and token-sum. verl's seq-mean-token-sum-norm divides by the *padded* width of the batch
(``loss_mask.shape[-1]``) unless ``loss_scale_factor`` is given; lmpo divides by the generation budget. Set
``aggregator.horizon`` to the padded width to reproduce verl (tests/unit/test_peer_parity.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmpo import ops
from lmpo.registry import AGGREGATORS


def _n_seqs(mask: Tensor) -> Tensor:
    # Rows with no trainable token (e.g. fully masked by overlong filtering) do not count as sequences.
    return mask.any(-1).to(torch.float32).sum()


@AGGREGATORS.register("token_mean", paper="DAPO (token-level policy gradient loss)", arxiv="2503.14476")
@dataclass(frozen=True)
class TokenMean:
    """Every token of the batch weighs the same: sum l / number of tokens (DAPO, arXiv:2503.14476 Eq. 12)."""

    def normaliser(self, mask: Tensor, horizon: int) -> Tensor:
        return mask.to(torch.float32).sum()

    def __call__(self, per_token: Tensor, mask: Tensor, normaliser: Tensor) -> Tensor:
        return ops.masked_sum(per_token, mask) / normaliser.clamp_min(1.0)


@AGGREGATORS.register("seq_mean_token_mean", paper="DeepSeekMath (GRPO objective)", arxiv="2402.03300")
@dataclass(frozen=True)
class SeqMeanTokenMean:
    """Mean over sequences of each sequence's token mean (GRPO, arXiv:2402.03300 Eq. 3)."""

    def normaliser(self, mask: Tensor, horizon: int) -> Tensor:
        return _n_seqs(mask)

    def __call__(self, per_token: Tensor, mask: Tensor, normaliser: Tensor) -> Tensor:
        per_seq = ops.masked_mean(per_token, mask, dim=-1)
        return per_seq.sum() / normaliser.clamp_min(1.0)


@AGGREGATORS.register("seq_mean_token_sum_norm", paper="Understanding R1-Zero-Like Training (Dr. GRPO)", arxiv="2503.20783")
@dataclass(frozen=True)
class SeqMeanTokenSumNorm:
    """Token sum divided by a constant G * L_max (Dr. GRPO, arXiv:2503.20783): no length bias.

    Args:
        horizon: the constant L_max; ``None`` uses the generation budget (``rollout.max_new_tokens``). It is a
            parameter, never the padded tensor width, so extra padding cannot change the loss.
    """

    horizon: int | None = None

    def normaliser(self, mask: Tensor, horizon: int) -> Tensor:
        h = self.horizon if self.horizon is not None else horizon
        return _n_seqs(mask) * float(h)

    def __call__(self, per_token: Tensor, mask: Tensor, normaliser: Tensor) -> Tensor:
        return ops.masked_sum(per_token, mask) / normaliser.clamp_min(1.0)


@AGGREGATORS.register("seq_mean_token_sum", paper="Back to Basics (RLOO): sequence-level REINFORCE", arxiv="2402.14740")
@dataclass(frozen=True)
class SeqMeanTokenSum:
    """Mean over sequences of the token sum: the whole response is one action (arXiv:2402.14740 Sec. 3.1)."""

    def normaliser(self, mask: Tensor, horizon: int) -> Tensor:
        return _n_seqs(mask)

    def __call__(self, per_token: Tensor, mask: Tensor, normaliser: Tensor) -> Tensor:
        return ops.masked_sum(per_token, mask) / normaliser.clamp_min(1.0)


@AGGREGATORS.register("token_sum", arxiv="none", paper="no normalisation: verl loss_agg_mode token-sum "
                      "(https://github.com/volcengine/verl, verl/trainer/ppo/core_algos.py agg_loss)")
@dataclass(frozen=True)
class TokenSum:
    """The plain sum of every trained token's loss: sum_{i,t} l_{i,t} (verl's ``token-sum``).

    The gradient scales with the number of tokens of the batch, so the learning rate must be chosen for the batch
    size; it is the reduction whose per-token weight never depends on other tokens (no length or count bias at all).
    """

    def normaliser(self, mask: Tensor, horizon: int) -> Tensor:
        return torch.ones((), dtype=torch.float32, device=mask.device)

    def __call__(self, per_token: Tensor, mask: Tensor, normaliser: Tensor) -> Tensor:
        return ops.masked_sum(per_token, mask) / normaliser
