"""ALP: Adaptive Layerwise Perturbation, one importance ratio for staleness and training-inference mismatch.

Paper: "Adaptive Layerwise Perturbation: Unifying Off-Policy Corrections for LLM RL", arXiv:2603.19470
(official code Chenluye99/Adaptive-Layerwise-Perturbation, a verl/SimpleTIR patch of the decoder layers).

Training forward only: the input hidden state of every perturbed decoder layer l becomes h_l + sigma_l * eps_l,
eps_l ~ N(0, I) (detached). The ratio's numerator is this perturbed training policy, its denominator the unchanged
rollout-engine probability (``sampler_logprobs``), with no further truncation or masking terms:
  token level:    rho_t = pi_{theta,sigma}(y_t | .) / pi_infer(y_t | .)
  sequence level: rho_i = exp((1/|y_i|) sum_t log rho_t)   (GSPO-style length normalisation, the paper's best
                  variant; implemented in the GSPO-token form sg[rho_i] * pi(y_t)/sg[pi(y_t)], arXiv:2507.18071 Eq. 13)
  J = E[min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)] with group-normalised A (GRPO advantages).

Differs from GRPO: the ratio is taken against the sampler's log-probs (not a recomputed pi_old), the numerator comes
from a noise-perturbed forward pass, and the clip range is wide (0.5 / 3.0 in the released sequence-level runs).

Gaps filled (fidelity "reconstructed"):
- sigma_l is a fixed per-run constant (``noise_std``, the README example's perturb_std 1e-6); the optional
  learnable log-scales s_l with their own learning rate (perturb_lr 5e-4) are not implemented: they would need extra
  parameters in the optimizer;
- eps_low / eps_high are read as verl's clip_ratio_low / clip_ratio_high, i.e. rho is clipped to [1 - 0.5, 1 + 3.0];
- the noise of row b at layer l is drawn from a generator seeded by (``extras["noise_seed"][b]``, l), drawn once per
  training step by the trainer, so a recomputed forward sees the same noise and micro-batching does not change it.
The noise lives in the trainer's forward hook (``needs`` lists "layer_noise"; :func:`lmpo.models.logprobs.layer_noise`);
this module only says which layers and how much (``layer_noise()``). Sampling, old and reference passes are never
perturbed. Outside the trainer (no hook) the loss is the "bypass" objective pi_train / pi_infer with the same clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import Rule, hp, ordered
from lmpo.models.logprobs import LayerNoise
from lmpo.registry import LOSSES

LEVELS = ("sequence", "token")


@LOSSES.register("alp", paper="Adaptive Layerwise Perturbation: Unifying Off-Policy Corrections for LLM RL",
                 arxiv="2603.19470", fidelity="reconstructed")
@dataclass(frozen=True)
class ALPLoss:
    """Clipped surrogate with ratio pi_{theta,sigma}/pi_infer (token or sequence level) and layer-wise input noise.

    Args:
        epsilon / epsilon_high: clip range of the ratio (clip to [1 - epsilon, 1 + epsilon_high]).
        level: "sequence" (length-normalised sequence ratio, the paper's best) or "token".
        noise_std: sigma of every perturbed layer (0 disables the perturbation).
        noise_first_layer / noise_last_layer: perturbed decoder layers, inclusive (default: all).
    """

    epsilon: float = hp(0.5, ge=0, le=1)
    epsilon_high: float = hp(3.0, ge=0)
    level: str = hp("sequence", choices=LEVELS)
    noise_std: float = hp(1e-6, ge=0)
    noise_first_layer: int = hp(0, ge=0)
    noise_last_layer: int | None = None
    needs: ClassVar[frozenset[str]] = frozenset({"sampler_logprobs", "layer_noise"})
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("noise_first_layer", "noise_last_layer"),)

    def layer_noise(self) -> LayerNoise | None:
        """The trainer's forward hook: which decoder layers get N(0, noise_std^2) added to their input."""
        if self.noise_std == 0:
            return None
        return LayerNoise(self.noise_std, self.noise_first_layer, self.noise_last_layer)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        denom = batch.sampler_logprobs
        if self.level == "sequence":
            seq = ops.sequence_log_ratio(logprobs, denom, mask)  # (B,) mean_t log(pi/pi_infer), clamped
            log_ratio = seq.detach()[:, None] + logprobs - logprobs.detach()
        else:
            log_ratio = ops.log_ratio(logprobs, denom)
        ratio = log_ratio.exp()
        loss, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, self.epsilon_high, None)
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
            "loss/ratio_max": ops.zero_outside(ratio, mask).max().detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


# README example: all layers, perturb_std 1e-6, sequence-level ratio, clip_ratio_low 0.5 / clip_ratio_high 3.0.
PRESETS = {
    "alp": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "alp", "epsilon": 0.5, "epsilon_high": 3.0, "level": "sequence", "noise_std": 1e-6},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
