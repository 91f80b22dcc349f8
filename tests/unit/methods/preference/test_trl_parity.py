"""lmpo's preference losses against TRL 1.16.0's own code on the same inputs (numbers stored by
tests/peer/make_trl_pref_numbers.py in tests/data/peer/trl_preference.json): per-pair loss, gradient with respect to
each token's log-prob, and the implicit rewards, at 1e-6.

TRL loss_type -> lmpo loss: sigmoid -> dpo (TRL 1.16's sigmoid ignores label_smoothing: lmpo's conservative DPO
has no TRL 1.16 counterpart), hinge -> hinge,
ipo -> ipo, robust -> robust_dpo, bco_pair -> bco_pair, apo_zero / apo_down -> apo_zero / apo_down, nca_pair ->
nca_pair, sppo_hard -> sppo_hard, exo_pair -> exo_pair, sigmoid_norm -> dpo length_normalize, [sigmoid, sft] (rpo_alpha)
-> dpo_nll, [sigmoid, bco_pair, sft] with [0.8, 0.2, 1.0] -> mpo; CPOTrainer sigmoid -> cpo (alpha 0), simpo -> simpo;
ORPOTrainer -> orpo; discopop -> discopop; aot / aot_unpaired -> aot / aot unpaired=true (whole-batch numbers: the
sort couples the pairs); KTOTrainer (loss_type kto, its KL term from mismatched pairs) -> kto (reference_point
mismatched), the four pairs as eight unpaired rows (whole-batch numbers: the KL term couples the rows).
"""

import json
from pathlib import Path

import pytest
import torch

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps
from lmpo.registry import PREFERENCE_LOSSES

DATA = json.loads((Path(__file__).resolve().parents[3] / "data" / "peer" / "trl_preference.json").read_text())
F64 = torch.float64

LMPO = {  # TRL case -> (lmpo loss, its hyper-parameters from the case's beta / label smoothing)
    "sigmoid": ("dpo", lambda b, e: {"beta": b}),
    "sigmoid_beta_0.5": ("dpo", lambda b, e: {"beta": b}),
    "hinge": ("hinge", lambda b, e: {"beta": b}),
    "ipo": ("ipo", lambda b, e: {"beta": b}),
    "robust": ("robust_dpo", lambda b, e: {"beta": b, "label_smoothing": e}),
    "bco_pair": ("bco_pair", lambda b, e: {"beta": b}),
    "apo_zero": ("apo_zero", lambda b, e: {"beta": b}),
    "apo_down": ("apo_down", lambda b, e: {"beta": b}),
    "nca_pair": ("nca_pair", lambda b, e: {"beta": b}),
    "sppo_hard": ("sppo_hard", lambda b, e: {"beta": b}),
    "exo_pair": ("exo_pair", lambda b, e: {"beta": b, "label_smoothing": e}),
    "sigmoid_norm": ("dpo", lambda b, e: {"beta": b, "length_normalize": True}),
    "rpo_alpha_1": ("dpo_nll", lambda b, e: {"beta": b, "alpha": 1.0}),
    "mpo": ("mpo", lambda b, e: {"beta": b}),
    "discopop": ("discopop", lambda b, e: {"beta": b, "tau": 0.05}),
}
REWARDS_AS_TRL = {"sigmoid", "sigmoid_beta_0.5", "robust", "bco_pair", "apo_zero", "apo_down", "nca_pair", "exo_pair",
                  "rpo_alpha_1", "mpo", "hinge", "ipo", "discopop"}  # TRL logs beta x summed log-ratios for every type


def inputs(which, requires_grad=False):
    d = {k: torch.tensor(v, dtype=torch.bool if k.endswith("mask") else F64) for k, v in DATA["inputs"][which].items()}
    batch = PreferenceBatch(prompt_ids=torch.ones(4, 1, dtype=torch.long), chosen_ids=torch.ones(4, 4, dtype=torch.long),
                            chosen_mask=d["chosen_mask"], rejected_ids=torch.ones(4, 4, dtype=torch.long),
                            rejected_mask=d["rejected_mask"])
    policy = PairLogps(d["policy_chosen"].to(F64).requires_grad_(requires_grad),
                       d["policy_rejected"].to(F64).requires_grad_(requires_grad))
    return batch, policy, PairLogps(d["ref_chosen"].to(F64), d["ref_rejected"].to(F64))


def test_file_names_trl_and_its_version():
    assert DATA["peer"] == "trl" and DATA["version"] == "1.16.0"
    assert {c["name"] for c in DATA["dpo"]} == set(LMPO)


@pytest.mark.parametrize("case", DATA["dpo"], ids=lambda c: c["name"])
def test_dpo_trainer_loss_types(case):
    name, hps = LMPO[case["name"]]
    loss = PREFERENCE_LOSSES.build(name, **hps(case["beta"], case["label_smoothing"]))
    batch, policy, ref = inputs(case["inputs"], requires_grad=True)
    out = loss(batch, policy, ref)
    want = torch.tensor([p["loss"] for p in case["per_pair"]], dtype=F64)
    torch.testing.assert_close(out.per_pair, want, atol=1e-6, rtol=0)
    out.per_pair.sum().backward()  # pairs are independent: d(sum)/d(pair i's tokens) = TRL's gradient on pair i
    for side in ("chosen", "rejected"):
        grad = torch.tensor([p[f"grad_{side}"] for p in case["per_pair"]], dtype=F64)
        mask = getattr(batch, f"{side}_mask")
        torch.testing.assert_close(getattr(policy, side).grad, torch.where(mask, grad, 0.0), atol=1e-6, rtol=0)
    if case["name"] in REWARDS_AS_TRL:
        for key in ("rewards/chosen", "rewards/rejected"):
            want_mean = sum(p[key] for p in case["per_pair"]) / len(case["per_pair"])
            assert out.metrics[key].item() == pytest.approx(want_mean, abs=1e-6), key


