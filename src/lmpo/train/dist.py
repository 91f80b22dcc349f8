"""Data-parallel training over several processes (``torchrun``), on torch's own engines (docs/distributed.md).

``torchrun --nproc_per_node N -m lmpo train cfg.yaml`` starts N ranks with the standard ``torch.distributed``
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...; ``accelerate launch --multi_gpu`` sets the same). Each rank:

* builds the same model, pipeline and prompt stream from the same seed (so every rank agrees on the config, the
  step and the data position without talking);
* collects its own share of each step's prompt groups: the stream yields the step's ``prompts_per_step`` rows on
  every rank and rank r keeps rows ``[r*n/N, (r+1)*n/N)`` (:class:`ShardedStream`): a group never straddles ranks;
  it samples them from its own, rank-distinct but seeded, random stream;
* prepares them (old/ref log-probs, group advantages: whole groups per rank, so group statistics are exact);
* runs the update through FSDP2 (``strategy: fsdp2``, the default for decoders: parameters, gradients and AdamW
  states sharded, :meth:`DistRun._shard`) or DDP (``strategy: ddp``); either way the gradients are summed over
  ranks (a SUM reduce-scatter / all-reduce, not the mean: :func:`_sum_hook`) and the loss normaliser is global
  (:meth:`DistRun.global_normaliser`), so N ranks give the gradient of one process holding the whole batch, to
  float rounding; under FSDP2 the updated shards are gathered into whole weights after each update, for sampling
  (:meth:`DistRun.gathered`);
* logs nothing itself: rank 0 owns the run folder, the metrics (reduced over ranks, :meth:`DistRun.reduce_metrics`),
  evaluation and the trackers. Checkpoints are sharded with ``torch.distributed.checkpoint``
  (:mod:`lmpo.train.dist_checkpoint`).

What runs differently, and why, is listed in docs/distributed.md: the folded AdamW is off (it steps each weight
inside backward, before the ranks have summed its gradient); pipelines whose collection learns from training (prompt
priorities, injected prompts, budgets), group-dropping selectors with refills, critics (batch-whitened GAE) and
``train.async`` are refused by :func:`unsupported` with the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmpo.errors import ConfigError

SUM_KEYS = ("loss/total", "rollout/generated", "perf/tokens_per_s")  # metrics that add up over ranks (the rest: row means)


def world_size() -> int:
    """The launcher's ``WORLD_SIZE`` (1 when not launched by torchrun / accelerate / lmpo's Ray placement)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes.") from None


class _Apply(nn.Module):
    """The module DDP wraps: ``forward(fn, *args)`` runs ``fn(model, *args)``. lmpo's log-prob passes reach into the
    model (body, chunked LM head, the packed decoder), never through ``model.forward``; DDP only needs its own
    ``forward`` called around them to arm the gradient hooks of that backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.inner, *args, **kwargs)


def _sum_hook(state, bucket):
    """DDP communication hook: the gradient buckets summed over ranks (DDP's default divides by the world size;
    lmpo's loss is already divided by the global normaliser, so the sum is the whole batch's gradient)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


