"""Compute TRL's preference losses on fixed inputs and store them as test data (tests/data/peer/trl_preference.json).

TRL 1.16.0 has no standalone DPO loss function: ``DPOTrainer._compute_loss`` runs the model and then the loss of each
``loss_type``. This script calls that method itself, unbound, on a minimal stand-in for the trainer: the stand-in's
"model" returns fixed per-token log-probs (0 off the completion, as TRL's fused LM head returns them) instead of
running a network, and the stand-in carries only the attributes the method reads (loss types and weights, beta,
label smoothing, precomputed reference log-probs, a one-process accelerator). ``CPOTrainer.cpo_loss`` and
``ORPOTrainer.odds_ratio_loss`` (trl.experimental) take sequence log-probs and are called the same way. Everything
else is TRL's code. Each DPO loss type is computed one pair at a time, so the stored numbers are per pair.
``KTOTrainer._compute_loss`` (TRL 1.16.0 has no separate ``kto_loss``) is called the same way on the four pairs
unpaired into eight examples (the chosen ones desirable, the rejected ones undesirable, TRL's order), each with the
summed log-probs of its mismatched KL pair under the policy (returned by the stand-in's model for the KL forward) and
the reference (precomputed, as ``ref_KL_logps``); TRL's own ``_compute_kl_logps`` runs the KL forward.

Run where ``trl`` imports (``make peer-numbers`` installs it with ``--no-deps``; the prefcore helper used a venv that
adds trl 1.16.0 to the project's torch 2.13.0 / transformers):

    /work/venv-prefcore/bin/python tests/peer/make_trl_pref_numbers.py
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

OUT = Path(__file__).resolve().parents[1] / "data" / "peer"
F64 = torch.float64

# Four pairs; the chosen responses have 3, 1, 2, 3 tokens, the rejected 2, 4, 1, 3 (right-padded to 4).
LEN_C, LEN_R, T = [3, 1, 2, 3], [2, 4, 1, 3], 4


def mask(lengths):
    return torch.tensor([[t < n for t in range(T)] for n in lengths])


def logps(seed, lengths, scale):
    g = torch.Generator().manual_seed(seed)
    return torch.where(mask(lengths), -scale * torch.rand(len(lengths), T, generator=g, dtype=F64) - 0.01, 0.0)


INPUTS = {"chosen_mask": mask(LEN_C), "rejected_mask": mask(LEN_R),
          "policy_chosen": logps(1, LEN_C, 2.0), "policy_rejected": logps(2, LEN_R, 2.0),
          "ref_chosen": logps(3, LEN_C, 2.0), "ref_rejected": logps(4, LEN_R, 2.0)}
# equal chosen lengths, for the losses whose SFT term TRL averages over the batch's tokens (lmpo: per pair)
EQ_C = [2, 2, 2, 2]
INPUTS_EQ = {**INPUTS, "chosen_mask": mask(EQ_C), "policy_chosen": logps(5, EQ_C, 2.0), "ref_chosen": logps(6, EQ_C, 2.0)}

DPO_CASES = [  # (name, loss_types, loss_weights, beta, label_smoothing, inputs)
    ("sigmoid", ["sigmoid"], [1.0], 0.1, 0.0, "INPUTS"),
    ("sigmoid_beta_0.5", ["sigmoid"], [1.0], 0.5, 0.0, "INPUTS"),  # TRL 1.16's sigmoid ignores label_smoothing
    ("hinge", ["hinge"], [1.0], 0.5, 0.0, "INPUTS"),
    ("ipo", ["ipo"], [1.0], 0.1, 0.0, "INPUTS"),
    ("robust", ["robust"], [1.0], 0.1, 0.1, "INPUTS"),
    ("bco_pair", ["bco_pair"], [1.0], 0.2, 0.0, "INPUTS"),
    ("apo_zero", ["apo_zero"], [1.0], 0.1, 0.0, "INPUTS"),
    ("apo_down", ["apo_down"], [1.0], 0.1, 0.0, "INPUTS"),
    ("nca_pair", ["nca_pair"], [1.0], 0.1, 0.0, "INPUTS"),
    ("sppo_hard", ["sppo_hard"], [1.0], 0.1, 0.0, "INPUTS"),
    ("exo_pair", ["exo_pair"], [1.0], 0.1, 1e-3, "INPUTS"),
    ("sigmoid_norm", ["sigmoid_norm"], [1.0], 0.1, 0.0, "INPUTS"),
    ("discopop", ["discopop"], [1.0], 0.05, 0.0, "INPUTS"),
    ("rpo_alpha_1", ["sigmoid", "sft"], [1.0, 1.0], 0.1, 0.0, "INPUTS_EQ"),
    ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1, 0.0, "INPUTS_EQ"),
]


class Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, m):
        return m


class FixedModel:
    """Returns the given per-token log-probs (2, T) in TRL's output layout: rows [chosen, rejected]."""

    training = True

    def __init__(self, per_token):
        self.per_token = per_token

    def __call__(self, **kw):
        n, length = kw["input_ids"].shape
        z = torch.zeros(n, length - 1, dtype=F64)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool(),
                               log_sum_sq_probs=z, aux_loss=torch.zeros(()))


