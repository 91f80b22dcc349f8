"""Micro-measurements of single levers on the default model, one subprocess per variant (clean peak RSS).

    python benchmarks/levers.py [--threads 1] [--only NAME ...]

Levers: ``linear`` (fp32 vs bf16-autocast linear at the update's shapes), ``adamw`` (foreach vs fused AdamW step:
CPU time and peak RSS), ``decode`` (one KV-cached decode step of 8 rows: whole step vs LM head vs body),
``entropy`` (the update's log-prob pass with the entropy differentiable, reported only, or absent),
``shared_prompt`` (that pass with the group's prompt run once or once per row), ``chunk`` (that pass with LM-head
chunks of 1024/256/128 tokens at reply lengths 64 and 256), ``head`` (the LM-head part fused or checkpointed per
chunk, and the logits layout), ``decode_matmul`` (weight GB per CPU second of the decode-shaped product through MKL,
MKL with pre-packed weights, oneDNN, OpenBLAS and lmpo's few-row kernel, against a plain read), ``decode_prepacked``
(one decode step of the default model with its linear layers through MKL, through oneDNN with pre-packed weights, or
through lmpo's few-row kernel), ``decode_step`` (a whole decode step: Hugging Face vs lean, MKL vs the few-row kernel,
and the token draw). Times are process
CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def cpu_best(fn, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def lever_linear(_):
    import torch

    x, w = torch.randn(832, 576), torch.randn(1536, 576)
    out = {}
    for ac in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            t = cpu_best(lambda: torch.nn.functional.linear(x, w))
        out["bf16_autocast" if ac else "fp32"] = {"cpu_s": t, "gflops_per_cpu_s": 2 * 832 * 576 * 1536 / t / 1e9}
    return out


def lever_adamw(variant):
    import torch

    from lmpo.models.load import load_model

    model, _ = load_model("default")
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"fused": True} if variant == "fused" else {"foreach": variant == "foreach"}
    opt = torch.optim.AdamW(params, lr=1e-6, **kw)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = cpu_best(opt.step)
    return {"variant": variant, "step_cpu_s": t, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_before_step_gb": base}


def lever_decode(_):
    import torch
    from transformers import DynamicCache

    from lmpo.models.load import load_model
    from lmpo.models.logprobs import split_body_and_head

    model, _ = load_model("default")
    body, head = split_body_and_head(model)
    ids = torch.randint(100, 1000, (8, 40))
    with torch.no_grad():
        cache = DynamicCache(config=body.config)
        out = body(input_ids=ids, past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]
        tok = torch.randint(100, 1000, (8, 1))

        def step():
            c = DynamicCache(config=body.config)
            body(input_ids=ids, past_key_values=c, use_cache=True)

        prefill = cpu_best(step, reps=2)

        def one_decode():
            body(input_ids=tok, past_key_values=cache, use_cache=True)
            for layer in cache.layers:  # undo the appended position so every repeat decodes at the same length
                layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]

        dec = cpu_best(one_decode, reps=5)
        hd = cpu_best(lambda: torch.log_softmax(head(h).float(), -1), reps=5)
    return {"prefill_8x40_cpu_s": prefill, "decode_body_cpu_s": dec, "decode_head_softmax_cpu_s": hd,
            "weights_gb": sum(p.numel() for p in model.parameters()) * 4 / 2**30}


def lever_entropy(_):
    import torch

    from lmpo.models.load import load_model
    from lmpo.models.logprobs import response_logprobs

    model, _ = load_model("default")
    g = torch.Generator().manual_seed(0)
    prompt, resp = torch.randint(100, 1000, (8, 40), generator=g), torch.randint(100, 1000, (8, 64), generator=g)
    attn = torch.ones(8, 64, dtype=torch.bool)
    out = {}
    for name, ent, ent_grad in (("entropy_with_grad", True, True), ("entropy_reported_only", True, False),
                                ("no_entropy", False, False)):
        def fwd_bwd():
            lp, en = response_logprobs(model, prompt, None, resp, attn, with_entropy=ent, entropy_grad=ent_grad)
            lp.sum().backward()
            model.zero_grad(set_to_none=True)
        out[name] = cpu_best(fwd_bwd, reps=2)
    return out


def lever_shared_prompt(variant):
    """The update's log-prob forward+backward for one group (8 rows, 40-token prompt, 64-token replies), with the
    prompt run once per group (``on``) or once per row (``off``); its own process, so peak RSS is this variant's."""
    import torch

    from lmpo.models.load import load_model
    from lmpo.models.logprobs import response_logprobs

    model, _ = load_model("default")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 1000, (1, 40), generator=g).repeat(8, 1)
    resp = torch.randint(100, 1000, (8, 64), generator=g)
    attn = torch.ones(8, 64, dtype=torch.bool)

    def fwd_bwd():
        lp, _ = response_logprobs(model, prompt, None, resp, attn, share_prompt=variant == "on")
        lp.sum().backward()
        model.zero_grad(set_to_none=True)

    t = cpu_best(fwd_bwd, reps=2)
    return {"fwd_bwd_cpu_s": t, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def lever_chunk(variant):
    """The same pass with ``variant`` = "<LM-head chunk tokens>x<reply length>": peak RSS and CPU time."""
    import torch

    from lmpo.models.load import load_model
    from lmpo.models.logprobs import response_logprobs

    chunk, T = (int(x) for x in variant.split("x"))
    model, _ = load_model("default")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 1000, (1, 40), generator=g).repeat(8, 1)
    resp = torch.randint(100, 1000, (8, T), generator=g)
    attn = torch.ones(8, T, dtype=torch.bool)

    def fwd_bwd():
        lp, _ = response_logprobs(model, prompt, None, resp, attn, chunk_size=chunk, with_entropy=True,
                                  entropy_grad=False)
        lp.sum().backward()
        model.zero_grad(set_to_none=True)

    t = cpu_best(fwd_bwd, reps=1)
    return {"fwd_bwd_cpu_s": t, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def lever_head(variant):
    """The update's LM-head part alone on the default model's head (512 response tokens, 256-token chunks, entropy
    reported): ``fused`` (one autograd node, ``_HeadStats``) or ``checkpointed`` (one checkpoint per chunk); and,
    for ``layout``, the four products of a chunk with token-major (h @ W^T) and vocabulary-major (W @ h^T) logits."""
    import torch

    from lmpo.models.load import load_model
    from lmpo.engine.head import head_stats
    from lmpo.models.logprobs import split_body_and_head

    model, _ = load_model("default")
    _, head = split_body_and_head(model)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, head.weight.shape[1], generator=g)
    targets = torch.randint(0, head.weight.shape[0], (512,), generator=g)
    if variant == "layout":
        W, h = head.weight.detach(), hidden[:256]
        zr, zc = h @ W.t(), W @ h.t()
        pairs = {"logits": (lambda: h @ W.t(), lambda: W @ h.t()), "grad_hidden": (lambda: zr @ W, lambda: zc.t() @ W),
                 "grad_weight": (lambda: zr.t() @ h, lambda: zc @ h)}
        return {name: {"token_major_cpu_s": cpu_best(a), "vocab_major_cpu_s": cpu_best(b)}
                for name, (a, b) in pairs.items()}

    def fwd_bwd():
        h = hidden.clone().requires_grad_()
        lp, _ = head_stats(model, head, h, targets, with_entropy=True, entropy_grad=False, fused=variant == "fused")
        lp.sum().backward()
        model.zero_grad(set_to_none=True)

    t = cpu_best(fwd_bwd, reps=2)
    return {"fwd_bwd_cpu_s": t, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def lever_decode_matmul(_):
    """Weight GB per CPU second of a decode-shaped product (8 rows times 256 MB of 576x1536 fp32 weights) through each
    kernel at hand (lmpo's own few-row kernel included), and of a plain read (``sum()``) of the same weights: the
    memory bound."""
    import numpy as np
    import torch

    from lmpo.engine.kernels import rowdot

    n = 256 * 2**20 // (576 * 1536 * 4)
    weights = [torch.randn(1536, 576) for _ in range(n)]
    x = torch.randn(8, 576)
    gb = n * 1536 * 576 * 4 / 1e9
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, 8) for w in weights]
    x_dnn, w_dnn = x.to_mkldnn(), [w.to_mkldnn() for w in weights]
    x_np, w_np = x.numpy(), [w.numpy() for w in weights]
    kernels = {
        "mkl_linear": lambda: [torch.nn.functional.linear(x, w) for w in weights],
        "mkl_prepacked": lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, 8) for p, w in zip(packed, weights)],
        "onednn": lambda: [torch._C._nn.mkldnn_linear(x_dnn, w, None) for w in w_dnn],
        "openblas_numpy": lambda: [x_np @ w.T for w in w_np],
        "mkl_gemv_one_row": lambda: [torch.mv(w, x[0]) for w in weights],
        **({"lmpo_rowdot": lambda: [rowdot.rowdot(x, w) for w in weights]} if rowdot.available() else {}),
        "plain_read": lambda: [w.sum() for w in weights],
    }
    np.dot(x_np, w_np[0].T)
    return {name: round(gb / cpu_best(fn), 2) for name, fn in kernels.items()}