@dataclass
class DistRun:
    """This process's place in the run: rank, world size, strategy, and the wrapped model."""

    rank: int
    world: int
    strategy: str = "ddp"
    backend: str = "gloo"
    device: str = "cpu"  # where collectives' tensors go: cpu for gloo, this rank's GPU for nccl
    ddp: nn.Module | None = field(default=None, repr=False)  # what train_call runs through: DDP, or FSDP's root
    fsdp: list[nn.Module] = field(default_factory=list, repr=False)  # strategy fsdp2: the fully_shard'ed modules

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module) -> None:
        """Wrap the policy for gradient synchronisation (every rank holds the same initial weights: DDP broadcasts
        rank 0's at construction anyway)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("Nothing to train: the model has no trainable parameter.")
        self.strategy = resolve_strategy(self.strategy, model)
        if self.strategy == "fsdp2":
            self._shard(model)
            return
        # buffers (rotary tables) are built identically on every rank: no per-forward broadcast
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        # gradients live in DDP's buckets (no second copy of every gradient)
        self.ddp = DDP(_Apply(model), find_unused_parameters=False, gradient_as_bucket_view=True, **sync)
        self.ddp.register_comm_hook(None, _sum_hook)

    def _shard(self, model: nn.Module) -> None:
        """FSDP2: each decoder layer and the rest (embeddings, final norm, LM head) as one ``fully_shard`` unit each;
        gradients reduce-scattered as a sum (divide factor 1: the loss is already over the global normaliser)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from lmpo.models.logprobs import split_body_and_head

        body = split_body_and_head(model)[0]
        layers = getattr(body, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ConfigError(f"train.dist.strategy=fsdp2 shards a decoder's layers (body.layers), which "
                              f"{type(body).__name__} does not have; use train.dist.strategy=ddp.")
        # parameters stay gathered through forward and backward (one all-gather per layer per update: ranks may run
        # different numbers of decoder calls per forward); resharded after backward, so AdamW updates the shards
        for layer in layers:
            fully_shard(layer, reshard_after_forward=False)
        self.ddp = fully_shard(_Apply(model), reshard_after_forward=False)
        self.fsdp = [m for m in self.ddp.modules() if isinstance(m, FSDPModule)]
        for m in self.fsdp:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: a plain SUM reduce-scatter

    def gathered(self) -> None:
        """FSDP2: every weight whole on every rank (one all-gather per unit, on all ranks together), for what runs
        outside the update (sampling, no-grad log-prob passes, evaluation on rank 0): a collective-free model, as
        verl's rollout engine holds whole weights beside its FSDP trainer. Nothing under DDP."""
        if self.fsdp:  # FSDP picks its root at the first forward; the root here is the _Apply wrapper (a private
            self.fsdp[0]._get_fsdp_state()._lazy_init()  # call: unshard() alone would make each layer a root)
        for m in self.fsdp:
            m.unshard()

    @contextlib.contextmanager
    def sharded(self):
        """FSDP2: the parameters as their shards (DTensors) inside the block (checkpoints), gathered again after."""
        for m in self.fsdp:
            m.reshard()
        try:
            yield
        finally:
            self.gathered()

    def train_call(self, fn, *args, **kwargs):
        """``fn(model, *args)`` through DDP: the backward of its result sums the gradients over ranks."""
        return self.ddp(fn, *args, **kwargs)

    def accumulate(self, last: bool):
        """Around one micro-batch's forward and backward: gradients are summed over ranks only in the optimizer
        step's last backward (``no_sync`` before it), as DDP's gradient accumulation prescribes."""
        if self.fsdp:  # unsharded gradients accumulate until the last backward reduce-scatters them
            for m in self.fsdp:
                m.set_requires_gradient_sync(last, recurse=False)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()

    # ------------------------------------------------------------------ collectives
    def all_sum(self, t: Tensor) -> Tensor:
        out = t.detach().to(self.device, torch.float64, copy=True)
        dist.all_reduce(out)
        return out.to(t.device, t.dtype)

    def global_normaliser(self, aggregator, mask: Tensor, horizon: int) -> Tensor:
        """The aggregator's normaliser of the union of every rank's mini-batch.

        lmpo's normalisers count rows or tokens (plus a constant: token_sum's 1), i.e. ``n(A u B) = n(A) + n(B) -
        n(empty)``: the sum over ranks minus (N - 1) x the empty batch's value (lmpo.methods.aggregate)."""
        local = aggregator.normaliser(mask, horizon)
        empty = aggregator.normaliser(mask[:0], horizon)
        return self.all_sum(local) - (self.world - 1) * empty

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def reduce_metrics(self, metrics: dict[str, Any], rows: int) -> dict[str, Any]:
        """One metrics row for the whole run: row-weighted means over ranks, sums for :data:`SUM_KEYS`, the
        slowest rank for ``perf/*`` (times, memory)."""
        keys = sorted(set().union(*self.gather(sorted(metrics))))
        vals = torch.zeros(len(keys), 3, dtype=torch.float64)  # (value x rows, rows, max)
        for i, k in enumerate(keys):
            if k in metrics:
                v = float(metrics[k])
                vals[i] = torch.tensor([v if k in SUM_KEYS else v * rows, 0.0 if k in SUM_KEYS else rows, 0.0])
                vals[i, 2] = v
            else:
                vals[i, 2] = float("-inf")
        sums, maxes = vals[:, :2].to(self.device, copy=True), vals[:, 2].to(self.device, copy=True)
        dist.all_reduce(sums)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        sums, maxes = sums.cpu(), maxes.cpu()
        out: dict[str, Any] = {}
        for i, k in enumerate(keys):
            if k in SUM_KEYS:
                out[k] = float(sums[i, 0])
            elif k.startswith("perf/"):
                out[k] = float(maxes[i])
            else:
                out[k] = float(sums[i, 0] / sums[i, 1]) if sums[i, 1] > 0 else float("nan")
        if "perf/peak_rss_gb" in metrics:  # each rank's own peak as well
            for r, v in enumerate(self.gather(float(metrics["perf/peak_rss_gb"]))):
                out[f"perf/peak_rss_gb_rank{r}"] = v
        return out

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def resolve_strategy(name: str, model: nn.Module | None = None) -> str:
    """``train.dist.strategy`` for this model: auto = fsdp2 where the decoder has a ``layers`` list to shard (every
    Hugging Face decoder lmpo trains), ddp otherwise."""
    if name not in ("auto", "ddp", "fsdp2"):
        raise ConfigError(f'train.dist.strategy must be "auto", "ddp" or "fsdp2", got {name!r}.')
    if name != "auto":
        return name
    from lmpo.models.logprobs import split_body_and_head

    body = split_body_and_head(model)[0] if model is not None else None
    return "fsdp2" if isinstance(getattr(body, "layers", None), nn.ModuleList) else "ddp"


def init(cfg) -> DistRun | None:
    """Join the process group the launcher describes (None in a single process)."""
    world = world_size()
    if world <= 1:
        return None
    d = cfg.train.dist
    strategy = d.strategy  # auto is resolved against the model (DistRun.wrap)
    if strategy not in ("auto", "ddp", "fsdp2"):
        raise ConfigError(f'train.dist.strategy must be "auto", "ddp" or "fsdp2", got {strategy!r}.')
    # a CPU run: gloo; a CUDA run (``device``: auto on a GPU machine, or cuda): nccl, one GPU per rank
    # (LOCAL_RANK), written back into cfg.device before the model is built (untested here: no GPU on this machine)
    from lmpo.engine.device import resolve_device

    device = "cpu"
    if resolve_device(cfg.device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
        cfg.device = device
    backend = "nccl" if device != "cpu" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(d.timeout_s)))
    return DistRun(rank=dist.get_rank(), world=dist.get_world_size(), strategy=strategy, backend=backend,
                   device=device)


