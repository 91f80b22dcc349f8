"""OPRL / iStar: an implicit process reward model trained online with a trajectory DPO loss; its per-step log-ratio
to the rollout policy is the step credit added to the episode-level advantage.

Paper: "Online Process Reward Learning for Agentic Reinforcement Learning" (earlier "Agentic Reinforcement Learning
with Implicit Step Rewards", method iStar), arXiv:2509.19199 (code: Tongyi-ConvAI/Tongyi-Character, CharacterRL-iStar).

With pi_phi the PRM (a causal LM), pi_old the policy that sampled the batch, and log pi(tau | x) summed over the
agent's action tokens only (``response_mask``: observation tokens excluded):

  J_PRM(phi) = -E log sigma( beta [log pi_phi(tau+|x) - log pi_old(tau+|x)] - beta [log pi_phi(tau-|x) - log pi_old(tau-|x)] )
  r_phi(i, t) = beta * sum_{tokens k of step t} ( log pi_phi(a_k | ...) - log pi_old(a_k | ...) )     (implicit step reward)
  A^E_i = (R_i - mean_g R) / (std_g R + eps)                                                           (GRPO, episode level)
  A^S_{i,t} = (r_phi(i,t) - mean_{g, steps} r_phi) / (std_{g, steps} r_phi + eps)
  A_{i,t} = A^E_i + omega * A^S_{i,t}, on the tokens of step t

Pairs (tau+, tau-): every two episodes of one group whose outcomes differ (the better one is tau+). One AdamW step of
the PRM per batch (``learning_rate``), after its step rewards are read (``update: after``, the released scripts'
setting: a batch is credited by the PRM that has not yet fitted it), or before (``before``), or never (``none``).

Reconstructed (fidelity "reconstructed", from the card): pi_old's log-probs are the sampler's (``sampler_logprobs``:
exact for plain temperature-1 sampling, as in the tiny preset; the sampling temperature otherwise enters them);
the PRM is a separate model given by ``prm`` (any spec lmpo loads; set it to the policy's model so it starts as the
paper's copy of the policy); all ordered pairs of a group, not one best/worst pair; the step normalisation pools a
group's played steps (population std, a pool of one step gives 0). The PRM's weights and AdamW state are saved in
checkpoints (``state_dict``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.advantage.grpo import GRPOAdvantage, outcome_returns
from lmpo.methods.params import hp
from lmpo.methods.turns import played, token_turns, turn_layout, turns_to_tokens
from lmpo.registry import ADVANTAGES


def implicit_step_rewards(prm_lp: Tensor, old_lp: Tensor, batch: RolloutBatch, M: int, beta: float) -> Tensor:
    """(B, M) r_phi: beta x the PRM-vs-pi_old log-ratio summed over each step's action tokens."""
    diff = ops.zero_outside((prm_lp - old_lp).double(), batch.response_mask)
    turns = token_turns(batch).clamp(0, M - 1)
    return beta * torch.zeros(diff.shape[0], M, dtype=torch.float64, device=diff.device).scatter_add(1, turns, diff)


def dpo_pair_loss(seq_logratio: Tensor, outcome: Tensor, group_ids: Tensor, beta: float) -> tuple[Tensor, int]:
    """Mean over ordered pairs (i better than j, same group) of -log sigma(beta (s_i - s_j)); (0, 0) without pairs.
    ``seq_logratio``: (B,) log pi_phi(tau) - log pi_old(tau) over action tokens."""
    same = group_ids[:, None] == group_ids[None, :]
    better = (outcome[:, None] > outcome[None, :]) & same
    if not bool(better.any()):
        return seq_logratio.sum() * 0.0, 0
    margin = beta * (seq_logratio[:, None] - seq_logratio[None, :])
    return -F.logsigmoid(margin[better]).mean(), int(better.sum())