def lever_decode_prepacked(_):
    """One KV-cached decode step of 8 rows (body and LM head) on the default model with every linear layer through
    MKL (as now) and through oneDNN with weights pre-packed for 8 rows (``torch.ops.mkldnn``, the path Inductor uses
    for frozen CPU models) and through lmpo's few-row kernel (``lmpo.engine.kernels.rowdot``, nothing to pack): CPU ms per
    step, the cost of packing all weights once, and the largest logit differences from MKL's."""
    import torch
    from transformers import DynamicCache

    from lmpo.engine.kernels import rowdot

    from lmpo.models.load import load_model
    from lmpo.models.logprobs import cache_kwarg, split_body_and_head

    model, _ = load_model("default")
    body, head = split_body_and_head(model)
    g = torch.Generator().manual_seed(0)
    ids, tok = torch.randint(100, 1000, (8, 40), generator=g), torch.randint(100, 1000, (8, 1), generator=g)
    kw = cache_kwarg(body)

    def step_ms():
        with torch.no_grad():
            cache = DynamicCache(config=body.config)
            body(input_ids=ids, use_cache=True, **{kw: cache})
            logits = []

            def one():
                out = body(input_ids=tok, use_cache=True, **{kw: cache})
                logits.append(head(out.last_hidden_state[:, -1]))
                for layer in cache.layers:  # undo the appended position: every repeat decodes at the same length
                    layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]

            return cpu_best(one, reps=5) * 1e3, logits[-1]

    mkl_ms, mkl_logits = step_ms()
    extra = {}
    if rowdot.available():
        with rowdot.rowdot_linears(model):
            row_ms, row_logits = step_ms()
        extra = {"rowdot_step_ms": row_ms, "rowdot_max_logit_diff": float((mkl_logits - row_logits).abs().max())}
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    c0 = time.process_time()
    for m in linears:
        packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 8)

        def forward(x, m=m, packed=packed):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, m.bias, "none", [], "")
            return y.reshape(*x.shape[:-1], -1)

        m.forward = forward
    pack_s = time.process_time() - c0
    dnn_ms, dnn_logits = step_ms()
    return {"mkl_step_ms": mkl_ms, "onednn_prepacked_step_ms": dnn_ms, "pack_all_weights_cpu_s": pack_s,
            "max_logit_diff": float((mkl_logits - dnn_logits).abs().max()), **extra}


