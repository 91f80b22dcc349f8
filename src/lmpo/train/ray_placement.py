"""``train.dist.placement: ray``: the trainer's ranks as Ray actors, started and driven by one controller.

    lmpo train cfg.yaml train.dist.placement=ray train.dist.world_size=2

The controller (this process) joins the Ray cluster named by ``RAY_ADDRESS`` (several nodes: ``ray start --head`` on
one, ``ray start --address=<head>:6379`` on the others), or starts a local one. It places ``world_size`` actors, one
per rank (``num_cpus=1`` each, or ``num_gpus=1`` where the cluster has GPUs), in one placement group (PACK: as few
nodes as possible), asks rank 0's actor for its node address and a free port, gives every actor the standard
``torch.distributed`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and runs
:func:`lmpo.train.loop.train` in each: from there the run is exactly the torchrun run (lmpo.train.dist), so the
same config gives the same numbers under either placement (tests/dist/test_dist_checkpoint.py checks it).

Each rank actor samples its share of the prompt groups itself, colocated with its trainer (verl's "hybrid engine"
layout): with FSDP2 the rank gathers whole weights after each update for its sampler (the weight sync), with DDP it
holds them anyway. Ray is an optional extra (``pip install 'lmpo[ray]'``); it is imported only here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from lmpo.errors import ConfigError, LmpoError


def require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("train.dist.placement=ray needs Ray: pip install 'lmpo[ray]' (or set "
                          "train.dist.placement=local and launch with torchrun).") from None
    return ray


class RankActor:
    """One rank of the run, in its own Ray worker process."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it (asked of rank 0: the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def train(self, cfg, resume: bool, overwrite: bool, master: tuple[str, int]) -> dict[str, Any]:
        import dataclasses

        from lmpo.train.loop import train

        os.environ.update({"RANK": str(self.rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(self.world),
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])})
        cfg.train.dist = dataclasses.replace(cfg.train.dist, placement="local")  # this process is one rank
        result = train(cfg, resume=resume, overwrite=overwrite)
        return {"run_dir": str(result.run_dir), "steps": result.steps, "eval_before": result.eval_before,
                "eval_after": result.eval_after}


def train_on_ray(cfg, resume: bool = False, overwrite: bool = False):
    """Start ``cfg.train.dist.world_size`` rank actors, run the training in them, return rank 0's result."""
    from lmpo.train.loop import RunResult
    from lmpo.train.metrics import read_metrics

    ray = require_ray()
    world = int(cfg.train.dist.world_size)
    src = str(Path(__file__).resolve().parents[2])  # the lmpo sources this controller runs: the actors import them
    started = not ray.is_initialized()
    if started:
        env = {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
        else:
            ray.init(num_cpus=max(world, os.cpu_count() or 1), include_dashboard=False, runtime_env={"env_vars": env},
                     log_to_driver=True)
    actors, group = [], None
    try:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = ray.cluster_resources().get("GPU", 0) >= world
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        group = placement_group([bundle] * world, strategy="PACK")
        ray.get(group.ready(), timeout=float(cfg.train.dist.timeout_s))
        cls = ray.remote(RankActor)
        actors = [cls.options(num_cpus=1, num_gpus=1 if gpus else 0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=r)).remote(r, world) for r in range(world)]
        master = ray.get(actors[0].address.remote())
        futures = [a.train.remote(cfg, resume, overwrite, master) for a in actors]
        try:
            results = ray.get(futures)
        except ray.exceptions.RayTaskError as exc:  # a rank's error: lmpo's own message when it is one
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LmpoError):
                raise cause from None
            raise LmpoError(f"A rank failed under train.dist.placement=ray: {str(exc).strip()[-2000:]}") from None
        except ray.exceptions.RayActorError as exc:
            raise LmpoError(f"A rank's actor died under train.dist.placement=ray ({exc}); resume the run from its "
                            "last checkpoint with --resume.") from None
    finally:
        for a in actors:
            ray.kill(a)
        if group is not None:
            remove_placement_group(group)
        if started:
            ray.shutdown()
    first = results[0]
    run_dir = Path(first["run_dir"])
    return RunResult(run_dir, first["steps"], first["eval_before"], first["eval_after"],
                     read_metrics(run_dir / "metrics.jsonl"))
