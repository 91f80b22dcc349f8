"""The main job on a quiet machine and with one competing busy process, before and after lmpo's thread choice.

    python benchmarks/contention.py [--parts matmul,step] [--rounds 3] [--steps 3] [--wait-quiet 300]
                                    [--out docs/results/contention]      (or: make bench-contention)

Two measurements, each in fresh subprocesses (OpenMP reads its environment once, when torch loads it):

- ``matmul``: the decode-shape product (8 x 576 by 576 x 1536) through torch and through lmpo's few-row kernel,
  mean microseconds over ~1 s of back-to-back calls, for the old behaviour (2 threads, libgomp's default spin-wait,
  stated as ``GOMP_SPINCOUNT=300000``), one thread, ``OMP_WAIT_POLICY=PASSIVE``, a few spin counts and the new
  default (lmpo's spin count and ``train.threads: auto``); ``--rounds`` interleaved repetitions, medians reported.
- ``step``: ``lmpo train configs/default.yaml`` for ``--steps`` steps (no evaluation, run folder in a temporary
  directory), old (``train.threads=2``, ``GOMP_SPINCOUNT=300000``) against new (the default config as shipped);
  the median ``perf/step_s`` of the steps after the first.

Each is run with the machine as it is, then with ONE competing busy process that this script starts (a
single-threaded Python loop with a deadline, killed at the end). Before each "as is" block the script waits up to
``--wait-quiet`` seconds for other processes to use less than 0.3 cores. Every measurement records the 1-minute load
average and the CPU that processes other than the measured one and the competitor used meanwhile (in cores): on a
shared machine "quiet" is only as quiet as that column says.
Writes ``OUT.json`` (everything) and ``OUT.md`` (tables, the CPU model and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LMPO_GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
OLD_ENV = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own default, stated so that lmpo leaves it alone


# --------------------------------------------------------------------------- machine state
def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def proc_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Window:
    """CPU used by everything but the measured subprocess(es) and the competitor, over a stretch of wall time."""

    def __init__(self, competitor: subprocess.Popen | None):
        self.competitor = competitor

    def __enter__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0, self.load0 = time.perf_counter(), loadavg()
        self.busy0, _ = cpu_jiffies()
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.comp0 = proc_jiffies(self.competitor.pid) if self.competitor else 0
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy = cpu_jiffies()[0] - self.busy0
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = (ch.ru_utime - self.children0.ru_utime + ch.ru_stime - self.children0.ru_stime) * self.hz
        comp = (proc_jiffies(self.competitor.pid) - self.comp0) if self.competitor else 0
        self.state = {"wall_s": round(wall, 2), "load1_before": self.load0, "load1_after": loadavg(),
                      "others_cores": round(max(0.0, busy - mine - comp) / self.hz / max(wall, 1e-9), 2),
                      "competitor_cores": round(comp / self.hz / max(wall, 1e-9), 2)}


def others_cores(seconds: float = 2.0) -> float:
    b0, _ = cpu_jiffies()
    time.sleep(seconds)
    return (cpu_jiffies()[0] - b0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_quiet(limit_s: float, log) -> dict:
    """Wait (up to limit_s) until the machine's other processes use < 0.3 cores over 2 s."""
    t0, seen = time.time(), None
    while True:
        seen = others_cores()
        if seen < 0.3 or time.time() - t0 > limit_s:
            break
    log(f"  machine: {seen:.2f} cores busy before the block (waited {time.time() - t0:.0f} s)")
    return {"cores_busy_before": round(seen, 2), "waited_s": round(time.time() - t0)}


BUSY = "import time, sys\nend = time.time() + float(sys.argv[1])\nx = 0\nwhile time.time() < end:\n    x += 1\n"


def start_competitor(seconds: float) -> subprocess.Popen:
    # its own session, as a program started from another terminal (with CFS autogroups, the default on desktop
    # kernels, a session is a scheduling group of its own)
    return subprocess.Popen([sys.executable, "-c", BUSY, str(seconds)], start_new_session=True)


