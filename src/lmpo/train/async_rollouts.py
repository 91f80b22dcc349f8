"""Rollout collection for the loop: synchronous, or asynchronous in a producer thread (``train.async``).

Synchronous (:class:`SyncRollouts`, the default): step t collects with the weights after t - 1 updates, then
updates.

Asynchronous (:class:`AsyncRollouts`, ``train.async: {max_staleness: k}``): a producer thread runs
:func:`lmpo.train.rollouts.collect` on its own copy of the policy (the *snapshot*) while the main thread trains, so
the generation of steps t+1..t+k overlaps the update of step t. The schedule is fixed, never timing-dependent:

* **Versions.** Version v is the policy after v updates (the trainer publishes version t after step t, once its
  evaluation and checkpoint are done). Step t's batch is sampled by version ``max(0, t - 1 - k)``, so its staleness
  ``(t - 1) - version`` is ``min(t - 1, k)``, never more than k. The producer loads a version into the snapshot (the
  trainable weights only) just before it samples the first step that needs it; a version no step needs is not kept.
  Batches carry their version (metrics ``async/policy_version``, ``async/staleness``, ``async/queue_depth``:
  batches ready beside the one taken, ``async/wait_s``: how long the trainer waited for it).
* **Bound.** Step t + k + 1 needs version t, so the producer is never more than k + 1 steps ahead of the last
  finished update: at most k + 1 batches (and at most k + 1 published versions) are held.
* **Randomness.** With k >= 1 the producer draws its tokens from a generator seeded by (train.seed, step), never
  from the global RNG the trainer draws from, so what a step samples does not depend on thread timing. With k = 0
  the producer samples step t + 1 only after step t is published and the trainer waits for it: the threads strictly
  alternate, and the producer draws from the global RNG exactly where the synchronous loop does, so k = 0 gives the
  synchronous trainer's numbers bit for bit (tests/unit/test_async.py).
* **Off-policy data.** With k >= 1 the producer also runs pi_old's pass on the snapshot
  (:func:`lmpo.train.prepare.behaviour_pass`): a batch's ``old_logprobs`` (and entropies, ``old_<stat>``) are those
  of the version that sampled it, as are its ``sampler_logprobs``, and the update reads pi_old from the batch even
  on-policy. Every ratio pi / pi_old (PPO/GRPO clipping, REC, TOPR, CISPO, ...) is therefore a real off-policy ratio
  over up to k updates, and ``ppo_clip_is`` (TIS/MIS) keeps correcting the sampler-vs-trainer mismatch at the
  behaviour version (docs/async.md).
* **Checkpoints.** At a checkpoint after step t the trainer waits until steps t+1..t+k (those sampled by versions it
  has already published) are in the queue, and saves them with the checkpoint, together with the prompt stream's
  position after them. A resumed run starts with that queue and samples step t + k + 1 with the restored weights
  (version t): nothing generated is lost or used twice, and a resumed run equals the uninterrupted one.

The producer runs collection only: prompts, sampling, rewards, shapers and selectors. Pipelines whose collection
stage has state or hooks that learn from training (prompt priorities, budgets, injected prompts, ``after_collect``,
stateful shapers or selectors) and rollout modes other than ``sample`` are refused (:func:`unsupported`).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lmpo.batch import RolloutBatch
from lmpo.errors import LmpoError
from lmpo.methods.base import EXTENSION_POINTS
from lmpo.train.prepare import behaviour_pass
from lmpo.train.rollouts import RolloutContext, collect
from lmpo.train.step import PolicyRunner


@dataclass
class Collected:
    """One step's collection: the training batch (None if every group was filtered), the first round's raw batch,
    collection statistics, and for asynchronous collection the policy version that sampled it."""

    step: int
    batch: RolloutBatch | None
    raw: RolloutBatch
    stats: dict[str, Any]
    generate_s: float
    version: int | None = None
    behaviour: bool = False  # the batch carries pi_old's fields from the policy that sampled it (prepare's flag)
    behaviour_s: float = 0.0  # the producer's time for those fields (behaviour_pass)
    metrics: dict[str, float] = field(default_factory=dict)


def unsupported(cfg, pipeline) -> str:
    """Why ``train.async`` cannot run this config ("" when it can)."""
    if cfg.rollout.mode != "sample":
        return (f"rollout.mode={cfg.rollout.mode!r} generates with the trainer's own model; train.async supports "
                "rollout.mode=sample")
    if cfg.rollout.backend != "hf":
        return (f"rollout.backend={cfg.rollout.backend!r}: train.async samples with a copy of the policy in lmpo's own "
                "generator; set rollout.backend=hf")
    collect_points = [p for p, ext in EXTENSION_POINTS.items() if ext.stage.startswith("collect")]
    for role, comp in pipeline.roles.items():
        points = [p for p in collect_points if comp in pipeline.providers.get(p, [])]
        if points:
            return (f'{role} "{type(comp).__name__}" shapes collection ({", ".join(points)}), which train.async '
                    "runs in its producer thread ahead of the update; use it without train.async")
    stateful = [r for r in pipeline.stateful() if r.startswith(("shaper", "selector", "planner"))]
    if stateful:
        comp = pipeline.roles[stateful[0]]
        return (f'{stateful[0]} "{type(comp).__name__}" keeps state across steps and runs during collection, which '
                "train.async runs in its producer thread ahead of the update; use it without train.async")
    return ""


class SyncRollouts:
    """Collection in the trainer's thread, with the trainer's weights (the default)."""

    def __init__(self, ctx: RolloutContext, stream, prompts_per_step: int, refill_rounds: int):
        self.ctx, self.stream = ctx, stream
        self.prompts_per_step, self.refill_rounds = prompts_per_step, refill_rounds

    def start(self, model, start: int) -> None:
        pass

    def next(self, step: int) -> Collected:
        t0 = time.perf_counter()
        batch, raw, stats = collect(self.ctx, self.stream, self.prompts_per_step, self.refill_rounds, step)
        return Collected(step, batch, raw, stats, time.perf_counter() - t0)

    def publish(self, model, step: int) -> None:
        pass  # the generator shares the trainer's model, or train_step synced an external engine right after the update

    def state_dict(self, step: int) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            raise LmpoError(f"This checkpoint was written by an asynchronous run (train.async.max_staleness="
                            f"{state['max_staleness']}) and holds its queued batches; resume it with the same "
                            f"train.async.max_staleness={state['max_staleness']}.")

    def close(self) -> None:
        pass


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The producer's token-draw generator for ``step`` (k >= 1): a function of the seed and the step only, on the
    sampler's device (a CUDA sampler draws with a CUDA generator)."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + 7_919 * int(step) + 104_729) % (2**63))


class AsyncRollouts:
    """Collection in a producer thread on a snapshot of the policy, ``max_staleness`` steps ahead (module
    docstring). ``start`` (after any restore) copies the model and starts the thread; ``next(t)`` blocks until
    step t's batch is ready; ``publish(model, t)`` hands version t over; ``close`` stops the thread."""

    def __init__(self, ctx: RolloutContext, stream, prompts_per_step: int, refill_rounds: int, max_staleness: int,
                 steps: int, seed: int, runner: PolicyRunner, micro_batch_size: int | None):
        self.ctx, self.stream, self.runner, self.micro_batch_size = ctx, stream, runner, micro_batch_size
        self.prompts_per_step, self.refill_rounds = prompts_per_step, refill_rounds
        self.k, self.steps, self.seed = int(max_staleness), int(steps), int(seed)
        self.cond = threading.Condition()
        self.queue: dict[int, Collected] = {}  # step -> its batch, ready for the trainer
        self.published: dict[int, dict[str, torch.Tensor]] = {}  # version -> trainable weights not loaded yet
        self.first = 1  # the first step the producer samples (after the restored queue)
        self.error: BaseException | None = None
        self.stop = False
        self.thread: threading.Thread | None = None
        self.snapshot: torch.nn.Module | None = None
        self.loaded = 0  # the version in the snapshot
        self.floor = 0  # no step is sampled by an older version (raised when a finished run is extended)

    def version_for(self, step: int) -> int:
        return max(self.floor, step - 1 - self.k)

    # ------------------------------------------------------------------ trainer side
    def start(self, model, start: int) -> None:
        """Copy ``model`` (version ``start``, the restored weights) and start producing from the first step not
        already queued."""
        if self.thread is not None:
            raise RuntimeError("AsyncRollouts.start called twice")
        self.first = max([start, *self.queue]) + 1
        if self.first > self.steps:
            return
        self.loaded = start
        if self.version_for(self.first) < start:
            # a finished run extended with a larger train.steps: its last checkpoint holds no batches beyond its
            # last step and the versions before ``start`` are gone, so its next steps are sampled by ``start``
            self.floor = start
        self.snapshot = copy.deepcopy(model).eval()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        gen = copy.copy(self.ctx.generator)  # the same sampler settings, on the snapshot
        gen.model = self.snapshot
        gen.tokenizer = copy.deepcopy(self.ctx.tokenizer)  # encoding flips padding_side: no tokenizer is shared
        self.pctx = dataclasses.replace(self.ctx, generator=gen, tokenizer=gen.tokenizer)
        self.prunner = dataclasses.replace(self.runner, model=self.snapshot)  # the trainer's numerics, on the snapshot
        self.thread = threading.Thread(target=self._produce, name="lmpo-rollouts", daemon=True)
        self.thread.start()

    def next(self, step: int) -> Collected:
        t0 = time.perf_counter()
        with self.cond:
            while step not in self.queue and self.error is None:
                if self.thread is None or not self.thread.is_alive():
                    raise RuntimeError(f"train.async: step {step} was never produced")
                self.cond.wait(0.5)
            if self.error is not None and step not in self.queue:
                raise self.error
            got = self.queue.pop(step)
            depth = sum(1 for s in self.queue if s > step)
            self.cond.notify_all()
        got.metrics = {"async/policy_version": float(got.version), "async/staleness": float(step - 1 - got.version),
                       "async/queue_depth": float(depth), "async/wait_s": time.perf_counter() - t0,
                       "async/behaviour_s": got.behaviour_s}
        return got

    def publish(self, model, step: int) -> None:
        """Version ``step`` (the weights after ``step`` updates), kept only if a later step is sampled by it."""
        if step + 1 + self.k > self.steps or self.thread is None:
            return
        params = dict(model.named_parameters())
        weights = {n: params[n].detach().clone() for n in self.names}
        with self.cond:
            self.published[step] = weights
            self.cond.notify_all()

    def state_dict(self, step: int) -> dict[str, Any]:
        """At the checkpoint after ``step``: the queue, once it holds every step that versions up to ``step - 1``
        sample (steps ``step+1..step+k``), so the prompt stream's position is after them and the producer waits for
        version ``step``; saved with the checkpoint."""
        want = range(max(step + 1, self.first), min(self.steps, step + self.k) + 1)
        with self.cond:
            while self.thread is not None and self.error is None and any(s not in self.queue for s in want):
                if not self.thread.is_alive():
                    raise RuntimeError(f"train.async: the producer stopped before step {step + self.k}")
                self.cond.wait(0.5)
            if self.error is not None:
                raise self.error
            queue = [{f.name: getattr(c, f.name) for f in dataclasses.fields(c)} for c in sorted(
                self.queue.values(), key=lambda c: c.step)]
            return {"max_staleness": self.k, "queue": queue}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None or state.get("max_staleness") != self.k:
            saved = "a synchronous run" if state is None else \
                f"an asynchronous run with train.async.max_staleness={state['max_staleness']}"
            raise LmpoError(f"This checkpoint was written by {saved}; resuming it with train.async.max_staleness="
                            f"{self.k} would lose or repeat batches. Resume with the settings it was written with.")
        self.queue = {int(c["step"]): Collected(**c) for c in state["queue"]}

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()

    # ------------------------------------------------------------------ producer side
    def _wait_version(self, version: int) -> bool:
        """Load ``version`` into the snapshot (waiting until it is published); False when stopped."""
        with self.cond:
            while version != self.loaded and version not in self.published and not self.stop:
                self.cond.wait()
            if self.stop:
                return False
            weights = self.published.pop(version, None)
            for old in [v for v in self.published if v < version]:  # never needed again
                del self.published[old]
        if weights is not None:
            params = dict(self.snapshot.named_parameters())
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w)
            self.loaded = version
        return True

    def _produce(self) -> None:
        try:
            for step in range(self.first, self.steps + 1):
                version = self.version_for(step)
                if not self._wait_version(version):
                    return
                self.pctx.generator.rng = (step_generator(self.seed, step, next(self.snapshot.parameters()).device)
                                           if self.k else None)
                t0 = time.perf_counter()
                batch, raw, stats = collect(self.pctx, self.stream, self.prompts_per_step, self.refill_rounds, step)
                t_gen = time.perf_counter() - t0
                if self.k and batch is not None:  # pi_old = this version (k = 0: the trainer's own, as synchronous)
                    batch = behaviour_pass(batch, self.pctx.pipeline, self.prunner, self.micro_batch_size)
                got = Collected(step, batch, raw, stats, t_gen, version, behaviour=bool(self.k),
                                behaviour_s=time.perf_counter() - t0 - t_gen)
                with self.cond:
                    self.queue[step] = got
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer, which raises it
            with self.cond:
                self.error = exc
                self.cond.notify_all()
