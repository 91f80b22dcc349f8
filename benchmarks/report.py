"""Parsing, aggregation and rendering of benchmark results (pure functions, unit-tested).

A worker subprocess prints exactly one line ``BENCH_RESULT <json>`` on stdout; :func:`parse_worker_output` reads
it back. Each worker result holds per-step phase times (after warm-up steps) plus memory and shape information;
:func:`summarize` turns a list of them into medians, and :func:`ratio_rows` into lmpo/TRL ratios.
"""

from __future__ import annotations

import json
import statistics
from typing import Any, Iterable

MARKER = "BENCH_RESULT "
PHASES = ("generate_s", "score_s", "logprob_s", "update_s", "other_s", "step_s")


class BenchError(RuntimeError):
    """A worker failed or printed no result."""


def emit(result: dict[str, Any]) -> str:
    """The line a worker prints (the orchestrator looks for the last such line)."""
    return MARKER + json.dumps(result, sort_keys=True)


def parse_worker_output(stdout: str) -> dict[str, Any]:
    """Return the JSON payload of the last ``BENCH_RESULT`` line of a worker's stdout."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        tail = "\n".join(stdout.splitlines()[-20:])
        raise BenchError(f"worker printed no {MARKER.strip()} line; last output:\n{tail}")
    return json.loads(lines[-1][len(MARKER):])


def median(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def step_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median over measured steps of every phase, in wall seconds (``*_s``) and, when recorded, process CPU
    seconds (``*_cpu``); ``other`` = step - (generate + score + logprob + update)."""
    out: dict[str, float] = {}
    for unit in ("_s", "_cpu"):
        if not steps or "step" + unit not in steps[0]:
            continue
        for p in PHASES:
            name = p[: -len("_s")] + unit
            if p == "other_s":
                out[name] = median(s["step" + unit] - sum(s[q + unit] for q in ("generate", "score", "logprob", "update"))
                                   for s in steps)
            else:
                out[name] = median(s[name] for s in steps)
    out["tokens"] = median(s["tokens"] for s in steps)
    out["tokens_per_s"] = median(s["tokens"] / s["generate_s"] for s in steps if s["generate_s"] > 0)
    if steps and "generate_cpu" in steps[0]:
        out["tokens_per_cpu_s"] = median(s["tokens"] / s["generate_cpu"] for s in steps if s["generate_cpu"] > 0)
    return out