def stop(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------- workers (fresh processes)
def env_for(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def worker_matmul(threads: str, seconds: float) -> dict:
    import lmpo  # noqa: F401  (before torch: lmpo's OpenMP setting, unless the environment has one)
    import torch

    from lmpo.engine import threads as th
    from lmpo.engine.kernels import rowdot

    if threads == "auto":
        choice = th.choose_threads("auto")
        th.apply_threads(choice)
        chosen = choice.as_dict()
    else:
        torch.set_num_threads(int(threads))
        chosen = {"threads": int(threads)}
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 576, generator=g), torch.randn(1536, 576, generator=g)
    wt = w.T.contiguous()

    def mean_us(fn) -> float:
        for _ in range(20):
            fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                fn()
            n += 10
        return (time.perf_counter() - t0) / n * 1e6

    out = {"chosen": chosen, "torch_mm_us": round(mean_us(lambda: torch.mm(x, wt)), 1)}
    if rowdot.available():
        out["rowdot_us"] = round(mean_us(lambda: rowdot.rowdot(x, w)), 1)
    out["openmp"] = th.OPENMP
    return out


MATMUL_VARIANTS = [  # (label, environment, threads)
    ("old: 2 threads, libgomp default spin (GOMP_SPINCOUNT=300000)", OLD_ENV, "2"),
    ("1 thread", {}, "1"),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, "2"),
    *((f"2 threads, GOMP_SPINCOUNT={n}", {"GOMP_SPINCOUNT": str(n)}, "2") for n in (300, 1000, 3000, 10000, 30000)),
    ("new: lmpo's spin count, 2 threads", {}, "2"),
    ("new default: lmpo's spin count, threads auto (probe)", {}, "auto"),
]


