"""CALM: Credit Assignment with Language Models, a judge LM's subgoal verdicts as auxiliary per-turn rewards.

Paper: Pignatelli et al., "Assessing the Zero-Shot Capabilities of LLMs for Action Evaluation in RL" (CALM),
arXiv:2409.12798 (no code released). A language model decomposes the task into subgoals and judges, for each
state-action-next-state transition, whether a subgoal was just achieved; each achievement terminates an option and
pays an auxiliary reward added to the environment's (sparse) reward:

  r~_{i,t} = r_{i,t} + lambda * sum_{g in G} 1[judge(task, g, s_t, a_t, s_{t+1}) = achieved] * 1[g not achieved in
             episode i before turn t]

Here a transition is one policy turn of a ``rollout.mode: episodes`` row: s_t the prompt and everything before the
turn, a_t the turn's policy tokens, s_{t+1} the observation answering it. The bonus goes into
``extras["turn_rewards"]`` (what turn-level advantages read: GiGPO, IGPO, MatchTIR, ...) and into ``batch.rewards``
(their sum: the episode return seen by outcome-level advantages); ``extras["calm_bonus"]`` (B, max_turns) keeps it.

The judge (the adapter point: any scorer returning a probability per transition and subgoal) is
- ``judge: <model spec>`` (default): any causal LM lmpo loads (``tiny``, a GGUF file, a folder, a cached Hub id),
  sharing the policy's tokenizer; it reads the transition's tokens followed by ``template`` filled with the subgoal,
  and P(achieved) = sigmoid(logit(yes_token) - logit(no_token)) at the last position;
- ``judge: "package.module:function"``: ``function(transitions, subgoals) -> (N, G)`` probabilities, with
  ``transitions`` a list of :class:`Transition` (token ids); e.g. a learned judge from lmpo's reward models.
A subgoal is achieved when its probability exceeds ``threshold``.

Fidelity "reconstructed": the paper is an offline evaluation of zero-shot LLM judges (no policy is trained), so the
bonus size lambda, the once-per-subgoal rule and the per-turn granularity are reconstructed from its abstract and
options framing (the card); subgoals are given in the config (``subgoals``) rather than proposed by the LM, and the
binary verdict is read from two tokens' logits instead of a generated answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError, DataError
from lmpo.methods.params import hp
from lmpo.methods.turns import token_turns, turn_layout
from lmpo.registry import SHAPERS


class Transition(NamedTuple):
    """One policy turn: ``history`` (prompt + tokens before the turn: s_t), ``action`` (its policy tokens: a_t),
    ``observation`` (the tokens answering it: s_{t+1}; empty after the last turn). Token ids, lists of int."""

    row: int
    turn: int
    history: list[int]
    action: list[int]
    observation: list[int]


def transitions(batch: RolloutBatch) -> list[Transition]:
    """Every played turn of every row, in row then turn order (one turn per row without ``turn_ids``)."""
    attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
    turns, out = token_turns(batch), []
    for i in range(batch.batch_size):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]] if batch.prompt_mask is not None else batch.prompt_ids[i]
        ids, live, pol = batch.response_ids[i], attn[i], batch.response_mask[i]
        for t in torch.unique(turns[i][pol]).tolist():
            at = live & (turns[i] == t)
            start = int(torch.nonzero(at).min())
            out.append(Transition(i, int(t), prompt.tolist() + ids[:start][live[:start]].tolist(),
                                  ids[at & pol].tolist(), ids[at & ~pol].tolist()))
    return out


def first_achievements(achieved: Tensor, rows: list[int], turns: list[int], B: int, M: int) -> Tensor:
    """(B, M) count of subgoals achieved for the first time at each turn: ``achieved`` (N, G) bool per transition
    (rows/turns give its place); a subgoal pays once per episode, at its earliest achieved turn."""
    first = torch.full((B, achieved.shape[1]), M, dtype=torch.long)
    for n, (i, t) in enumerate(zip(rows, turns)):
        first[i] = torch.where(achieved[n], torch.minimum(first[i], torch.tensor(t)), first[i])
    count = torch.zeros(B, M + 1, dtype=torch.float64)
    count.scatter_add_(1, first, torch.ones_like(first, dtype=torch.float64))
    return count[:, :M]


@SHAPERS.register("calm", paper="Assessing the Zero-Shot Capabilities of LLMs for Action Evaluation in RL (CALM: "
                  "Credit Assignment with Language Models)", arxiv="2409.12798", fidelity="reconstructed")
@dataclass
class CALMShaper:
    """Adds ``bonus`` per subgoal the judge finds achieved (first time per episode) to that turn's reward.

    Args:
        subgoals: the task's subgoals (text the judge reads after ``template``'s ``{subgoal}``).
        judge: a model spec (a judge LM sharing the policy's tokenizer) or ``"module:function"`` (module docstring).
        bonus: lambda, the auxiliary reward per achieved subgoal. threshold: P(achieved) above which it counts.
        template: the question appended to the transition; yes_token / no_token: the verdict's two tokens.
        dtype, batch_size: the judge LM's parameter dtype and transitions per forward pass.
    """

    subgoals: list = field(default_factory=lambda: ["1"])
    judge: str = "tiny"
    bonus: float = hp(0.1, ge=0)
    threshold: float = hp(0.5, ge=0, lt=1)
    template: str = " {subgoal}="
    yes_token: str = "+"
    no_token: str = "="
    dtype: str = hp("float32", choices=("float32", "bfloat16", "float16"))
    batch_size: int = hp(32, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()
    registry_name: ClassVar[str] = "calm"

    def __post_init__(self) -> None:
        if not isinstance(self.subgoals, (list, tuple)) or not self.subgoals or \
                not all(isinstance(g, str) and g for g in self.subgoals):
            raise ConfigError(f"shapers: calm.subgoals must be a non-empty list of texts, got {self.subgoals!r}.")

    def scorer(self) -> Callable[[list[Transition], list[str]], Tensor]:
        """The judge as ``(transitions, subgoals) -> (N, G)`` probabilities, built once."""
        if "_judge" not in self.__dict__:
            if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.judge):  # module:function ("tiny:3" is a model)
                from lmpo.envs import import_object

                self.__dict__["_judge"] = import_object(self.judge, "calm judge")
            else:
                self.__dict__["_judge"] = self._lm_judge()
        return self.__dict__["_judge"]

    def _lm_judge(self) -> Callable[[list[Transition], list[str]], Tensor]:
        from lmpo.engine.device import run_device
        from lmpo.models.load import load_model

        model, tok = load_model(self.judge, dtype=self.dtype)
        model.to(run_device())  # the run's GPU on a CUDA run; its verdicts come back to the host
        verdict = []
        for key, text in (("yes_token", self.yes_token), ("no_token", self.no_token)):
            enc = tok(text, add_special_tokens=False)["input_ids"]
            if len(enc) != 1 or enc[0] == getattr(tok, "unk_token_id", None):
                raise ConfigError(f"shapers: calm.{key}={text!r} is not a single token of the judge {self.judge!r}'s "
                                  "tokenizer.")
            verdict.append(enc[0])
        queries = []
        for g in self.subgoals:
            q = tok(self.template.format(subgoal=g), add_special_tokens=False)["input_ids"]
            if not q or getattr(tok, "unk_token_id", None) in q:
                raise ConfigError(f"shapers: calm.template with subgoal {g!r} has characters the judge {self.judge!r}'s "
                                  "tokenizer does not know; rephrase it.")
            queries.append(q)
        vocab, device = model.get_input_embeddings().weight.shape[0], model.get_input_embeddings().weight.device

        @torch.no_grad()
        def score(trans: list[Transition], subgoals: list[str]) -> Tensor:
            seqs = [tr.history + tr.action + tr.observation + q for tr in trans for q in queries]
            if seqs and max(max(s) for s in seqs) >= vocab:
                raise DataError(f"shapers: calm: the batch holds token ids beyond the judge {self.judge!r}'s "
                                f"vocabulary ({vocab}); the judge must share the policy's tokenizer.")
            probs = []
            for s in range(0, len(seqs), self.batch_size):
                chunk = seqs[s:s + self.batch_size]
                L = max(len(x) for x in chunk)
                ids = torch.tensor([[0] * (L - len(x)) + x for x in chunk])  # left padding: every end is the last
                mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in chunk])
                pos = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=pos.to(device)).logits[:, -1].float().cpu()
                probs.append(torch.sigmoid(logits[:, verdict[0]] - logits[:, verdict[1]]))
            return torch.cat(probs).view(len(trans), len(queries)) if probs else torch.zeros(0, len(queries))

        return score

    def bonuses(self, batch: RolloutBatch) -> Tensor:
        """(B, M) float64: bonus x subgoals achieved for the first time at each turn."""
        n, layout = turn_layout(batch)
        trans = transitions(batch)
        probs = torch.as_tensor(self.scorer()(trans, list(self.subgoals)), dtype=torch.float64)
        if probs.shape != (len(trans), len(self.subgoals)) or not bool(torch.isfinite(probs).all()):
            raise DataError(f"shapers: calm: the judge returned {tuple(probs.shape)} values (finite: "
                            f"{bool(torch.isfinite(probs).all())}); expected finite ({len(trans)}, "
                            f"{len(self.subgoals)}) probabilities, one per transition and subgoal.")
        B, M = layout.shape
        keep = [k for k, tr in enumerate(trans) if tr.turn < M]
        first = first_achievements(probs[keep] > self.threshold, [trans[k].row for k in keep],
                                   [trans[k].turn for k in keep], B, M)
        return self.bonus * first

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        bonus = self.bonuses(batch)
        extras: dict[str, Any] = {**batch.extras, "calm_bonus": bonus.float()}
        if "turn_rewards" in batch.extras:
            tr = batch.extras["turn_rewards"]
            extras["turn_rewards"] = (tr.double() + bonus[:, : tr.shape[1]]).to(tr.dtype)
        rewards = (batch.rewards.double() + bonus.sum(-1)).to(batch.rewards.dtype)
        return batch.replace(rewards=rewards, extras=extras)


# The paper trains no policy; lmpo's preset pairs the shaped turn rewards with GiGPO's turn-level credit (its
# defaults), so a subgoal bonus at turn t credits the tokens of turn t. Set shapers[0].subgoals to the task's.
PRESETS = {
    "calm": {
        "shapers": [{"name": "calm", "bonus": 0.1, "threshold": 0.5}],
        "advantage": {"name": "gigpo", "step_weight": 1.0, "gamma": 0.95, "norm": "mean"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.01, "estimator": "k3", "mode": "loss"},
    },
}