def update_flops(*, body_params: int, head_params: int, layers: int, hidden: int, rows: int, prompt_len: int,
                 response_len: int, response_tokens: int, prompts: int | None = None) -> float:
    """Model FLOPs of one forward+backward over the batch (the usual ``6 N D`` count, plus attention).

    ``body_params`` are the transformer's matmul weights (embeddings and norms excluded); the LM head
    (``head_params = hidden * vocab``) is applied only to ``response_tokens`` positions (all a policy-gradient loss
    needs). The ``rows`` sequences are ``prompts`` distinct prompts of ``prompt_len`` tokens (a GRPO group repeats one
    prompt; ``None`` = every row its own) followed by ``response_len`` tokens each. A repeated prompt's activations are
    the same in every row of its group, so the useful work runs the body over ``prompts * P + rows * T`` positions.
    Causal attention costs 2 * H FLOPs per (query, key) pair and layer forward for QK^T and AV: ``P^2 / 2`` pairs per
    prompt, ``T * P + T^2 / 2`` per response. Backward is counted as twice the forward. Padding and recomputation
    are not counted: this is the useful work, so a method cannot score higher by doing redundant work.
    """
    prompts = rows if prompts is None else prompts
    P, T = prompt_len, response_len
    positions = prompts * P + rows * T
    pairs = prompts * P * P / 2 + rows * (T * P + T * T / 2)
    forward = 2 * body_params * positions + 2 * head_params * response_tokens + 4 * layers * hidden * pairs
    return 3.0 * forward


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each metric over the runs of one side (each run already reduced by :func:`step_phases`)."""
    per_run = []
    for r in results:
        ph = step_phases(r["steps"])
        flops = r.get("update_flops")
        ph["update_flops_per_s"] = flops / ph["update_s"] if flops and ph["update_s"] > 0 else float("nan")
        if "update_cpu" in ph:  # per CPU-second of one thread: robust to other jobs sharing the machine
            ph["update_flops_per_cpu_s"] = flops / ph["update_cpu"] if flops and ph["update_cpu"] > 0 else float("nan")
        shape, spec = r.get("shape"), r.get("spec", {})
        if shape and "length" in spec:  # every sampled token reads every matmul weight once (fp32 in memory)
            ph["gen_weight_bytes"] = spec["length"] * (shape["body_params"] + shape["head_params"]) * 4.0
        ph["peak_rss_gb"] = r["peak_rss_gb"]
        ph["base_rss_gb"] = r.get("base_rss_gb", float("nan"))
        per_run.append(ph)
    keys = per_run[0].keys() if per_run else []
    out = {k: median(p[k] for p in per_run) for k in keys}
    out["runs"] = len(per_run)
    return out


def stream_peak(results: list[dict[str, Any]], key: str = "stream_bytes_per_s") -> float | None:
    """Best measured weight-streaming rate (bytes/s; ``key="stream_bytes_per_cpu_s"``: per CPU-second) of the run."""
    vals = [float(r[key]) for r in results if r.get(key)]
    return max(vals) if vals else None


def matmul_peak(results: list[dict[str, Any]], key: str = "peak_flops") -> dict[str, float]:
    """Best measured matmul FLOP/s per dtype over all matmul probes of the run (``key="peak_flops_cpu"``: per
    CPU-second)."""
    peak: dict[str, float] = {}
    for r in results:
        for dtype, v in r.get(key, {}).items():
            peak[dtype] = max(peak.get(dtype, 0.0), float(v))
    return peak


ROWS = [  # (label, key, format, lower is better)
    ("step CPU time (CPU-s)", "step_cpu", "{:.2f}", True),
    ("  generation (CPU-s)", "generate_cpu", "{:.2f}", True),
    ("  scoring (CPU-s)", "score_cpu", "{:.3f}", True),
    ("  log-prob passes, no grad (CPU-s)", "logprob_cpu", "{:.3f}", True),
    ("  update: fwd+bwd+optimizer (CPU-s)", "update_cpu", "{:.2f}", True),
    ("  other (CPU-s)", "other_cpu", "{:.3f}", True),
    ("step time (s)", "step_s", "{:.2f}", True),
    ("  generation (s)", "generate_s", "{:.2f}", True),
    ("  scoring (s)", "score_s", "{:.3f}", True),
    ("  log-prob passes, no grad (s)", "logprob_s", "{:.3f}", True),
    ("  update: fwd+bwd+optimizer (s)", "update_s", "{:.2f}", True),
    ("  other (s)", "other_s", "{:.3f}", True),
    ("peak RSS (GB)", "peak_rss_gb", "{:.2f}", True),
    ("RSS after model load (GB)", "base_rss_gb", "{:.2f}", True),
    ("generated tokens / s", "tokens_per_s", "{:.1f}", False),
    ("generated tokens / CPU-s", "tokens_per_cpu_s", "{:.1f}", False),
    ("update model GFLOP/s", "update_gflops", "{:.1f}", False),
    ("update / matmul peak (wall)", "update_mfu", "{:.1%}", False),
    ("update / matmul peak (CPU time)", "update_mfu_cpu", "{:.1%}", False),
    ("generation / decode-matmul rate (CPU time)", "gen_roof_cpu", "{:.1%}", False),
    ("generation / memory-read bound (CPU time)", "gen_read_cpu", "{:.1%}", False),
]


def ratio_rows(lmpo: dict[str, float], trl: dict[str, float] | None, peak: float | None,
               peak_cpu: float | None = None, stream_cpu: float | None = None, read_cpu: float | None = None,
               ) -> list[tuple[str, ...]]:
    """Table rows (label, lmpo, TRL, lmpo/TRL) with the update's fraction of the matmul peak filled in: ``peak``
    in FLOP per wall second, ``peak_cpu`` per CPU second (the same number on an idle machine). ``stream_cpu``
    (weight bytes per CPU second of the decode-shaped matmul, :func:`workers.weight_stream`) and ``read_cpu`` (of a
    plain read of the same weights) give generation's fraction of each: the time to pass every weight once per
    sampled token at that rate over the time generation took. Rows whose metric neither side recorded are left
    out."""
    def fill(s: dict[str, float] | None) -> dict[str, float] | None:
        if s is None:
            return None
        s = dict(s)
        s["update_gflops"] = s.get("update_flops_per_s", float("nan")) / 1e9
        s["update_mfu"] = s.get("update_flops_per_s", float("nan")) / peak if peak else float("nan")
        s["update_mfu_cpu"] = s.get("update_flops_per_cpu_s", float("nan")) / peak_cpu if peak_cpu else float("nan")
        for key, rate in (("gen_roof_cpu", stream_cpu), ("gen_read_cpu", read_cpu)):
            if rate and s.get("gen_weight_bytes") and s.get("generate_cpu"):
                s[key] = s["gen_weight_bytes"] / rate / s["generate_cpu"]
        return s

    a, b = fill(lmpo), fill(trl)
    rows = []
    for label, key, fmt, _ in ROWS:
        if key not in a and (b is None or key not in b) and key not in ("update_mfu", "update_mfu_cpu"):
            continue
        va = a.get(key, float("nan"))
        vb = b.get(key, float("nan")) if b else None
        ratio = f"{va / vb:.2f}x" if vb not in (None, 0) and vb == vb and va == va else "-"
        rows.append((label, fmt.format(va), "-" if vb is None else fmt.format(vb), ratio))
    return rows


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