def run_matmul(label, extra, threads, competitor, seconds, log) -> dict:
    cmd = [sys.executable, __file__, "--worker", "matmul", "--threads", threads, "--seconds", str(seconds)]
    with Window(competitor) as w:
        p = subprocess.run(cmd, env=env_for(extra), capture_output=True, text=True, timeout=600,
                           start_new_session=True)
    if p.returncode != 0:
        raise RuntimeError(f"matmul worker failed ({label}): {p.stderr[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(w.state)
    log(f"    {label:<58} torch {res['torch_mm_us']:>9.1f} us  rowdot {res.get('rowdot_us', float('nan')):>8.1f} us"
        f"  threads {res['chosen']['threads']}  others {res['others_cores']:.2f} cores  load {res['load1_before']:.2f}")
    return res


def run_step(label, extra, overrides, steps, competitor, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmpo-contention-") as tmp:
        cmd = [sys.executable, "-m", "lmpo.cli", "train", str(ROOT / "configs" / "default.yaml"),
               f"train.steps={steps}", "eval.every=0", "eval.at_start=false", "eval.num_prompts=1",
               f"output.dir={tmp}", "output.run_name=r", "output.progress=false", "output.plot=false",
               "output.checkpoint_every=0", *overrides]
        with Window(competitor) as w:
            p = subprocess.run(cmd, env=env_for(extra), capture_output=True, text=True, timeout=7200, cwd=ROOT,
                               start_new_session=True)
        if p.returncode != 0:
            raise RuntimeError(f"training failed ({label}): {p.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines() if line]
        summary = json.loads((Path(tmp) / "r" / "summary.json").read_text())
    rows = [r for r in rows if "perf/step_s" in r]
    later = rows[1:] or rows
    med = lambda key: sorted(r[key] for r in later)[len(later) // 2]  # noqa: E731
    res = {"step_s": [round(r["perf/step_s"], 2) for r in rows], "median_step_s": round(med("perf/step_s"), 2),
           "median_generate_s": round(med("perf/generate_s"), 2),
           "median_update_s": round(med("perf/update_s"), 2) if all("perf/update_s" in r for r in later) else None,
           "threads": summary.get("threads"), **w.state}
    log(f"    {label:<44} step {res['median_step_s']:>7.2f} s (all {res['step_s']})  generation "
        f"{res['median_generate_s']:.2f} s  others {res['others_cores']:.2f} cores  load {res['load1_before']:.2f}")
    return res


STEP_VARIANTS = [  # (label, environment, overrides)
    ("old: train.threads=2, GOMP_SPINCOUNT=300000", OLD_ENV, ["train.threads=2"]),
    ("lmpo's spin count alone: train.threads=2", {}, ["train.threads=2"]),
    ("new default (configs/default.yaml as shipped)", {}, []),
]


# --------------------------------------------------------------------------- report
def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def fmt(x, unit=""):
    return "-" if x is None else (f"{x:,.0f}{unit}" if x >= 100 else f"{x:.1f}{unit}")


def spin_count() -> int:
    """lmpo's SPIN_COUNT, read from the source (importing lmpo would set GOMP_SPINCOUNT in this process)."""
    import ast

    tree = ast.parse((ROOT / "src" / "lmpo" / "engine" / "threads.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SPIN_COUNT" for t in node.targets):
            return ast.literal_eval(node.value)
    return -1


def summary_lines(data: dict) -> list[str]:
    """One sentence per part: old -> new, as is and +1 busy (medians)."""
    lines = []
    steps = {(r["variant"], r["condition"]): r["median_step_s"] for r in data.get("step", [])}
    old, new = STEP_VARIANTS[0][0], STEP_VARIANTS[-1][0]
    if all((v, c) in steps for v in (old, new) for c in ("as is", "+1 busy")):
        lines.append(f"**Main job, seconds per step, old -> new default:** as is {steps[(old, 'as is')]:.1f} -> "
                     f"{steps[(new, 'as is')]:.1f}; with one busy process {steps[(old, '+1 busy')]:.1f} -> "
                     f"{steps[(new, '+1 busy')]:.1f}.")
    mm = data.get("matmul", [])
    old, new = MATMUL_VARIANTS[0][0], MATMUL_VARIANTS[-1][0]
    cell = {}
    for v in (old, new):
        for c in ("as is", "+1 busy"):
            cell[v, c] = median(r["torch_mm_us"] for r in mm if r["variant"] == v and r["condition"] == c)
    if all(x is not None for x in cell.values()):
        lines.append(f"**Decode-shape matmul (torch), microseconds, old -> new default:** as is "
                     f"{cell[old, 'as is']:,.0f} -> {cell[new, 'as is']:,.0f}; with one busy process "
                     f"{cell[old, '+1 busy']:,.0f} -> {cell[new, '+1 busy']:,.0f}.")
    return [*(f"{x}\n" for x in lines)]


def write_report(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    m = data["machine"]
    lines = [
        "# Threads under contention: the main job on a quiet machine and beside one busy process",
        "",
        f"Command: `{data['command']}` ({data['date']}"
        + (f"; earlier results kept from `{'`, `'.join(c for c in data.get('commands', [])[:-1] if c)}`"
           if len(data.get("commands", [])) > 1 else "") + f"). Machine: {m['cpu']}, {m['cpus']} CPUs (affinity "
        f"{m['affinity']}), torch {m['torch']}, OpenMP runtime {m['openmp_runtime']}. Raw numbers: "
        f"[{out.with_suffix('.json').name}]({out.with_suffix('.json').name}).",
        "",
        *summary_lines(data),
        "\"as is\" is the machine as the script found it; it is shared with other jobs, so the *others* column gives "
        "the CPU (in cores, of "
        f"{m['cpus']}) that processes other than the measured one and the competitor used during each measurement, "
        "and *load* the 1-minute load average at its start (it counts the measured process's own threads too). "
        "\"+1 busy\" adds one single-threaded Python busy loop started by the script in a session of its own (as a "
        "program started from another terminal). A step measurement during which other processes used more than "
        "0.3 cores is repeated (`--retries`; single rows can be measured again with `--only` and `--conditions`, "
        "and the command line above lists every invocation whose rows are in the tables); the discarded "
        "measurements are listed at the end.",
        "",
    ]
    if data.get("matmul"):
        lines += ["## The decode-shape matmul (8 x 576 by 576 x 1536)", "",
                  f"Mean microseconds per call over {data['args']['seconds']} s of back-to-back calls, median of "
                  f"{data['args']['rounds']} interleaved rounds; *threads* is the count used (auto: what the probe "
                  "chose). torch = `torch.mm` (MKL); rowdot = lmpo's few-row kernel (the decode path of the default "
                  "model on AVX2 CPUs). The row *new: lmpo's spin count, 2 threads* is the same setting as the "
                  f"`GOMP_SPINCOUNT={spin_count()}` row, measured again: the difference between the two is noise.",
                  "",
                  "| variant | as is: torch | rowdot | threads | others, load | +1 busy: torch | rowdot | threads "
                  "| others, load |", "|---|---|---|---|---|---|---|---|---|"]
        for label, *_ in MATMUL_VARIANTS:
            cells = [label]
            for cond in ("as is", "+1 busy"):
                rs = [r for r in data["matmul"] if r["variant"] == label and r["condition"] == cond]
                if not rs:
                    cells += ["-"] * 4
                    continue
                th = sorted({str(r["chosen"]["threads"]) for r in rs})
                cells += [fmt(median(r["torch_mm_us"] for r in rs)), fmt(median(r.get("rowdot_us") for r in rs)),
                          "/".join(th),
                          f"{median(r['others_cores'] for r in rs):.2f}, {median(r['load1_before'] for r in rs):.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if data.get("step"):
        lines += ["## The main job's step (`configs/default.yaml`)", "",
                  f"`lmpo train configs/default.yaml train.steps={data['args']['steps']}` without evaluation; median "
                  "seconds per step after the first (generation in brackets); *threads* as the run's summary.json "
                  "records it (the count chosen at start; where the re-probe before a step moved it, how many steps ran at "
                  "each count).", "",
                  "| variant | as is: step (generation) | threads | others, load | +1 busy: step (generation) | "
                  "threads | others, load |", "|---|---|---|---|---|---|---|"]
        for label, *_ in STEP_VARIANTS:
            cells = [label]
            for cond in ("as is", "+1 busy"):
                rs = [r for r in data["step"] if r["variant"] == label and r["condition"] == cond]
                if not rs:
                    cells += ["-"] * 3
                    continue
                r = rs[-1]
                t = r.get("threads") or {}
                by = t.get("steps_by_threads") or {} if isinstance(t, dict) else {}
                moved = f"; steps run at {', '.join(f'{k}: {v}' for k, v in sorted(by.items()))}" if (
                    set(by) - {str(t.get("threads"))}) else ""
                cells += [f"{r['median_step_s']:.1f} s ({r['median_generate_s']:.1f} s)",
                          f"{t.get('threads')} ({t.get('source')}{moved})" if isinstance(t, dict) else str(t),
                          f"{r['others_cores']:.2f}, {r['load1_before']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if data.get("step_discarded"):
        lines += ["## Discarded step measurements (other jobs used the machine meanwhile)", "",
                  "| variant | condition | step (generation) | threads | others, load |", "|---|---|---|---|---|"]
        for r in data["step_discarded"]:
            t = r.get("threads") or {}
            lines.append(f"| {r['variant']} | {r['condition']} | {r['median_step_s']:.1f} s "
                         f"({r['median_generate_s']:.1f} s) | {t.get('threads')} ({t.get('source')}) | "
                         f"{r['others_cores']:.2f}, {r['load1_before']:.2f} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def machine() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True, env=env_for({}))
    runtime = "unknown"
    try:
        import glob

        import importlib.util

        spec = importlib.util.find_spec("torch")
        libs = [x for pat in ("libgomp*.so*", "libiomp*.so*", "libomp*.so*")
                for x in glob.glob(os.path.join(os.path.dirname(spec.origin), "lib", pat))] if spec else []
        runtime = ", ".join(sorted(os.path.basename(x) for x in libs)) or "unknown"
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "affinity": affinity, "torch": probe.stdout.strip(),
            "openmp_runtime": runtime, "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="matmul,step", help="comma-separated: matmul, step")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the matmul measurements")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds of calls per matmul measurement")
    ap.add_argument("--steps", type=int, default=3, help="training steps per step measurement (the first is dropped)")
    ap.add_argument("--wait-quiet", type=float, default=300, help="seconds to wait for a quiet machine per block")
    ap.add_argument("--retries", type=int, default=1,
                    help="step measurements during which other processes used more than 0.3 cores are repeated "
                         "(after waiting for quiet again) up to this many times")
    ap.add_argument("--only", action="append", default=[],
                    help="measure only the variants whose label contains this text (repeatable); the other "
                         "variants' results already in OUT.json are kept")
    ap.add_argument("--conditions", default="as is,+1 busy", help="comma-separated: as is, +1 busy")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "contention"), help="writes OUT.json, OUT.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json, measure nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="2", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "matmul":
        print(json.dumps(worker_matmul(a.threads, a.seconds)))
        return 0
    if a.report_only:
        write_report(Path(a.out), json.loads(Path(a.out).with_suffix(".json").read_text()))
        return 0
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    conditions = [c.strip() for c in a.conditions.split(",") if c.strip()]
    chosen = lambda label: not a.only or any(o in label for o in a.only)  # noqa: E731
    log = lambda s: print(s, flush=True)  # noqa: E731
    out = Path(a.out)
    command = "python benchmarks/contention.py " + shlex.join(sys.argv[1:])
    data = {"command": command, "commands": [], "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "args": vars(a), "matmul": [], "step": []}
    if out.with_suffix(".json").exists():  # keep what is not measured again now
        old = json.loads(out.with_suffix(".json").read_text())
        data["commands"] = old.get("commands") or [old.get("command")]
        again = {("matmul", v[0], c) for v in MATMUL_VARIANTS for c in conditions if "matmul" in parts and chosen(v[0])}
        again |= {("step", v[0], c) for v in STEP_VARIANTS for c in conditions if "step" in parts and chosen(v[0])}
        for part in ("matmul", "step"):
            data[part] = [r for r in old.get(part, []) if (part, r["variant"], r["condition"]) not in again]
        data["step_discarded"] = old.get("step_discarded", [])
    data["commands"].append(command)
    log(f"{data['machine']['cpu']}, {data['machine']['cpus']} CPUs; parts {parts}")
    competitor = None
    try:
        if "matmul" in parts:
            for r in range(a.rounds):
                for cond in conditions:
                    log(f"matmul round {r + 1}/{a.rounds}, {cond}")
                    quiet = wait_quiet(a.wait_quiet, log)
                    if cond == "+1 busy":
                        competitor = start_competitor(3600)
                        time.sleep(0.5)
                    for label, extra, threads in MATMUL_VARIANTS:
                        if chosen(label):
                            res = run_matmul(label, extra, threads, competitor, a.seconds, log)
                            data["matmul"].append({"variant": label, "condition": cond, "round": r, "quiet": quiet,
                                                   "date": time.strftime("%Y-%m-%d %H:%M"), **res})
                    stop(competitor)
                    competitor = None
            write_report(out, data)
        if "step" in parts:
            for cond in conditions:
                for label, extra, overrides in STEP_VARIANTS:
                    if not chosen(label):
                        continue
                    for attempt in range(a.retries + 1):
                        log(f"step, {cond}" + (f" (again: others used the machine, attempt {attempt + 1})"
                                               if attempt else ""))
                        quiet = wait_quiet(a.wait_quiet, log)
                        if cond == "+1 busy":
                            competitor = start_competitor(7200)
                            time.sleep(0.5)
                        res = run_step(label, extra, overrides, a.steps, competitor, log)
                        stop(competitor)
                        competitor = None
                        if res["others_cores"] <= 0.3:
                            break
                        data.setdefault("step_discarded", []).append(
                            {"variant": label, "condition": cond, "quiet": quiet, **res,
                             "why": "other processes used more than 0.3 cores meanwhile; measured again"})
                    data["step"].append({"variant": label, "condition": cond, "quiet": quiet,
                                         "date": time.strftime("%Y-%m-%d %H:%M"), **res})
                    write_report(out, data)
    finally:
        stop(competitor)
    write_report(out, data)
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