def shutdown(run: DistRun | None, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first meets the others at a barrier, so no rank tears
    its connections down while another still has a collective in flight with it (a follower that finished first
    could otherwise abort in gloo's threads); after an error, leave at once (the launcher stops the others)."""
    if run is None or not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def unsupported(cfg, pipeline, world: int) -> str:
    """Why this config cannot run on ``world`` ranks ("" when it can)."""
    from lmpo.methods.base import EXTENSION_POINTS

    r, t = cfg.rollout, cfg.train
    if r.prompts_per_step % world:
        return (f"rollout.prompts_per_step={r.prompts_per_step} does not split into whole prompt groups over {world} "
                f"ranks; make it a multiple of {world}")
    if t.async_ is not None:
        return "train.async runs a producer thread per process; train synchronously under several ranks"
    if r.backend != "hf":
        return f"rollout.backend={r.backend!r} has one engine per run; use rollout.backend=hf under several ranks"
    if pipeline.plan.values:
        return ("a critic (the advantage reads values: GAE whitens over the whole batch and the critic has its own "
                "optimizer) is not sharded yet; use a critic-free method under several ranks")
    if r.refill_rounds:
        return (f"rollout.refill_rounds={r.refill_rounds}: refills make the ranks' batches differ in size; set it to "
                "0 under several ranks")
    if pipeline.selectors or pipeline.shapers:
        kind = "selector" if pipeline.selectors else "shaper"
        comp = (pipeline.selectors or pipeline.shapers)[0]
        return (f'{kind} "{type(comp).__name__}" changes the rows of a rank\'s batch (the ranks step in lockstep on '
                "equal shares); use it in a single process")
    collect_points = [p for p, ext in EXTENSION_POINTS.items() if ext.stage.startswith("collect")] + ["observe"]
    for role, comp in pipeline.roles.items():
        points = [p for p in collect_points if comp in pipeline.providers.get(p, [])]
        if points:
            return (f'{role} "{type(comp).__name__}" learns from or shapes collection ({", ".join(points)}) with '
                    "per-prompt state that would differ on every rank; use it in a single process")
    stateful = list(pipeline.stateful())
    if stateful:
        return (f'{stateful[0]} "{type(pipeline.roles.get(stateful[0])).__name__}" keeps state across steps, which '
                "each rank would update from its own share; use it in a single process")
    return ""


class ShardedStream:
    """A rank's share of the prompt stream: every rank draws the step's rows in the same seeded order and keeps its
    contiguous block, so the ranks agree on the data position (saved once, by rank 0) without communicating."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def take(self, n: int, **kw: Any) -> list[dict[str, Any]]:
        rows = self.stream.take(n * self.world, **kw)
        return rows[self.rank * n:(self.rank + 1) * n]

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's sampling seed: the run's seed on rank 0 (a 1-rank run is the single-process run), distinct else."""
    return int(seed) if rank == 0 else (int(seed) * 1_000_003 + 7_919 * rank) % (2**63)


class FollowerFolder:
    """The run folder as ranks other than 0 see it: its path, never a write (rank 0 holds the lock and writes)."""

    def __init__(self, path):
        self.path = path

    def begin(self, plan) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass


class NullLog:
    """The metrics log of ranks other than 0: the row, written nowhere."""

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, **{k: float(v) if isinstance(v, Tensor) else v for k, v in metrics.items()}}


def shared_plan(run: DistRun, folder, resume: bool, overwrite: bool, steps: int):
    """Rank 0's plan for the run folder (lmpo.train.rundir) on every rank; rank 0's refusal fails every rank."""
    from lmpo.errors import LmpoError

    plan = err = None
    if run.main:
        try:
            plan = folder.plan(resume, overwrite, steps)
        except LmpoError as exc:
            err = exc
        run.broadcast((plan, str(err) if err else None))
        if err is not None:
            raise err
        return plan
    plan, msg = run.broadcast(None)
    if msg is not None:
        raise LmpoError(f"(rank {run.rank}) rank 0 refused the run folder: {msg}")
    return plan
