"""response_logprobs: exactness against a naive full log-softmax, gradients, padding invariance and memory."""

from __future__ import annotations

import pytest
import torch

from lmpo.errors import DataError
from lmpo.models.load import enable_activation_checkpointing
from lmpo.models import build_tiny_model, position_ids_from_mask, response_logprobs
from unit._memory import LargestTensor


def make_batch(B=3, P=5, T=7, vocab=16, seed=0):
    """Random left-padded prompts and right-padded responses with ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    response_ids = torch.randint(0, vocab, (B, T), generator=g)
    response_attn = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        prompt_mask[b, : b % P] = False  # row b has b padding tokens on the left
        response_attn[b, T - 2 * b :] = False if 2 * b else True
    prompt_ids[~prompt_mask] = 0
    response_ids[~response_attn] = 0
    return prompt_ids, prompt_mask, response_ids, response_attn


def naive(model, prompt_ids, prompt_mask, response_ids, response_attn, temperature=1.0):
    """Reference: full logits, full log-softmax, gather."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_attn], 1)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
    P = prompt_ids.shape[1]
    logp_all = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, -1)
    logp = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros(())
    return torch.where(response_attn, logp, zero), torch.where(response_attn, ent, zero)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 11, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive(model, chunk_size, temperature):
    batch = make_batch()
    with torch.no_grad():
        ref_lp, ref_ent = naive(model, *batch, temperature=temperature)
        lp, ent = response_logprobs(model, *batch, temperature=temperature, chunk_size=chunk_size, with_entropy=True)
        lp_only, none = response_logprobs(model, *batch, temperature=temperature, chunk_size=chunk_size)
    assert lp.dtype == torch.float32 and lp.shape == batch[2].shape
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(lp_only, lp)
    assert none is None
    assert (lp[~batch[3]] == 0).all() and (ent[~batch[3]] == 0).all()


def weighted_grads(fn, batch, seed, with_entropy=True, tied=False):
    """Parameter gradients of a fresh tiny model (seed 0) of sum(w * logp) [+ sum(w * entropy)] with random w."""
    weights = torch.randn(batch[2].shape, generator=torch.Generator().manual_seed(seed))
    m = build_tiny_model(seed=0, tie_embeddings=tied)
    lp, ent = fn(m, *batch)
    ((lp * weights).sum() + ((ent * weights).sum() if with_entropy else 0)).backward()
    return lp, ent, {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_grads_close(got, ref):
    for name in ref:
        # Gradients reach ~30 in magnitude and are summed in a different order; 1e-4 is float32 rounding.
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_gradients_match_naive(chunk_size):
    batch = make_batch()
    ref = weighted_grads(naive, batch, 1)[2]
    got = weighted_grads(lambda m, *b: response_logprobs(m, *b, chunk_size=chunk_size, with_entropy=True), batch, 1)[2]
    assert_grads_close(got, ref)


def test_left_padding_invariance(model):
    prompt_ids, prompt_mask, response_ids, response_attn = make_batch()
    extra = 4
    padded_ids = torch.cat([torch.zeros(3, extra, dtype=torch.long), prompt_ids], 1)
    padded_mask = torch.cat([torch.zeros(3, extra, dtype=torch.bool), prompt_mask], 1)
    with torch.no_grad():
        lp, ent = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_attn, with_entropy=True)
        lp2, ent2 = response_logprobs(model, padded_ids, padded_mask, response_ids, response_attn, with_entropy=True)
        # Row 2 alone without any padding gives the same numbers as inside the padded batch.
        real = prompt_mask[2]
        lp3, _ = response_logprobs(model, prompt_ids[2:, real], None, response_ids[2:], response_attn[2:])
    torch.testing.assert_close(lp2, lp)
    torch.testing.assert_close(ent2, ent)
    torch.testing.assert_close(lp3[0], lp[2])
    assert torch.isfinite(lp).all()


