"""Run by torchrun (2 ranks) from tests/dist/test_dist_update.py: one policy update, sharded against whole.

Rank 0 first runs the single-process reference: ``policy_update`` on the whole batch (4 prompt groups) with the
plain model. Then both ranks run the same number of steps on their half of the groups (rank r: groups 2r, 2r+1)
through lmpo.train.dist (DDP, summed gradients, global normaliser). Rank 0 writes both runs' per-step losses,
gradient norms, first-step gradients and final weights to ``$OUT`` for the test to compare.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from lmpo.batch import RolloutBatch
from lmpo.config import TrainConfig
from lmpo.engine.optim import build_optimizer
from lmpo.models.load import apply_lora, load_model
from lmpo.registry import AGGREGATORS, LOSSES
from lmpo.train.dist import DistRun
from lmpo.train.step import PolicyRunner, UpdateSettings, policy_update

STEPS = 3


def make_batch(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(1234)
    groups, size, P, T = 4, 4, 5, 7
    B = groups * size
    prompt = torch.randint(3, vocab, (groups, P), generator=g).repeat_interleave(size, 0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # unequal: token-count normalisers differ per rank
    attn = torch.arange(T)[None, :] < lengths[:, None]
    return RolloutBatch(
        prompt_ids=prompt, prompt_mask=torch.ones(B, P, dtype=torch.bool),
        response_ids=torch.randint(3, vocab, (B, T), generator=g), response_mask=attn, response_attn=attn.clone(),
        group_ids=torch.arange(groups).repeat_interleave(size), rewards=torch.zeros(B),
        sampler_logprobs=torch.zeros(B, T), advantages=torch.randn(B, T, generator=g) * attn)


def run(model, batch, aggregator, micro, packed, dist_run):
    t = TrainConfig(learning_rate=1e-3, optimizer_in_backward=False, max_grad_norm=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, t, 100, single_use=False)
    runner = PolicyRunner(model, packed=packed, train_call=dist_run.train_call if dist_run else None)
    s = UpdateSettings(micro_batch_size=micro, horizon=7, dist=dist_run)
    grads, losses, norms = {}, [], []

    def capture():
        if not grads:
            grads.update({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})

    for step in range(1, STEPS + 1):
        m = policy_update(runner, opt, batch, LOSSES.build("ppo_clip"), aggregator, s, step, after_step=[capture])
        if dist_run is not None:
            dist_run.gathered()  # FSDP2: the updated shards gathered (what the loop does after each update)
        total = m["loss/total"].detach().clone()
        if dist_run is not None:  # each rank's share of the loss: the batch's loss is their sum
            dist.all_reduce(total)
        losses.append(float(total))
        norms.append(float(m["loss/grad_norm"]))
    return {"loss": losses, "grad_norm": norms,
            "grads": {n: g.tolist() for n, g in grads.items()},
            "weights": {n: full(p).tolist() for n, p in model.named_parameters()}}


def full(t):
    """A whole tensor: DTensor shards (FSDP2) gathered."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def case(name: str, micro: int | None, packed: bool, rank: int, world: int, strategy: str, lora: bool) -> dict:
    model, _ = load_model("tiny", seed=0)
    if lora:  # adapters trained, the base frozen (FSDP2 shards both; only the adapters have gradients)
        torch.manual_seed(0)
        model = apply_lora(model, r=4, alpha=8)
        with torch.no_grad():  # PEFT starts B at zero; random B makes the first gradient reach A as well
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    model.train()
    batch = make_batch(model.config.vocab_size)
    aggregator = AGGREGATORS.build(name)
    result = {}
    if rank == 0:
        result["single"] = run(copy.deepcopy(model), batch, aggregator, micro, packed, None)
    dist_run = DistRun(rank=rank, world=world, strategy=strategy)
    dist_run.wrap(model)
    per = 4 // world
    mine = batch.select(torch.isin(batch.group_ids, torch.arange(rank * per, (rank + 1) * per)))
    result["sharded"] = run(model, mine, aggregator, micro, packed, dist_run)
    return result


def main() -> None:
    """argv: the output file, then cases ``aggregator:micro_batch_size|none:packed|plain:ddp|fsdp2[:lora]``."""
    out, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for c in cases:
        name, micro, packed, strategy, *lora = c.split(":")
        results[c] = case(name, None if micro == "none" else int(micro), packed == "packed", rank, world, strategy,
                          lora == ["lora"])
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