def lever_decode_step(_):
    """One KV-cached decode step of 8 rows on the default model at 40 + 24 positions, CPU ms (best of 5 x 8 steps):
    the Hugging Face forward with MKL linears, the same with lmpo's few-row kernel, the lean step
    (``lmpo.engine.lean``) with the kernel and the native attention/RMSNorm, and the lean step with torch attention;
    plus drawing one token per row from 49,152 entries with ``torch.multinomial`` and by inverse CDF."""
    import torch
    from transformers import DynamicCache

    from lmpo.engine.kernels import rowdot
    from lmpo.models.load import load_model
    from lmpo.models.logprobs import cache_kwarg, split_body_and_head
    from lmpo.rollout.hf import sample_inverse_cdf
    from lmpo.engine.lean import LeanDecoder

    model, _ = load_model("default")
    body, head = split_body_and_head(model)
    g = torch.Generator().manual_seed(0)
    ids, tok = torch.randint(100, 1000, (8, 40), generator=g), torch.randint(100, 1000, (8, 1), generator=g)
    mask = torch.ones(8, 40, dtype=torch.bool)
    positions = torch.full((8, 1), 40)
    kw = cache_kwarg(body)
    res, hidden = {}, {}

    def prefill():
        cache = DynamicCache(config=body.config)
        body(input_ids=ids, use_cache=True, **{kw: cache})
        return cache

    def hf_steps():
        cache, attn = prefill(), torch.ones(8, 40, dtype=torch.long)
        for i in range(8):
            attn = torch.cat([attn, torch.ones(8, 1, dtype=torch.long)], 1)
            out = body(input_ids=tok, attention_mask=attn, position_ids=positions + i, use_cache=True, **{kw: cache})
            head(out.last_hidden_state[:, -1])
        return out.last_hidden_state[:, -1]

    def lean_steps():
        lean = LeanDecoder(body, prefill(), mask, 8)
        for i in range(8):
            last = lean.step(tok, positions + i)
            head(last)
        return last

    def per_step(fn, name):
        prefill_s = cpu_best(prefill, reps=3)
        hidden[name] = fn()
        res[name + "_ms"] = round((cpu_best(fn, reps=5) - prefill_s) / 8 * 1e3, 1)

    with torch.no_grad():
        per_step(hf_steps, "hf_mkl")
        if rowdot.available():
            with rowdot.rowdot_linears(model):
                per_step(hf_steps, "hf_rowdot")
                per_step(lean_steps, "lean_rowdot_native")
                available = rowdot.available
                rowdot.available = lambda: False  # the lean step's torch attention and RMSNorm
                try:
                    per_step(lean_steps, "lean_rowdot_torch_attention")
                finally:
                    rowdot.available = available
        probs = torch.softmax(torch.randn(8, 49152, generator=g), -1)
        res["multinomial_ms"] = round(cpu_best(lambda: [torch.multinomial(probs, 1) for _ in range(20)]) / 20 * 1e3, 2)
        res["inverse_cdf_ms"] = round(cpu_best(lambda: [sample_inverse_cdf(probs) for _ in range(20)]) / 20 * 1e3, 2)
    res["max_hidden_diff_vs_hf_mkl"] = max(float((h - hidden["hf_mkl"]).abs().max()) for h in hidden.values())
    return res


LEVERS = {"linear": [None], "adamw": ["foreach", "for-loop", "fused"], "decode": [None], "entropy": [None],
          "shared_prompt": ["off", "on"], "chunk": ["1024x64", "256x64", "1024x256", "256x256", "128x256"],
          "head": ["checkpointed", "fused", "layout"], "decode_matmul": [None], "decode_prepacked": [None],
          "decode_step": [None]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=list(LEVERS))
    p.add_argument("--worker", default=None)
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        name, variant = json.loads(a.worker)
        print("LEVER " + json.dumps({"lever": name, "variant": variant, **globals()["lever_" + name](variant)}))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    for name in a.only:
        for variant in LEVERS[name]:
            proc = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--worker",
                                   json.dumps([name, variant])], capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LEVER ")]
            print(lines[-1][6:] if lines else f"{name}/{variant} failed: {proc.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