def trl_dpo(loss_types, weights, beta, eps, inp, i):
    """DPOTrainer._compute_loss on pair i: sequence = one prompt token, then the completion."""
    pc, pr = inp["policy_chosen"][i], inp["policy_rejected"][i]
    cm, rm = inp["chosen_mask"][i], inp["rejected_mask"][i]
    per_token = torch.stack([pc, pr]).clone().requires_grad_(True)
    completion = torch.zeros(2, T + 1, dtype=torch.long)
    completion[0, 1:] = cm.long()
    completion[1, 1:] = rm.long()
    inputs = {"input_ids": torch.ones(2, T + 1, dtype=torch.long), "attention_mask": torch.ones(2, T + 1, dtype=torch.long),
              "completion_mask": completion,
              "ref_chosen_logps": (inp["ref_chosen"][i] * cm).sum().view(1),
              "ref_rejected_logps": (inp["ref_rejected"][i] * rm).sum().view(1)}
    model = FixedModel(per_token)
    stand_in = SimpleNamespace(
        model=model, accelerator=Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=eps,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, args=SimpleNamespace(discopop_tau=0.05))
    loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    loss.backward()
    m = stand_in._metrics["train"]
    return {"loss": loss.item(), "grad_chosen": per_token.grad[0].tolist(), "grad_rejected": per_token.grad[1].tolist(),
            "rewards/chosen": m["rewards/chosen"][0], "rewards/rejected": m["rewards/rejected"][0]}


def trl_aot(loss_type, beta, eps, inp):
    """The sorting losses couple the pairs: the whole batch in one call (rows [chosen..., rejected...]); the loss is
    the batch mean, and the gradient is per token."""
    n = len(LEN_C)
    per_token = torch.cat([inp["policy_chosen"], inp["policy_rejected"]]).clone().requires_grad_(True)
    completion = torch.zeros(2 * n, T + 1, dtype=torch.long)
    completion[:n, 1:] = inp["chosen_mask"].long()
    completion[n:, 1:] = inp["rejected_mask"].long()
    inputs = {"input_ids": torch.ones(2 * n, T + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, T + 1, dtype=torch.long), "completion_mask": completion,
              "ref_chosen_logps": (inp["ref_chosen"] * inp["chosen_mask"]).sum(-1),
              "ref_rejected_logps": (inp["ref_rejected"] * inp["rejected_mask"]).sum(-1)}
    model = FixedModel(per_token)
    stand_in = SimpleNamespace(
        model=model, accelerator=Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, args=SimpleNamespace(discopop_tau=0.05))
    loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    loss.backward()
    return {"loss": loss.item(), "grad_chosen": per_token.grad[:n].tolist(), "grad_rejected": per_token.grad[n:].tolist()}


def kl_logps(seed, shift):
    """(8,) summed log-probs of the eight examples' mismatched pairs: policy and reference, the reference lower by
    ``shift`` on average (shift < 0: a negative mean log-ratio, which TRL clamps to 0)."""
    g = torch.Generator().manual_seed(seed)
    policy = -6.0 * torch.rand(8, generator=g, dtype=F64) - 1.0
    return policy, policy - shift - 0.5 * (torch.rand(8, generator=g, dtype=F64) - 0.5)


KTO_CASES = [  # (name, beta, desirable_weight, undesirable_weight, KL seed, KL shift)
    ("kto", 0.1, 1.0, 1.0, 7, 0.4),
    ("kto_beta_0.5_weights", 0.5, 1.0, 1.5, 8, 0.8),
    ("kto_kl_clamped", 0.2, 1.3, 1.0, 9, -0.6),
]


class KTOModel(FixedModel):
    """The main forward returns the examples' per-token log-probs; the KL forward (input ids 2) the mismatched
    pairs' summed log-probs on the first completion token."""

    def __init__(self, per_token, kl):
        super().__init__(per_token)
        self.kl = kl

    def __call__(self, **kw):
        out = super().__call__(**kw)
        if bool((kw["input_ids"] == 2).all()):
            out.log_probs = torch.nn.functional.pad(self.kl.view(-1, 1), (0, T - 1))
        return out


