"""benchmarks/: result parsing, aggregation, FLOP counting, the lmpo worker on the tiny model, and memory scaling."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402

from lmpo.models import build_tiny_model, response_logprobs  # noqa: E402
from unit._memory import LargestTensor  # noqa: E402


def step(gen, score, lp, upd, total, tokens=64.0):
    return {"generate_s": gen, "score_s": score, "logprob_s": lp, "update_s": upd, "step_s": total, "tokens": tokens}


def test_parse_takes_last_marker_line_and_errors_without_one():
    out = "noise\n" + report.emit({"a": 1}) + "\nmore noise\n" + report.emit({"a": 2}) + "\n"
    assert report.parse_worker_output(out) == {"a": 2}
    with pytest.raises(report.BenchError, match="BENCH_RESULT"):
        report.parse_worker_output("Traceback ...\nValueError: boom")


def test_step_phases_medians_and_other():
    steps = [step(1.0, 0.1, 0.0, 2.0, 3.5), step(3.0, 0.1, 0.2, 4.0, 7.5), step(2.0, 0.1, 0.1, 3.0, 5.4)]
    ph = report.step_phases(steps)
    assert ph["generate_s"] == 2.0 and ph["update_s"] == 3.0 and ph["step_s"] == 5.4 and ph["logprob_s"] == 0.1
    # other = step - gen - score - logprob - update per step: 0.4, 0.2, 0.2 -> median 0.2
    assert ph["other_s"] == pytest.approx(0.2)
    # tokens/s per step: 64/1, 64/3, 64/2 -> median 32
    assert ph["tokens_per_s"] == pytest.approx(32.0)


def test_summarize_is_median_over_runs_and_ratios():
    def run(scale, rss):
        return {"steps": [step(scale, 0.0, 0.0, scale, 2 * scale)], "peak_rss_gb": rss, "base_rss_gb": 1.0,
                "update_flops": 100.0 * scale}

    lm = report.summarize([run(1.0, 2.0), run(3.0, 4.0), run(2.0, 3.0)])
    assert lm["runs"] == 3 and lm["step_s"] == 4.0 and lm["peak_rss_gb"] == 3.0
    assert lm["update_flops_per_s"] == pytest.approx(100.0)  # flops / update_s is 100 in every run
    tr = report.summarize([run(4.0, 6.0)])
    rows = {r[0]: r for r in report.ratio_rows(lm, tr, peak=400.0)}
    assert rows["step time (s)"][1:] == ("4.00", "8.00", "0.50x")
    assert rows["peak RSS (GB)"][3] == "0.50x"
    assert rows["update / matmul peak (wall)"][1] == "25.0%"
    assert "step CPU time (CPU-s)" not in rows  # no CPU timings recorded: those rows are left out
    no_trl = {r[0]: r for r in report.ratio_rows(lm, None, peak=None)}
    assert no_trl["step time (s)"][2:] == ("-", "-") and no_trl["update / matmul peak (wall)"][1] == "nan%"


def test_cpu_time_rows_and_peak():
    st = dict(step(2.0, 0.0, 0.0, 4.0, 8.0), generate_cpu=1.0, score_cpu=0.0, logprob_cpu=0.0, update_cpu=2.0,
              step_cpu=3.5)
    s = report.summarize([{"steps": [st], "peak_rss_gb": 1.0, "update_flops": 100.0}])
    assert s["other_cpu"] == pytest.approx(0.5) and s["tokens_per_cpu_s"] == pytest.approx(64.0)
    rows = {r[0]: r for r in report.ratio_rows(s, s, peak=100.0, peak_cpu=200.0)}
    # 100 FLOP / 2 CPU-s = 50 FLOP per CPU-s = 25% of a 200 FLOP/CPU-s peak; per wall second 100/4 = 25%.
    assert rows["update / matmul peak (CPU time)"][1:] == ("25.0%", "25.0%", "1.00x")
    assert rows["update / matmul peak (wall)"][1] == "25.0%"


def test_generation_fraction_of_decode_matmul_rate_and_memory_read_bound():
    # T=4 tokens, 10 + 6 matmul weights of 4 bytes: 4 * 16 * 4 = 256 bytes read; at 128 bytes per CPU-s that takes
    # 2 CPU-s; generation took 8 CPU-s -> 25% of the bound.
    st = dict(step(2.0, 0.0, 0.0, 4.0, 8.0), generate_cpu=8.0, score_cpu=0.0, logprob_cpu=0.0, update_cpu=1.0,
              step_cpu=9.0)
    run = {"steps": [st], "peak_rss_gb": 1.0, "update_flops": 1.0, "spec": {"length": 4},
           "shape": {"body_params": 10, "head_params": 6}}
    s = report.summarize([run])
    assert s["gen_weight_bytes"] == 256.0
    stream = report.stream_peak([{"stream_bytes_per_cpu_s": 100.0}, {"stream_bytes_per_cpu_s": 128.0}, {}],
                                "stream_bytes_per_cpu_s")
    assert stream == 128.0 and report.stream_peak([{}]) is None
    rows = {r[0]: r for r in report.ratio_rows(s, None, peak=None, stream_cpu=stream, read_cpu=4 * stream)}
    assert rows["generation / decode-matmul rate (CPU time)"][1] == "25.0%"
    assert rows["generation / memory-read bound (CPU time)"][1] == "6.2%"  # reading 4x faster: 0.5 of 8 CPU-s


def test_matmul_peak_is_best_per_dtype():
    runs = [{"peak_flops": {"fp32": 1.0, "bf16": 5.0}}, {"peak_flops": {"fp32": 2.0, "bf16": 3.0}}]
    assert report.matmul_peak(runs) == {"fp32": 2.0, "bf16": 5.0}


def test_update_flops_hand_count():
    # body: 2*N per position fwd; head: 2*H*V per response token; attention: 4*H per (query, key) pair and layer.
    # N=10, head=6, L=2, H=3, rows=2 distinct prompts, P=1, T=3 (S=4), response=5:
    #   positions 2*1 + 2*3 = 8; pairs per row 1/2 + 3*1 + 9/2 = 8 (= S^2/2) -> 16
    #   fwd = 2*10*8 + 2*6*5 + 4*2*3*16 = 160 + 60 + 384 = 604; fwd+bwd = 3 * 604 = 1812.
    kw = dict(body_params=10, head_params=6, layers=2, hidden=3, rows=2, prompt_len=1, response_len=3,
              response_tokens=5)
    assert report.update_flops(**kw) == 1812.0
    # the two rows share one prompt of P=2 (T=2): positions 1*2 + 2*2 = 6; pairs 2 + 2*(4 + 2) = 14
    #   fwd = 2*10*6 + 60 + 24*14 = 120 + 60 + 336 = 516 -> 1548
    kw.update(prompt_len=2, response_len=2, prompts=1)
    assert report.update_flops(**kw) == 1548.0


def test_markdown_table_shape():
    md = report.markdown_table(("a", "b"), [("1", "2")]).splitlines()
    assert md == ["| a | b |", "|---|---|", "| 1 | 2 |"]




def largest_tensor_of_update(rows: int, T: int, vocab: int, chunk: int = 16, P: int = 4) -> tuple[int, int]:
    m = build_tiny_model(seed=0, vocab_size=vocab)
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (rows, P), generator=g)
    response_ids = torch.randint(3, vocab, (rows, T), generator=g)
    mode = LargestTensor()
    with mode:
        lp, ent = response_logprobs(m, prompt_ids, None, response_ids, torch.ones(rows, T, dtype=torch.bool),
                                    chunk_size=chunk, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
    return mode.largest, m.config.hidden_size


def test_update_memory_grows_with_bt_never_bt_vocab():
    """The claim behind the scaling table, counted exactly on the tiny Llama (every tensor any op produces).

    With a large vocabulary the biggest tensors of the log-prob + backward pass are vocabulary-sized weights
    (V x H: embedding / head and their gradients) or one chunk of logits (chunk x V); quadrupling B*T leaves the
    largest tensor unchanged, while a (B, T, V) logits tensor would have grown 4x.
    """
    V = 4096
    small, H = largest_tensor_of_update(rows=4, T=32, vocab=V)
    big, _ = largest_tensor_of_update(rows=8, T=64, vocab=V)
    assert small == big == max(V * H, 16 * V)
    assert big < 8 * 64 * V / 8


def test_lmpo_worker_on_tiny_model(tmp_path):
    """The worker runs lmpo's real training loop and reports every phase of every measured step."""
    import workers
    from lmpo.rollout.hf import HFGenerator

    before = (HFGenerator.__init__, HFGenerator.generate)
    spec = {"side": "lmpo", "model": "tiny", "group": 4, "length": 6, "steps": 2, "warmup": 1, "threads": 1,
            "seed": 0, "fixed_length": True, "precision": "fp32", "overrides": []}
    res = workers.run_lmpo(spec)
    assert (HFGenerator.__init__, HFGenerator.generate) == before  # the worker's timers are removed again
    json.dumps(res)  # what the orchestrator receives must be JSON
    assert len(res["steps"]) == 1
    s = res["steps"][0]
    assert s["tokens"] == 4 * 6  # fixed length: EOS suppressed, every row samples exactly `length` tokens
    assert all(s[k] >= 0 for k in report.PHASES if k != "other_s")
    assert s["step_s"] >= s["generate_s"] + s["update_s"]
    assert res["peak_rss_gb"] >= res["base_rss_gb"] > 0 and math.isfinite(res["update_flops"])


def test_fused_adamw_matches_the_simple_path():
    """The loop's fused AdamW (a benchmark lever) gives the same parameters as the for-loop implementation."""
    a, b = build_tiny_model(seed=0), build_tiny_model(seed=0)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step(), opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
