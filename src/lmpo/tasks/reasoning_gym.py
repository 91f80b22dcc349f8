"""Procedurally generated reasoning-gym datasets, scored by each dataset's own verifier.

Entries can hold non-JSON data (tuples, sets), so rows keep a reference instead: dataset name, seed, size, config
(as JSON) and index. The ``reasoning_gym`` reward rebuilds the (cached) dataset from it and calls
``score_answer(answer=..., entry=...)``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from lmpo.errors import ConfigError, DataError, did_you_mean
from lmpo.registry import TASKS
from lmpo.rewards.builtin import rg_dataset, rg_entry
from lmpo.rewards.reward_set import RewardSpec
from lmpo.tasks.base import Task

# Extra eval candidates to draw so that dropping questions already in train still leaves ``num_eval`` rows.
_EVAL_POOL_FACTOR = 4


@TASKS.register("reasoning_gym", paper="", arxiv="")
@dataclass(frozen=True)
class ReasoningGymTask:
    """A reasoning-gym dataset (e.g. "basic_arithmetic", "leg_counting") with its own verifier as reward.

    Attributes:
        dataset: reasoning-gym dataset name.
        size: Number of training rows (indices ``0..size-1``).
        num_eval: Number of eval rows, taken from indices after the train range, skipping questions seen in train.
        seed: Generator seed.
        config: Extra keyword arguments for the dataset's config (difficulty knobs); must be JSON-able.
        system_prompt: A key of ``reasoning_gym.utils.SYSTEM_PROMPTS`` ("default" asks for ``<answer>`` tags),
            literal text, or ``None`` for no system prompt.
    """

    dataset: str
    size: int = 1000
    num_eval: int = 128
    seed: int = 0
    config: dict = field(default_factory=dict)
    system_prompt: str | None = "default"

    def __post_init__(self) -> None:
        if self.size < 0 or self.num_eval < 0:
            raise ConfigError(f"task reasoning_gym: size and num_eval must be >= 0, got {self.size}, {self.num_eval}.")
        clash = sorted({"seed", "size"} & set(self.config))
        if clash:
            raise ConfigError(
                f"task reasoning_gym: config must not set {', '.join(clash)}; use the task's own seed/size fields."
            )
        try:
            json.dumps(self.config, sort_keys=True)
        except TypeError as exc:
            raise ConfigError(f"task reasoning_gym: config {self.config!r} must be JSON-able ({exc}).") from None

    def _create(self, total: int) -> str:
        from reasoning_gym.factory import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(
                f'Unknown reasoning-gym dataset "{self.dataset}" (at task.dataset).'
                f"{did_you_mean(self.dataset, DATASETS)} Valid names: {', '.join(sorted(DATASETS))}."
            )
        config_cls = DATASETS[self.dataset][1]
        valid = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
        for key in self.config:
            if key not in valid:
                raise ConfigError(
                    f'Unknown config key "{key}" for reasoning-gym dataset "{self.dataset}" (at task.config).'
                    f"{did_you_mean(key, valid)} Valid keys: {', '.join(valid)}."
                )
        config_json = json.dumps(self.config, sort_keys=True)
        try:
            rg_dataset(self.dataset, self.seed, total, config_json)  # build (and cache) it now to surface config errors
        except (AssertionError, ValueError, TypeError) as exc:
            raise ConfigError(
                f'reasoning-gym rejected the config {self.config} for dataset "{self.dataset}": '
                f"{type(exc).__name__}: {exc}"
            ) from None
        return config_json

    def build(self) -> Task:
        """Generate train rows from indices ``0..size-1`` and eval rows from the indices after them."""
        total = self.size + _EVAL_POOL_FACTOR * self.num_eval
        config_json = self._create(total)

        def row(i: int) -> dict:
            entry = rg_entry(self.dataset, self.seed, total, config_json, i)
            return {
                "prompt": entry["question"],
                # Some datasets accept many answers and store none; their verifier checks the entry instead.
                "answer": None if entry.get("answer") is None else str(entry["answer"]),
                "rg_dataset": self.dataset,
                "rg_seed": self.seed,
                "rg_size": total,
                "rg_config": config_json,
                "rg_index": i,
            }

        train = [row(i) for i in range(self.size)]
        seen = {r["prompt"] for r in train}
        eval_rows: list[dict] = []
        for i in range(self.size, total):
            if len(eval_rows) == self.num_eval:
                break
            r = row(i)
            if r["prompt"] not in seen:  # a question met in training would overstate eval accuracy
                seen.add(r["prompt"])
                eval_rows.append(r)
        if self.num_eval and not eval_rows:
            raise DataError(
                f'reasoning-gym dataset "{self.dataset}" produced no eval question that is not already in the '
                f"{self.size} train rows; lower size or make the dataset harder via config."
            )
        system = self.system_prompt
        if system is not None:
            from reasoning_gym.utils import SYSTEM_PROMPTS

            system = SYSTEM_PROMPTS.get(system, system)
        return Task(
            name=f"reasoning_gym/{self.dataset}",
            train=train,
            eval=eval_rows,
            rewards=[RewardSpec("reasoning_gym")],
            system_prompt=system,
        )