def trl_kto(beta, dw, uw, kl_seed, kl_shift, inp):
    """KTOTrainer._compute_loss on the four pairs as eight unpaired examples [chosen 0..3, rejected 0..3]."""
    n = len(LEN_C)
    per_token = torch.cat([inp["policy_chosen"], inp["policy_rejected"]]).clone().requires_grad_(True)
    masks = torch.cat([inp["chosen_mask"], inp["rejected_mask"]])
    completion = torch.zeros(2 * n, T + 1, dtype=torch.long)
    completion[:, 1:] = masks.long()
    kl_policy, kl_ref = kl_logps(kl_seed, kl_shift)
    ones = torch.ones(2 * n, T + 1, dtype=torch.long)
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": completion,
              "KL_input_ids": 2 * ones, "KL_attention_mask": ones, "KL_completion_mask": completion,
              "label": torch.tensor([True] * n + [False] * n),
              "ref_logps": torch.cat([(inp["ref_chosen"] * inp["chosen_mask"]).sum(-1),
                                      (inp["ref_rejected"] * inp["rejected_mask"]).sum(-1)]),
              "ref_KL_logps": kl_ref}
    model = KTOModel(per_token, kl_policy)
    stand_in = SimpleNamespace(
        model=model, accelerator=Accelerator(), aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True,
        loss_type="kto", beta=beta, desirable_weight=dw, undesirable_weight=uw,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    stand_in._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stand_in, m, b)
    loss = KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    loss.backward()
    m = stand_in._metrics["train"]
    return {"kl_policy": kl_policy.tolist(), "kl_ref": kl_ref.tolist(), "loss": loss.item(),
            "grad_chosen": per_token.grad[:n].tolist(), "grad_rejected": per_token.grad[n:].tolist(),
            "kl": m["kl"][0], "rewards/chosen": m["rewards/chosen"][0], "rewards/rejected": m["rewards/rejected"][0]}


def seq(inp, side, average):
    s = inp[f"policy_{side}"].sum(-1)
    return s / inp[f"{side}_mask"].sum(-1) if average else s


def trl_cpo(loss_type, beta, eps, gamma, inp):
    stand_in = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma,
                               accelerator=Accelerator())
    avg = loss_type in ("ipo", "simpo")  # CPOTrainer.concatenated_forward's average_log_prob
    losses, _, _ = CPOTrainer.cpo_loss(stand_in, seq(inp, "chosen", avg), seq(inp, "rejected", avg))
    return losses.tolist()


def trl_orpo(beta, inp):
    stand_in = SimpleNamespace(beta=beta, accelerator=Accelerator())
    # ORPOTrainer.concatenated_forward averages the log-probs over each response's tokens
    losses, *_ = ORPOTrainer.odds_ratio_loss(stand_in, seq(inp, "chosen", True), seq(inp, "rejected", True))
    nll = -(inp["policy_chosen"].sum() / inp["chosen_mask"].sum())  # its cross-entropy on the chosen tokens
    return {"odds_ratio_term": losses.tolist(), "loss": (nll - losses.mean()).item()}


def main() -> None:
    data = {name: {k: v.tolist() for k, v in inp.items()} for name, inp in (("INPUTS", INPUTS), ("INPUTS_EQ", INPUTS_EQ))}
    out = {"peer": "trl", "version": trl.__version__, "torch": torch.__version__, "inputs": data, "dpo": [],
           "cpo": [], "orpo": [], "aot": [], "kto": []}
    for name, types, weights, beta, eps, which in DPO_CASES:
        inp = INPUTS if which == "INPUTS" else INPUTS_EQ
        per_pair = [trl_dpo(types, weights, beta, eps, inp, i) for i in range(len(LEN_C))]
        out["dpo"].append({"name": name, "loss_types": types, "loss_weights": weights, "beta": beta,
                           "label_smoothing": eps, "inputs": which, "per_pair": per_pair})
    for loss_type, eps in (("aot", 0.0), ("aot", 0.1), ("aot_unpaired", 0.0), ("aot_unpaired", 0.1)):
        out["aot"].append({"loss_type": loss_type, "beta": 0.5, "label_smoothing": eps,
                           **trl_aot(loss_type, 0.5, eps, INPUTS)})
    for loss_type, beta, eps, gamma in (("sigmoid", 0.1, 0.0, 0.5), ("sigmoid", 0.3, 0.1, 0.5), ("simpo", 2.0, 0.0, 1.0),
                                        ("simpo", 2.5, 0.1, 0.6)):
        out["cpo"].append({"loss_type": loss_type, "beta": beta, "label_smoothing": eps, "simpo_gamma": gamma,
                           "per_pair": trl_cpo(loss_type, beta, eps, gamma, INPUTS)})
    for beta in (0.1, 0.5):
        out["orpo"].append({"beta": beta, "inputs": "INPUTS_EQ", **trl_orpo(beta, INPUTS_EQ)})
    for name, beta, dw, uw, seed, shift in KTO_CASES:
        out["kto"].append({"name": name, "beta": beta, "desirable_weight": dw, "undesirable_weight": uw,
                           "inputs": "INPUTS", **trl_kto(beta, dw, uw, seed, shift, INPUTS)})
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "trl_preference.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