def test_autocast_bf16_returns_float32(model):
    batch = make_batch()
    with torch.no_grad():
        ref, _ = response_logprobs(model, *batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = response_logprobs(model, *batch, with_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert torch.isfinite(lp).all()
    assert (lp - ref).abs().max() < 1.0  # bf16 rounding only, not a different computation




def test_never_materialises_full_logits():
    vocab, B, P, T, chunk = 8192, 4, 8, 16, 8
    m = build_tiny_model(seed=0, vocab_size=vocab)
    prompt_ids, prompt_mask, response_ids, _ = make_batch(B, P, T, vocab=vocab)
    # Every response token is real, so a one-shot implementation would build exactly (B, T, V).
    batch = (prompt_ids, prompt_mask, response_ids, torch.ones(B, T, dtype=torch.bool))
    full = B * T * vocab
    saved = []
    mode = LargestTensor()
    params = {id(p) for p in m.parameters()}
    keep = lambda t: (saved.append(t.numel()) if id(t) not in params else None, t)[1]  # noqa: E731
    with mode, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        lp, ent = response_logprobs(m, *batch, chunk_size=chunk, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert mode.largest < full, f"an op produced {mode.largest} elements >= B*T*V = {full}"
    # Chunk logits stay out of the autograd graph (recomputed in backward): nothing of one chunk's logits size is
    # saved apart from the weights themselves.
    assert max(saved) < chunk * vocab
    assert m.lm_head.weight.grad is not None and torch.isfinite(m.lm_head.weight.grad).all()


def test_bad_inputs(model):
    p, pm, r, ra = make_batch()
    with pytest.raises(DataError, match="P=0"):
        response_logprobs(model, p[:, :0], pm[:, :0], r, ra)
    with pytest.raises(DataError, match="response_attn"):
        response_logprobs(model, p, pm, r, ra[:, :3])
    with pytest.raises(DataError, match="temperature"):
        response_logprobs(model, p, pm, r, ra, temperature=0.0)
def grouped_batch(seed=0, vocab=16):
    """Three distinct left-padded prompts, each repeated for a group of 2-3 rows (rows interleaved), ragged replies."""
    base = make_batch(B=3, P=5, T=7, vocab=vocab, seed=seed)
    rows = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    g = torch.Generator().manual_seed(seed + 10)
    response_ids = torch.randint(0, vocab, (8, 7), generator=g)
    response_attn = torch.arange(7)[None, :] < torch.tensor([7, 5, 6, 7, 1, 3, 7, 4])[:, None]
    return base[0][rows], base[1][rows], torch.where(response_attn, response_ids, 0), response_attn


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prompt_pass_matches_full_pass(model, seed):
    from lmpo.models.logprobs import shared_prompt_rows
    batch = grouped_batch(seed)
    first, inverse = shared_prompt_rows(batch[0], batch[1])
    assert sorted(first.tolist()) == [0, 1, 3]  # the first row of each distinct prompt
    assert (batch[0][first][inverse] == batch[0]).all()
    with torch.no_grad():
        ref = response_logprobs(model, *batch, with_entropy=True, return_hidden=True, share_prompt=False)
        out = response_logprobs(model, *batch, with_entropy=True, return_hidden=True, share_prompt=True)
        naive_lp, _ = naive(model, *batch)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], naive_lp)


def test_shared_prompt_gradients_match_full_pass():
    batch = grouped_batch(2)
    full, shared = (weighted_grads(lambda m, *b: response_logprobs(m, *b, with_entropy=True, share_prompt=share),
                                   batch, 3)[2] for share in (False, True))
    assert_grads_close(shared, full)


def test_shared_prompt_rows_none_when_all_distinct(model):
    from lmpo.models.logprobs import shared_prompt_rows
    p_ids, p_mask, _, _ = make_batch()
    assert shared_prompt_rows(p_ids, p_mask) is None
    # same ids but different padding are different prompts
    ids = torch.tensor([[0, 5, 6], [0, 5, 6]])
    assert shared_prompt_rows(ids, torch.tensor([[False, True, True], [True, True, True]])) is None


def test_shared_prompt_off_under_layer_noise_and_checkpointing():
    from lmpo.models.logprobs import LayerNoise, can_share_prompt, layer_noise
    m = build_tiny_model(seed=0)
    assert can_share_prompt(m)
    with layer_noise(m, LayerNoise(std=0.1), torch.arange(2)):
        assert not can_share_prompt(m)
    assert can_share_prompt(m)
    enable_activation_checkpointing(m)
    assert not can_share_prompt(m)
    with torch.no_grad():
        assert can_share_prompt(m)  # no backward: the cache is fine


def test_report_only_entropy_same_values_and_logprob_gradients():
    batch = make_batch()
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = (
        weighted_grads(lambda m, *b: response_logprobs(m, *b, chunk_size=4, with_entropy=True, entropy_grad=eg),
                       batch, 4, with_entropy=False) for eg in (True, False))
    assert ent_a.requires_grad and not ent_b.requires_grad  # reported only: no graph kept for it
    torch.testing.assert_close(lp_b.detach(), lp_a.detach())
    torch.testing.assert_close(ent_b, ent_a.detach())
    assert_grads_close(g_b, g_a)


def test_shared_prompt_falls_back_when_the_cache_cannot_be_indexed(model, monkeypatch):
    from transformers import DynamicCache
    batch = grouped_batch(0)
    with torch.no_grad():
        ref, _ = response_logprobs(model, *batch, share_prompt=False)
        monkeypatch.setattr(DynamicCache, "batch_select_indices", None)
        lp, _ = response_logprobs(model, *batch, share_prompt=True)
    torch.testing.assert_close(lp, ref)


def test_config_chunk_default_is_the_library_default():
    from lmpo.config import ModelConfig
    from lmpo.models.logprobs import DEFAULT_CHUNK_SIZE
    assert ModelConfig().chunk_size == DEFAULT_CHUNK_SIZE


# --------------------------------------------------------------------------- the fused LM head (head_stats)
def head_case(bias: bool, seed: int = 0, V: int = 37, H: int = 6, n: int = 11):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    hidden = torch.randn(n, H, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    return head, hidden, targets, torch.randn(n, generator=g), torch.randn(n, generator=g)


def head_reference(head, hidden, targets, temperature):
    """Float64 full log-softmax over the vocabulary: log-probs and entropies."""
    z = torch.nn.functional.linear(hidden.double(), head.weight.double(),
                                   None if head.bias is None else head.bias.double()) / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def head_run(fn, case, uses):
    """Values and gradients (hidden, weight, bias) of sum(w_lp * logp) and/or sum(w_ent * entropy)."""
    import copy
    head, hidden, targets, w_lp, w_ent = case
    head, hidden = copy.deepcopy(head), hidden.clone().requires_grad_()
    lp, ent = fn(head, hidden, targets)
    loss = 0.0
    if "lp" in uses:
        loss = loss + (lp * w_lp.to(lp.dtype)).sum()
    if "ent" in uses:
        loss = loss + (ent * w_ent.to(ent.dtype)).sum()
    loss.backward()
    grads = [hidden.grad] + [None if p is None or p.grad is None else p.grad for p in (head.weight, head.bias)]
    return [lp.detach().float(), ent.detach().float()], [None if x is None else x.float() for x in grads]


@pytest.mark.parametrize("uses", [("lp",), ("ent",), ("lp", "ent")])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_fused_head_matches_float64_reference_and_checkpointed_chunks(uses, temperature, bias, chunk):
    from lmpo.engine.head import head_stats
    case = head_case(bias, seed=chunk)
    ref = head_run(lambda hd, h, y: head_reference(hd, h.double(), y, temperature), case, uses)
    runs = [head_run(lambda hd, h, y: head_stats(torch.nn.Module(), hd, h, y, temperature=temperature,
                                                 chunk_size=chunk, with_entropy=True, fused=fused), case, uses)
            for fused in (True, False)]
    for values, grads in runs:
        for got, want in zip(values, ref[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref[1]):  # float32 sums of up to 11 terms of size ~10: rounding ~1e-5
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_fused_head_frozen_weight_and_report_only_entropy():
    from lmpo.engine.head import head_stats
    head, hidden, targets, w_lp, _ = head_case(bias=False)
    head.weight.requires_grad_(False)
    h = hidden.clone().requires_grad_()
    lp, ent = head_stats(torch.nn.Module(), head, h, targets, chunk_size=4, with_entropy=True, entropy_grad=False)
    assert not ent.requires_grad
    (lp * w_lp).sum().backward()
    assert head.weight.grad is None
    ref_h = hidden.double().requires_grad_()
    ref_lp, ref_ent = head_reference(head, ref_h, targets, 1.0)
    (ref_lp * w_lp.double()).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=1e-5, atol=1e-5)


def test_fused_head_under_bf16_autocast_matches_the_checkpointed_path():
    from lmpo.engine.head import head_stats
    case = head_case(bias=False, V=64, H=16, n=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (v_f, g_f), (v_c, g_c) = (head_run(lambda hd, h, y: head_stats(torch.nn.Module(), hd, h, y, chunk_size=4,
                                                                      with_entropy=True, fused=fused),
                                           case, ("lp", "ent")) for fused in (True, False))
    ref_v, _ = head_run(lambda hd, h, y: head_reference(hd, h.double(), y, 1.0), case, ("lp",))
    for got, want in zip(v_f + g_f[:2], v_c + g_c[:2]):
        # Both multiply in bfloat16 (8 mantissa bits); the float64 values differ from either by that rounding.
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.05)
    assert (v_f[0] - ref_v[0]).abs().max() < 0.1 and (v_f[0] - ref_v[0]).abs().max() > 0  # bf16 products
    assert all(g.dtype == torch.float32 for g in g_f[:2])


def test_fused_head_is_used_for_plain_linear_heads_only():
    from types import SimpleNamespace

    from lmpo.engine.head import fused_head
    m = build_tiny_model(seed=0)
    assert fused_head(m, m.lm_head)
    assert not fused_head(m, torch.nn.Sequential(m.lm_head))  # a wrapped (e.g. peft) head
    capped = torch.nn.Module()
    capped.config = SimpleNamespace(final_logit_softcapping=30.0)
    assert not fused_head(capped, m.lm_head)


@pytest.mark.parametrize("share", [False, True])
def test_tied_embedding_gradient_dense_and_equal_to_naive(share):
    batch = grouped_batch(1)
    ref = weighted_grads(naive, batch, 5, tied=True)[2]
    got = weighted_grads(lambda m, *b: response_logprobs(m, *b, with_entropy=True, share_prompt=share), batch, 5,
                         tied=True)[2]
    assert "lm_head.weight" not in got  # tied: one parameter
    assert got["model.embed_tokens.weight"].layout == torch.strided  # the sparse lookup's rows were added into it
    for name in ref:
        # The tied matrix sums the head's and the embedding's gradients (up to ~130 here): float32 rounding of such
        # sums is ~1e-5 of the largest entry (the naive float32 pass itself is 1.6e-3 from float64 here).
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5 * float(ref[name].abs().max()),
                                   msg=name)


def test_tied_embedding_gradient_stays_dense_without_head_gradient():
    batch = grouped_batch(1)
    m = build_tiny_model(seed=0, tie_embeddings=True)
    _, _, hidden = response_logprobs(m, *batch, return_hidden=True)
    hidden.sum().backward()  # a loss on hidden states only never reaches the head
    assert m.model.embed_tokens.weight.grad.layout == torch.strided
    m.zero_grad(set_to_none=True)
    no_tokens = torch.zeros_like(batch[3])
    lp, _ = response_logprobs(m, batch[0], batch[1], batch[2], no_tokens)
    lp.sum().backward()  # no response tokens: the head still hands back a dense (zero) gradient
    grad = m.model.embed_tokens.weight.grad
    assert grad.layout == torch.strided and (grad == 0).all()


def test_activation_checkpointing_recomputes_in_eval_mode_with_equal_gradients():
    """lmpo keeps models in eval mode; Hugging Face checkpoints a layer only in training mode. response_logprobs
    switches the checkpointing layers alone to training for its forward: fewer saved tensors, same gradients, and
    every module is back in eval mode (attention dropout never turns on)."""
    batch = make_batch()

    def run(ckpt):
        m = build_tiny_model(seed=0)
        if ckpt:
            enable_activation_checkpointing(m)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            lp, _ = response_logprobs(m, *batch)
        lp.sum().backward()
        assert not any(mod.training for mod in m.modules())
        return lp.detach(), {n: p.grad for n, p in m.named_parameters()}, sum(saved)

    lp_a, g_a, saved_a = run(False)
    lp_b, g_b, saved_b = run(True)
    torch.testing.assert_close(lp_b, lp_a)
    for n in g_a:  # float rounding only: gradient entries here reach ~35
        torch.testing.assert_close(g_b[n], g_a[n], rtol=1e-5, atol=1e-4 * g_a[n].abs().max().item(), msg=n)
    assert saved_b < 0.5 * saved_a, (saved_b, saved_a)  # only the layer inputs are kept