@pytest.mark.parametrize("case", DATA["cpo"], ids=lambda c: f"{c['loss_type']}-{c['beta']}")
def test_cpo_trainer_losses(case):
    batch, policy, ref = inputs("INPUTS")
    if case["loss_type"] == "simpo":
        loss = PREFERENCE_LOSSES.build("simpo", beta=case["beta"], gamma=case["simpo_gamma"],
                                       label_smoothing=case["label_smoothing"])
    else:  # CPO's preference term: the NLL weight alpha set to 0 (TRL's cpo_loss returns the preference part)
        loss = PREFERENCE_LOSSES.build("cpo", beta=case["beta"], alpha=0.0, label_smoothing=case["label_smoothing"])
    torch.testing.assert_close(loss(batch, policy, None).per_pair, torch.tensor(case["per_pair"], dtype=F64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", DATA["orpo"], ids=lambda c: str(c["beta"]))
def test_orpo_odds_ratio_and_loss(case):
    batch, policy, ref = inputs(case["inputs"])  # equal chosen lengths: TRL's batch token mean = lmpo's pair mean
    out = PREFERENCE_LOSSES.build("orpo", beta=case["beta"])(batch, policy, None)
    assert out.per_pair.mean().item() == pytest.approx(case["loss"], abs=1e-6)
    c = policy.chosen.sum(-1) / batch.chosen_mask.sum(-1)
    nll = -c
    torch.testing.assert_close(nll - out.per_pair, torch.tensor(case["odds_ratio_term"], dtype=F64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", DATA["aot"], ids=lambda c: f"{c['loss_type']}-{c['label_smoothing']}")
def test_aot_batch_loss_and_gradient(case):
    loss = PREFERENCE_LOSSES.build("aot", beta=case["beta"], label_smoothing=case["label_smoothing"],
                                   unpaired=case["loss_type"] == "aot_unpaired")
    batch, policy, ref = inputs("INPUTS", requires_grad=True)
    out = loss(batch, policy, ref)
    assert out.per_pair.mean().item() == pytest.approx(case["loss"], abs=1e-6)
    out.per_pair.mean().backward()
    for side in ("chosen", "rejected"):
        grad = torch.tensor(case[f"grad_{side}"], dtype=F64)
        torch.testing.assert_close(getattr(policy, side).grad, torch.where(getattr(batch, f"{side}_mask"), grad, 0.0),
                                   atol=1e-6, rtol=0)


def unpaired_rows(which, kl_policy, kl_ref):
    """The four pairs as eight one-sided rows (TRL's unpaired order: chosen 0..3 desirable, rejected 0..3 not)."""
    batch, policy, ref = inputs(which)
    z = torch.zeros_like(policy.chosen)
    zm = torch.zeros_like(batch.chosen_mask)
    rows = PreferenceBatch(prompt_ids=torch.ones(8, 1, dtype=torch.long), chosen_ids=torch.ones(8, 4, dtype=torch.long),
                           chosen_mask=torch.cat([batch.chosen_mask, zm]), rejected_ids=torch.ones(8, 4, dtype=torch.long),
                           rejected_mask=torch.cat([zm, batch.rejected_mask]),
                           mismatched_logps=torch.tensor(kl_policy, dtype=F64),
                           mismatched_ref_logps=torch.tensor(kl_ref, dtype=F64))
    pol = PairLogps(torch.cat([policy.chosen, z]).requires_grad_(), torch.cat([z, policy.rejected]).requires_grad_())
    return rows, pol, PairLogps(torch.cat([ref.chosen, z]), torch.cat([z, ref.rejected]))


@pytest.mark.parametrize("case", DATA["kto"], ids=lambda c: c["name"])
def test_kto_trainer_loss_gradient_kl_and_rewards(case):
    loss = PREFERENCE_LOSSES.build("kto", beta=case["beta"], desirable_weight=case["desirable_weight"],
                                   undesirable_weight=case["undesirable_weight"])
    assert loss.reference_point == "mismatched"  # the default is TRL's estimator
    batch, policy, ref = unpaired_rows(case["inputs"], case["kl_policy"], case["kl_ref"])
    out = loss(batch, policy, ref)
    assert out.per_pair.mean().item() == pytest.approx(case["loss"], abs=1e-6)  # TRL: the mean over examples
    assert out.metrics["loss/kl"].item() == pytest.approx(case["kl"], abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert out.metrics[key].item() == pytest.approx(case[key], abs=1e-6), key
    out.per_pair.mean().backward()
    grad_c, grad_r = (torch.tensor(case[k], dtype=F64) for k in ("grad_chosen", "grad_rejected"))
    torch.testing.assert_close(policy.chosen.grad[:4], torch.where(batch.chosen_mask[:4], grad_c, 0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(policy.rejected.grad[4:], torch.where(batch.rejected_mask[4:], grad_r, 0.0), atol=1e-6,
                               rtol=0)
    assert (policy.chosen.grad[4:] == 0).all() and (policy.rejected.grad[:4] == 0).all()
