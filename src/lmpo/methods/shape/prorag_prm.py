"""ProRAG's process reward model at rollout time: score every policy turn of an episode with a second model.

Paper: "ProRAG: Process-Supervised Reinforcement Learning for Retrieval-Augmented Generation", arXiv:2601.21912
(code lilinwz/ProRAG, ``prorag/rl/rollout.py``): after each step the PRM reads the text so far, the step and its
retrieved documents included, and the step's score is sigmoid(PRM logit); every token of the step carries it, and
the dual-granularity advantage (:mod:`lmpo.methods.advantage.prorag`) normalises it over the group.

Here the PRM is any causal LM lmpo can load (``model``: ``tiny``, a GGUF file, a folder, a cached Hub id); for a
causal LM the logit is read as  logit(yes_token) - logit(no_token)  at the last token of the turn (its observation
included), so score_t = sigmoid(that difference), in ``extras["turn_scores"]`` (B, max_turns; 0 after the episode's
last turn), which ``advantage: prorag`` reads before the environment's per-turn rewards.

Gaps filled (fidelity "reconstructed"): the paper's PRM is a sequence classifier trained on MCTS step values with
its own tokenizer, scoring re-tokenised text; this scorer reads the policy's token ids directly, so the PRM must
share the policy's tokenizer (a model of the same family: checked against its vocabulary size), and a causal LM's
two-token logit difference stands in for the classifier head. The per-step format reward the code adds is
task-specific and not included. Training the PRM (MCTS labels) is not part of lmpo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError, DataError
from lmpo.methods.params import hp
from lmpo.registry import SHAPERS


def turn_prefixes(batch: RolloutBatch) -> list[tuple[int, int, list[int]]]:
    """(row, turn, token ids of the prompt and of the response up to the turn's last attended token) per played turn."""
    attn = batch.response_attn if batch.response_attn is not None else batch.response_mask
    out = []
    for i in range(batch.batch_size):
        prompt = batch.prompt_ids[i]
        if batch.prompt_mask is not None:
            prompt = prompt[batch.prompt_mask[i]]
        live = attn[i]
        turns = batch.turn_ids[i]
        for t in torch.unique(turns[batch.response_mask[i]]).tolist():
            at = torch.nonzero(live & (turns == t)).flatten()
            end = int(at.max()) + 1
            out.append((i, int(t), prompt.tolist() + batch.response_ids[i, :end].tolist()))
    return out


@SHAPERS.register("prorag_prm", paper="ProRAG: Process-Supervised Reinforcement Learning for Retrieval-Augmented "
                  "Generation (PRM step scores)", arxiv="2601.21912", fidelity="reconstructed")
@dataclass
class ProRAGPRM:
    """Writes ``extras["turn_scores"]``: sigmoid(logit(yes) - logit(no)) of a second model after each turn.

    Args:
        model: the PRM, any model spec lmpo loads (must share the policy's tokenizer).
        yes_token / no_token: the tokens whose logit difference is the step's logit (defaults fit the tiny
            tokenizer; Math-Shepherd-style PRMs use "+" and "-").
        dtype: the PRM's parameter dtype. batch_size: prefixes per forward pass.
    """

    model: str = "tiny"
    yes_token: str = "+"
    no_token: str = "="
    dtype: str = hp("float32", choices=("float32", "bfloat16", "float16"))
    batch_size: int = hp(32, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()
    registry_name: ClassVar[str] = "prorag_prm"

    def load(self) -> tuple[Any, int, int]:
        """(model, yes id, no id), loaded once."""
        if "_prm" not in self.__dict__:
            from lmpo.models.load import load_model

            model, tok = load_model(self.model, dtype=self.dtype)
            ids = []
            for key, text in (("yes_token", self.yes_token), ("no_token", self.no_token)):
                enc = tok(text, add_special_tokens=False)["input_ids"]
                if len(enc) != 1 or enc[0] == getattr(tok, "unk_token_id", None):
                    raise ConfigError(f"shapers: {self.registry_name}.{key}={text!r} is not a single token of "
                                      f"the model {self.model!r}'s tokenizer.")
                ids.append(enc[0])
            self.__dict__["_prm"] = (model, ids[0], ids[1])
        return self.__dict__["_prm"]

    @torch.no_grad()
    def scores(self, batch: RolloutBatch, max_turns: int) -> Tensor:
        model, yes, no = self.load()
        vocab = model.get_input_embeddings().weight.shape[0]
        if int(batch.response_ids.max()) >= vocab or int(batch.prompt_ids.max()) >= vocab:
            raise DataError(f"{self.registry_name}: the batch holds token ids beyond the model {self.model!r}'s "
                            f"vocabulary ({vocab}); it must share the policy's tokenizer.")
        out = torch.zeros(batch.batch_size, max_turns)
        items = [p for p in turn_prefixes(batch) if p[1] < max_turns]
        device = model.get_input_embeddings().weight.device
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            L = max(len(ids) for _, _, ids in chunk)
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            mask = torch.zeros(len(chunk), L, dtype=torch.long)
            for j, (_, _, seq) in enumerate(chunk):  # left padding: the last position is every prefix's end
                ids[j, L - len(seq):] = torch.tensor(seq)
                mask[j, L - len(seq):] = 1
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=pos.to(device)).logits[:, -1].float()
            val = torch.sigmoid(logits[:, yes] - logits[:, no]).cpu()
            for j, (i, t, _) in enumerate(chunk):
                out[i, t] = val[j]
        return out

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        if batch.turn_ids is None:
            return batch  # not an episode batch: no turns to score
        K = batch.extras["turn_rewards"].shape[1] if "turn_rewards" in batch.extras else int(batch.turn_ids.max()) + 1
        return batch.replace(extras={**batch.extras, "turn_scores": self.scores(batch, K)})
