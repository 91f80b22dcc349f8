"""The single-process parts of lmpo.train.dist (the multi-process tests are in tests/dist, `make test-dist`)."""

from __future__ import annotations

import pytest
import torch

import lmpo.methods  # noqa: F401  (registers the aggregators)
from lmpo.errors import ConfigError
from lmpo.registry import AGGREGATORS
from lmpo.train.data import PromptStream
from lmpo.train.dist import ShardedStream, rank_seed, resolve_strategy, unsupported


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_normaliser_adds_over_ranks(name):
    """DistRun.global_normaliser relies on n(A u B) = n(A) + n(B) - n(empty) for every registered aggregator: the
    sum of the ranks' normalisers minus (N - 1) empty ones is the whole batch's. A new aggregator whose normaliser
    is not of that kind (a maximum, a mean) must get its own reduction before it can run on several ranks."""
    agg = AGGREGATORS.build(name)
    g = torch.Generator().manual_seed(0)
    T = 6
    mask = torch.arange(T)[None, :] < torch.randint(0, T + 1, (10,), generator=g)[:, None]  # empty rows too
    parts = [mask[:3], mask[3:4], mask[4:]]
    whole = agg.normaliser(mask, 16)
    empty = agg.normaliser(mask[:0], 16)
    total = sum(agg.normaliser(p, 16) for p in parts) - (len(parts) - 1) * empty
    assert torch.allclose(total.float(), whole.float())


def test_sharded_streams_split_the_steps_rows_and_agree_on_the_position():
    rows = [{"prompt": f"p{i}"} for i in range(10)]
    one = PromptStream(rows, seed=3)
    shards = [ShardedStream(PromptStream(rows, seed=3), r, 2) for r in range(2)]
    for _ in range(4):  # across an epoch boundary
        whole = one.take(6)
        got = [s.take(3) for s in shards]
        assert got[0] + got[1] == whole
    assert all(s.state_dict() == one.state_dict() for s in shards)


def test_rank_seeds_rank0_is_the_run_seed_and_ranks_differ():
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8


def test_strategy_auto_picks_fsdp2_for_a_decoder_with_layers():
    from lmpo.models.load import load_model

    model, _ = load_model("tiny", seed=0)
    assert resolve_strategy("auto", model) == "fsdp2" and resolve_strategy("ddp", model) == "ddp"
    with pytest.raises(ConfigError, match="ddp"):
        resolve_strategy("zero3", model)


def test_configs_the_ranks_cannot_run_are_refused_with_the_reason():
    from lmpo.config import load_config
    from lmpo.pipeline import build_pipeline

    cfg = load_config("configs/tiny.yaml", [])
    assert unsupported(cfg, build_pipeline(cfg), 2) == ""
    assert "multiple of 3" in unsupported(cfg, build_pipeline(cfg), 3)
    for overrides, words in [(["train.async.max_staleness=1"], "train.async"), (["rollout.refill_rounds=2"], "refill"),
                             (["method=ppo"], "critic"), (["method=dapo", "rollout.refill_rounds=0"], "selector")]:
        c = load_config("configs/tiny.yaml", overrides)
        assert words in unsupported(c, build_pipeline(c), 2), overrides