def step_advantages(step_r: Tensor, num_turns: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """(B, M) step rewards z-scored over the played steps of each group (population std); 0 on unplayed steps."""
    B, M = step_r.shape
    live = played(num_turns, M)
    pool = group_ids[:, None].expand(B, M)[live]
    vals = step_r[live]
    std = ops.group_std(vals, pool, unbiased=False)
    z = torch.zeros_like(step_r)
    z[live] = ops.group_centered(vals, pool) / (std + eps)
    return z


@ADVANTAGES.register("oprl", paper="Online Process Reward Learning for Agentic Reinforcement Learning (iStar: "
                     "implicit step rewards)", arxiv="2509.19199", fidelity="reconstructed")
@dataclass
class OPRLAdvantage:
    """GRPO's episode advantage + omega x z-scored implicit step rewards of a PRM trained online by trajectory DPO.

    Args:
        prm: the implicit PRM's model spec (shares the policy's tokenizer; start it from the policy's model).
        beta: the DPO / implicit-reward temperature (0.05). learning_rate: the PRM's AdamW step size (1e-6).
        step_weight: omega (1.0). update: ``after`` | ``before`` | ``none`` (module docstring). eps: std guard.
    """

    prm: str = "tiny"
    beta: float = hp(0.05, gt=0)
    learning_rate: float = hp(1e-6, gt=0)
    step_weight: float = hp(1.0, ge=0)
    update: str = hp("after", choices=("after", "before", "none"))
    eps: float = hp(1e-6, ge=0)
    dtype: str = hp("float32", choices=("float32", "bfloat16"))
    needs: ClassVar[frozenset[str]] = frozenset({"sampler_logprobs"})

    def model(self) -> tuple[Any, torch.optim.Optimizer]:
        if "_prm" not in self.__dict__:
            from lmpo.engine.device import run_device
            from lmpo.models.load import load_model

            model = load_model(self.prm, dtype=self.dtype)[0].requires_grad_(True).to(run_device())
            self.__dict__["_prm"] = (model, torch.optim.AdamW(model.parameters(), lr=self.learning_rate))
            self.__dict__["updates"] = 0
        return self.__dict__["_prm"]

    def prm_logprobs(self, batch: RolloutBatch, grad: bool) -> Tensor:
        """(B, T) the PRM's log-probs of the response tokens, on the host (``.cpu()`` keeps the graph)."""
        from lmpo.models.logprobs import response_logprobs

        model = self.model()[0]
        vocab = model.get_input_embeddings().weight.shape[0]
        if int(batch.response_ids.max()) >= vocab or int(batch.prompt_ids.max()) >= vocab:
            raise DataError(f"advantage oprl: the batch holds token ids beyond the PRM {self.prm!r}'s vocabulary "
                            f"({vocab}); the PRM must share the policy's tokenizer.")
        attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
        with torch.enable_grad() if grad else torch.no_grad():
            return response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, attn)[0].cpu()

    def fit(self, batch: RolloutBatch, prm_lp: Tensor) -> float:
        """One DPO step of the PRM on the batch's pairs (``prm_lp`` with its graph); returns the loss."""
        model, opt = self.model()
        ratio = ops.masked_sum(prm_lp - batch.sampler_logprobs, batch.response_mask, dim=-1)
        loss, pairs = dpo_pair_loss(ratio, outcome_returns(batch), batch.group_ids, self.beta)
        if pairs:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.__dict__["updates"] += 1
        return float(loss.detach())

    def __call__(self, batch: RolloutBatch) -> Tensor:
        n, layout = turn_layout(batch)
        if self.update == "before":
            self.fit(batch, self.prm_logprobs(batch, grad=True))
        lp = self.prm_logprobs(batch, grad=self.update == "after")
        step_r = implicit_step_rewards(lp.detach(), batch.sampler_logprobs, batch, layout.shape[1], self.beta)
        if self.update == "after":
            self.fit(batch, lp)
        a_s = step_advantages(step_r, n.to(step_r.device), batch.group_ids, self.eps)
        return GRPOAdvantage(eps=self.eps)(batch) + self.step_weight * turns_to_tokens(a_s, batch)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The PRM's weights and AdamW state, serialised (``bytes``: a snapshot that compares with ``==``)."""
        model, opt = self.model()
        buf = io.BytesIO()
        torch.save({"prm": model.state_dict(), "optimizer": opt.state_dict()}, buf)
        return {"prm": buf.getvalue(), "updates": self.__dict__["updates"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"prm", "updates"}:
            raise DataError(f"OPRLAdvantage.load_state_dict: the saved state has keys {sorted(state)}, expected "
                            "['prm', 'updates'] (a checkpoint of another component?).")
        model, opt = self.model()
        saved = torch.load(io.BytesIO(state["prm"]), weights_only=True)
        model.load_state_dict(saved["prm"])
        opt.load_state_dict(saved["optimizer"])
        self.__dict__["updates"] = int(state["updates"])


# Released scripts: beta 0.05, PRM lr 1e-6 updated after each rollout batch, omega 1.0 on a GRPO base (clip 0.2).
# The KL setting of the recipe was not recovered: none here.
PRESETS = {
    "oprl": {
        "advantage": {"name": "oprl", "beta": 0.05, "learning_rate": 1e-6, "step_weight": 1.0, "update": "after"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
