"""The preference stage's pieces (lmpo.train.preference) on the tiny model: pair log-probs from one interleaved
forward equal separate forwards of each side; the reference cache; one step's loss equals the loss's mean."""

import torch

from lmpo.models.logprobs import response_logprobs
from lmpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from lmpo.registry import PREFERENCE_LOSSES
from lmpo.tasks.pairs import collate_pairs, tokenize_pairs
from lmpo.train.preference import PairStep, cache_logps, cached_ref, pair_logps
from lmpo.train.step import PolicyRunner

ROWS = [{"prompt": "12=", "chosen": "12", "rejected": "3"}, {"prompt": "7=", "chosen": "7", "rejected": "77 1"},
        {"prompt": "4+5=", "chosen": "9", "rejected": "8"}]


def setup():
    tok = build_tiny_tokenizer()
    pairs = tokenize_pairs(ROWS, tok, max_prompt_length=8, max_completion_length=8)
    return tok, pairs, PolicyRunner(build_tiny_model(seed=0))


def test_interleaved_forward_equals_separate_forwards():
    tok, pairs, runner = setup()
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        lp = pair_logps(runner, batch)
        for side in ("chosen", "rejected"):
            want, _ = response_logprobs(runner.model, batch.prompt_ids, batch.prompt_mask, getattr(batch, f"{side}_ids"),
                                        getattr(batch, f"{side}_mask"), packed=False, share_prompt=False)
            torch.testing.assert_close(getattr(lp, side), want, atol=1e-5, rtol=1e-5)


def test_reference_cache_and_a_step():
    tok, pairs, runner = setup()
    cache_logps(runner, pairs, tok.pad_token_id, size=2)
    batch = collate_pairs(pairs, tok.pad_token_id)
    ref = cached_ref(pairs, batch)
    with torch.no_grad():
        lp = pair_logps(runner, batch)
    torch.testing.assert_close(ref.chosen, lp.chosen, atol=1e-5, rtol=1e-5)
    loss = PREFERENCE_LOSSES.build("dpo", beta=0.5)
    opt = torch.optim.SGD(runner.model.parameters(), lr=0.0)

    class Opt:  # the trainer's optimizer interface, no update (lr 0)
        params = list(runner.model.parameters())
        lr = 0.0

        def zero_grad(self):
            opt.zero_grad()

        def backward(self, x, whole):
            x.backward()

        def clip(self):
            return torch.tensor(1.0)

        def step(self, scale):
            opt.step()

    step = PairStep(loss, runner, Opt(), tok.pad_token_id, micro_batch_size=2)
    metrics = step(pairs, 1)
    # policy = reference before any update: every margin is 0, the DPO loss ln 2 on each pair
    assert abs(metrics["loss/total"].item() - torch.log(torch.tensor(2.0)).item()) < 1e-5
    out = step.evaluate(pairs)
    assert abs(out["eval/pref_loss"] - 0.6931472) < 1e-5 and out["eval/reward_accuracy"] == 0.0


def test_mismatched_pairs_logps_for_kto():
    """KTO's KL estimate: each pair's prompt with its neighbour's response (rotated by one), its summed log-probs
    under the reference (cached) and under the policy (PairStep.collate) equal a separate forward of that sequence."""
    from lmpo.train.preference import attach_mismatched

    tok, pairs, runner = setup()
    attach_mismatched(pairs)
    assert [p["mismatched_ids"] for p in pairs] == [pairs[2]["chosen_ids"], pairs[0]["rejected_ids"],
                                                    pairs[1]["chosen_ids"]]
    cache_logps(runner, pairs, tok.pad_token_id, size=2)
    want = []
    with torch.no_grad():
        for p in pairs:  # one unpadded sequence at a time
            ids = torch.tensor([p["mismatched_ids"]])
            lp, _ = response_logprobs(runner.model, torch.tensor([p["prompt_ids"]]), None, ids,
                                      torch.ones_like(ids, dtype=torch.bool), packed=False, share_prompt=False)
            want.append(lp.sum().item())
    want = torch.tensor(want)
    torch.testing.assert_close(torch.tensor([p["ref_mismatched"] for p in pairs]), want, atol=1e-5, rtol=1e-5)
    step = PairStep(PREFERENCE_LOSSES.build("kto"), runner, None, tok.pad_token_id)
    batch = step.collate(pairs)
    torch.testing.assert_close(batch.mismatched_logps, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.mismatched_ref_logps, want, atol=1e-5, rtol=1e-5)
    assert not batch.mismatched_logps.requires_grad
    assert PairStep(PREFERENCE_LOSSES.build("dpo"), runner, None, tok.pad_token_id).collate(pairs).mismatched_logps is None
