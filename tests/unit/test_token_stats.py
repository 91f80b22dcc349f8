"""response_stats: vocabulary-mean and candidate log-probs and soft inputs against a naive full-logits reference."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from lmpo.models import build_tiny_model, position_ids_from_mask, response_logprobs
from lmpo.models.token_stats import response_stats


def make_batch(B=3, P=5, T=6, vocab=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt_mask[1, :2] = False
    response_ids = torch.randint(0, vocab, (B, T), generator=g)
    attn = torch.arange(T)[None, :] < torch.tensor([T, T - 2, 1])[:, None]
    return prompt_ids, prompt_mask, response_ids, attn


def naive_logp_all(model, prompt_ids, prompt_mask, response_ids, attn, embeds=None, temperature=1.0):
    mask = torch.cat([prompt_mask, attn], 1)
    kw = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": torch.cat([prompt_ids, response_ids], 1)}
    logits = model(attention_mask=mask.long(), position_ids=position_ids_from_mask(mask), **kw).logits
    P = prompt_ids.shape[1]
    return torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, -1)  # (B, T, V)


def test_vocab_mean_and_candidates_match_naive():
    model = build_tiny_model(seed=1)
    p, pm, r, a = make_batch()
    cand = torch.randint(0, 16, (3, 6, 4), generator=torch.Generator().manual_seed(5))
    lp, ent, st = response_stats(model, p, pm, r, a, {"candidate_ids": cand}, temperature=0.7, chunk_size=3,
                                 with_entropy=True, stats=frozenset({"vocab_mean_logprobs", "candidate_logprobs"}))
    full = naive_logp_all(model, p, pm, r, a, temperature=0.7)
    z = torch.zeros(())
    assert_close(lp, torch.where(a, full.gather(-1, r[..., None])[..., 0], z), atol=1e-5, rtol=1e-5)
    assert_close(st["vocab_mean_logprobs"], torch.where(a, full.mean(-1), z), atol=1e-5, rtol=1e-5)
    assert_close(st["candidate_logprobs"], torch.where(a[..., None], full.gather(-1, cand), z), atol=1e-5, rtol=1e-5)
    ref_lp, ref_ent = response_logprobs(model, p, pm, r, a, temperature=0.7, with_entropy=True)
    assert_close(lp, ref_lp)
    assert_close(ent, ref_ent)


def test_candidate_gradient_matches_naive():
    model = build_tiny_model(seed=2)
    p, pm, r, a = make_batch(seed=1)
    cand = torch.randint(0, 16, (3, 6, 2), generator=torch.Generator().manual_seed(6))
    w = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(7))
    _, _, st = response_stats(model, p, pm, r, a, {"candidate_ids": cand}, chunk_size=2,
                              stats=frozenset({"candidate_logprobs"}))
    (st["candidate_logprobs"] * w).sum().backward()
    g1 = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    full = naive_logp_all(model, p, pm, r, a)
    (torch.where(a[..., None], full.gather(-1, cand), 0.0) * w).sum().backward()
    for x, y in zip(g1, [q.grad for q in model.parameters()]):
        assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_soft_inputs_feed_embedding_mixtures():
    # Soft positions get sum_i w_i E[id_i]; a one-hot weight on the token itself reproduces the discrete pass.
    model = build_tiny_model(seed=3)
    p, pm, r, a = make_batch(seed=2)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 16, (3, 6, 3), generator=g)
    w = torch.softmax(torch.randn(3, 6, 3, generator=g), -1)
    soft = torch.zeros(3, 6, dtype=torch.bool)
    soft[:, :2] = True
    ex = {"soft_mask": soft, "soft_ids": ids, "soft_weights": w}
    lp, _, _ = response_stats(model, p, pm, r, a, ex, chunk_size=4)
    E = model.get_input_embeddings().weight
    emb = E[torch.cat([p, r], 1)].clone()
    emb[:, 5:7] = (w[:, :2, :, None] * E[ids[:, :2]]).sum(-2)
    full = naive_logp_all(model, p, pm, r, a, embeds=emb)
    assert_close(lp, torch.where(a, full.gather(-1, r[..., None])[..., 0], 0.0), atol=1e-5, rtol=1e-5)
    onehot = {"soft_mask": soft, "soft_ids": r[..., None], "soft_weights": torch.ones(3, 6, 1)}
    assert_close(response_stats(model, p, pm, r, a, onehot)[0], response_logprobs(model, p, pm, r, a)[0],
                 atol=1e-6, rtol=1e-5)


def test_score_sq_norm_matches_naive():
    # ||e_y - pi||^2 = 1 - 2 pi(y) + sum_v pi(v)^2 at every response position, from the full softmax
    model = build_tiny_model(seed=3)
    p, pm, r, a = make_batch(seed=2)
    _, _, st = response_stats(model, p, pm, r, a, temperature=0.7, chunk_size=4, stats=frozenset({"score_sq_norm"}))
    probs = naive_logp_all(model, p, pm, r, a, temperature=0.7).exp()
    onehot = torch.nn.functional.one_hot(r, probs.shape[-1]).float()
    exp = ((onehot - probs) ** 2).sum(-1)
    assert_close(st["score_sq_norm"], torch.where(a, exp, torch.zeros(())), atol=1e-5, rtol=1e-5)
    assert set(st) == {"score_sq_norm"}
