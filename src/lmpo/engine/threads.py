"""Intra-op threads that stay fast on a quiet machine and degrade gracefully on a busy one.

Two settings decide how a run behaves when another process competes for the cores (measured:
docs/results/contention.md, ``benchmarks/contention.py``):

1. **How long OpenMP threads spin before they sleep.** torch's CPU wheel runs its intra-op parallelism, MKL and
   oneDNN on GNU OpenMP (``libgomp``, shipped inside the wheel), and lmpo's own kernels (``kernels/rowdot.c``) run on
   that same runtime (one ``libgomp`` in the process; tested). At the end of every parallel region a thread that is
   done spin-waits for its siblings, and an idle worker spin-waits for the next region, for ``GOMP_SPINCOUNT``
   iterations before it sleeps: libgomp's default is 300,000, about 12 ms of CPU on the machine measured (~40 ns an
   iteration). When another process has taken a sibling's core, the waiter burns its time slice at every region, so
   the decode-shape matmul went from ~0.5 ms to ~6-16 ms beside one busy process. ``OMP_WAIT_POLICY=PASSIVE``
   (sleep at once) avoids that; a short spin (:data:`SPIN_COUNT`, libgomp's own value for oversubscribed teams) does
   nearly as well under contention and measured the same as the default on the quiet machine, both for the matmul
   and for the main job's step. libgomp reads the variable once, when it is loaded (at ``import torch``), so
   :func:`configure_openmp` sets it at ``import lmpo`` (``lmpo/__init__.py``), and only when neither
   ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` is set already: the user's setting wins (``GOMP_SPINCOUNT=300000``
   restores libgomp's default). Where ``torch`` was imported before ``lmpo`` the runtime is already running and
   nothing is changed (:data:`OPENMP` says so). Intel's OpenMP (``KMP_BLOCKTIME``), used by some other builds of
   torch, is not touched: this wheel does not load it, so nothing here was measured with it.
2. **How many threads.** Beside a busy process even a short spin leaves two threads slower than one (a team waits for
   its slowest member, and the scheduler shares the cores with the other process), so ``train.threads: auto`` (the
   default) takes the cores this process may actually use (its CPU affinity, capped by a cgroup CPU quota) and, when
   that is more than one, times the decode-shape matmul (8 x 576 by 576 x 1536) with that many threads and with one,
   alternately, for at most about a tenth of a second (:func:`probe`), and keeps the faster. Over a run,
   :class:`ThreadTuner` probes again before each step that follows a step of :data:`REPROBE_MIN_STEP_S` or more, so
   a process that starts or stops mid-run moves the count. An explicit ``train.threads: N`` always wins; ``null``
   leaves torch's default; ``perf: reference`` resolves ``auto`` to ``null``. lmpo's kernels take torch's count at
   each call (``torch.get_num_threads()``), so they follow the choice.

This module imports torch only inside functions, so ``lmpo/__init__.py`` can call :func:`configure_openmp` before
torch loads.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

SPIN_COUNT = 1000
"""The ``GOMP_SPINCOUNT`` lmpo sets: about 40 us of spinning on the machine measured (PASSIVE, 300, 1,000, 3,000,
10,000, 30,000 and libgomp's 300,000 side by side in docs/results/contention.md)."""
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""Environment variables that, when the user sets either, make lmpo leave OpenMP's waiting alone."""
MARKER = "LMPO_GOMP_SPINCOUNT"
"""Set beside ``GOMP_SPINCOUNT`` when lmpo chose it, so a child process (which inherits both) reports lmpo's choice
rather than the user's."""
RUNTIMES = ("libgomp", "libiomp", "libomp.so")
"""The OpenMP runtimes whose presence in the process means it is too late to set their environment."""
PROBE_SHAPE = (8, 576, 1536)
"""The decode step's product on the default model: 8 rows (one step's batch) by the 576 x 1536 MLP projection."""
PROBE_BUDGET_S = 0.15
"""The probe stops starting new rounds after this long (at least one round of each count always runs)."""
REPROBE_MIN_STEP_S = 3.0
"""``auto`` probes again before a training step when the step before took at least this long (:class:`ThreadTuner`)."""

OPENMP: dict[str, Any] = {"set_by": "not configured (lmpo.engine.threads.configure_openmp was not called)"}
"""What :func:`configure_openmp` found or did in this process (recorded in each run's ``summary.json``)."""


def openmp_runtime_loaded(maps_path: str = "/proc/self/maps") -> bool:
    """Whether an OpenMP runtime is already mapped into this process (then its environment is read and fixed).
    Where ``/proc`` is unavailable: whether torch is imported."""
    try:
        with open(maps_path) as f:
            maps = f.read()
    except OSError:
        return "torch" in sys.modules
    return any(name in maps for name in RUNTIMES)


def configure_openmp(environ: MutableMapping[str, str] | None = None, loaded: bool | None = None) -> dict[str, Any]:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` in ``environ`` (default ``os.environ``) unless the user set
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, or an OpenMP runtime is already loaded (``loaded``; default: looked
    up). Returns, and keeps in :data:`OPENMP`, what applies: the variables and who set them."""
    global OPENMP
    env = os.environ if environ is None else environ
    user = {k: env[k] for k in WAIT_VARIABLES if k in env}
    if user and "OMP_WAIT_POLICY" not in user and env.get(MARKER) == user.get("GOMP_SPINCOUNT"):
        state: dict[str, Any] = {**user, "set_by": "lmpo (inherited from the parent process)"}
    elif user:
        state = {**user, "set_by": "user"}
    elif openmp_runtime_loaded() if loaded is None else loaded:
        state = {"set_by": "nobody: the OpenMP runtime was loaded before lmpo (import lmpo before torch to bound "
                           "its spin-wait); libgomp's default spin applies"}
    else:
        env["GOMP_SPINCOUNT"] = env[MARKER] = str(SPIN_COUNT)
        state = {"GOMP_SPINCOUNT": str(SPIN_COUNT), "set_by": "lmpo"}
    OPENMP = state
    return state


# --------------------------------------------------------------------------- how many cores this process may use
def cgroup_cpu_limit(cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``: quota / period, in the process's own cgroup
    folder, then at the root, a container's view; else v1 ``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None
    when unlimited or unknown."""
    folders = []
    try:
        with open(self_cgroup) as f:
            for line in f:
                if line.startswith("0::"):
                    folders.append(os.path.join(cgroup_root, line[3:].strip().lstrip("/")))
    except OSError:
        pass
    folders.append(cgroup_root)
    for folder in folders:
        try:
            with open(os.path.join(folder, "cpu.max")) as f:
                quota, period = (f.read().split() + ["100000"])[:2]
        except OSError:
            continue
        if quota == "max":
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    try:  # cgroup v1
        with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cores(affinity: Iterable[int] | None = None, quota: float | None | str = "look up") -> int:
    """Cores this process may run on: its CPU affinity (``os.sched_getaffinity``; ``os.cpu_count()`` where there
    is none), capped by the whole cores of a cgroup CPU quota. ``affinity`` / ``quota``: given instead of looked
    up (tests)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = range(os.cpu_count() or 1)
    n = max(1, len(list(affinity)))
    limit = cgroup_cpu_limit() if quota == "look up" else quota
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return n


# --------------------------------------------------------------------------- the probe
def decode_matmul_seconds(threads: int, reps: int = 16) -> float:
    """Mean seconds of the decode-shape matmul (:data:`PROBE_SHAPE`) with ``threads`` intra-op threads."""
    import torch

    rows, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=g), torch.randn(k, n, generator=g)
    torch.set_num_threads(threads)
    with torch.no_grad():
        torch.mm(x, w)  # wakes this thread count's workers
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(x, w)
        return (time.perf_counter() - t) / reps


def probe(n: int, timer: Callable[[int], float] = decode_matmul_seconds, rounds: int = 5,
          budget_s: float = PROBE_BUDGET_S, clock: Callable[[], float] = time.perf_counter) -> tuple[int, dict]:
    """Time ``timer(n)`` and ``timer(1)`` alternately for up to ``rounds`` rounds (fewer once ``budget_s`` is
    spent) and return ``(the faster count, {count: median seconds})``; ``n`` wins ties. ``timer`` is injectable."""
    times: dict[int, list[float]] = {n: [], 1: []}
    start = clock()
    for r in range(rounds):
        if r and clock() - start > budget_s:
            break
        for threads in ((n, 1) if r % 2 == 0 else (1, n)):  # alternate the order: neither count always goes first
            times[threads].append(timer(threads))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return (1 if median[1] < median[n] else n), median


@dataclass
class ThreadChoice:
    """The intra-op thread count of a run and how it was chosen (a run's ``summary.json`` holds it as a dict)."""

    threads: int | None  # None: torch's default was left alone
    source: str  # "config", "torch default", "auto: probe", "auto: one core"
    available_cores: int
    probe_us: dict[str, float] = field(default_factory=dict)  # thread count -> median microseconds per matmul
    openmp: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threads(value: int | str | None, timer: Callable[[int], float] | None = None,
                   cores: int | None = None) -> ThreadChoice:
    """Resolve ``train.threads``: an integer wins as it is; ``None`` keeps torch's default; ``"auto"`` takes
    :func:`available_cores` (or ``cores``) and, above one, the faster of that many and one by :func:`probe`.
    ``timer``: seconds of one probe product at a thread count (default :func:`decode_matmul_seconds`). Measures
    only; :func:`apply_threads` sets torch."""
    cores = available_cores() if cores is None else cores
    if value is None or value == 0:
        return ThreadChoice(None, "torch default", cores, openmp=dict(OPENMP))
    if value != "auto":
        return ThreadChoice(int(value), "config", cores, openmp=dict(OPENMP))
    if cores <= 1:
        return ThreadChoice(1, "auto: one core", cores, openmp=dict(OPENMP))
    import torch

    before = torch.get_num_threads()
    try:
        best, median = probe(cores, timer or decode_matmul_seconds)
    finally:
        torch.set_num_threads(before)
    return ThreadChoice(best, "auto: probe", cores, {str(k): round(v * 1e6, 1) for k, v in median.items()},
                        dict(OPENMP))


class ThreadTuner:
    """``train.threads`` over a run: the choice at start (:func:`choose_threads`) and, for ``auto``, the same probe
    again before each step once a step takes :data:`REPROBE_MIN_STEP_S` or more (the probe then costs a few percent
    of a step at most; a seconds-long tiny run is never re-probed), so that a competing process that starts or stops
    mid-run moves the count. Changing the count between steps does not change results on lmpo's models (tested on
    the tiny model's training run and the default model's passes)."""

    def __init__(self, value: int | str | None, timer: Callable[[int], float] | None = None,
                 cores: int | None = None):
        self.auto, self.timer = value == "auto", timer
        self.first = choose_threads(value, timer, cores)
        self.threads = self.first.threads
        self.steps_by_threads: dict[str, int] = {}
        self.reprobes = 0
        self._last_step_s = 0.0

    def apply(self) -> None:
        apply_threads(self.first)

    def before_step(self) -> int | None:
        """Re-probe when due (``auto``, several cores, the last step long enough) and set torch; the step's count."""
        if self.auto and self.first.available_cores > 1 and self._last_step_s >= REPROBE_MIN_STEP_S:
            import torch

            self.threads, _ = probe(self.first.available_cores, self.timer or decode_matmul_seconds)
            self.reprobes += 1
            torch.set_num_threads(self.threads)
        return self.threads

    def after_step(self, step_s: float) -> None:
        self._last_step_s = step_s
        key = str(self.threads)
        self.steps_by_threads[key] = self.steps_by_threads.get(key, 0) + 1

    def summary(self) -> dict[str, Any]:
        """The choice at start, how many steps ran at each count, and how many re-probes (``summary.json``)."""
        return {**self.first.as_dict(), "steps_by_threads": dict(self.steps_by_threads), "reprobes": self.reprobes}


def apply_threads(choice: ThreadChoice) -> None:
    """Set torch's intra-op threads (which lmpo's kernels read at each call) to the choice; None leaves them."""
    if choice.threads is not None:
        import torch

        torch.set_num_threads(choice.threads)
