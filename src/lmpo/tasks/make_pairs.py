"""Write the shipped pair files (``lmpo/tasks/data/*.jsonl``) from built-in tasks: ``python -m lmpo.tasks.make_pairs``.

- ``pairs_copy.jsonl``: the copy task of the tiny model (prompt "3=", chosen "3", rejected another digit), for tests
  and the tiny config; its task eval is ``task: copy``.
- ``pairs_arithmetic.jsonl``: two-operand addition in the main job's format (configs/default.yaml's template: one
  worked example, "Reply with the number only"), the reply written as SmolLM2 writes it ("18 + 40 = 58"), chosen
  the correct sum, rejected a near miss; the first 1000 rows of the train split of that task (seed 0, 2000 train /
  128 eval), so its eval rows stay held out.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmpo.tasks import build_task
from lmpo.tasks.pairs import pairs_from_task

DATA = Path(__file__).parent / "data"
TEMPLATE = "Example: 23 + 45 = 68. Now compute {a} + {b}. Reply with the number only."  # configs/default.yaml's
FILES = {
    "pairs_copy.jsonl": ("copy", {"length": 1, "num_train": 256, "num_eval": 0, "seed": 1}),
    "pairs_arithmetic.jsonl": ("arithmetic", {"num_train": 2000, "num_eval": 128, "template": TEMPLATE}),
}
ROWS = {"pairs_arithmetic.jsonl": 1000}
REPLY = {"pairs_arithmetic.jsonl": "{a} {op} {b} = {answer}"}


def rows_of(name: str) -> list[dict]:
    """The pairs of shipped file ``name``, made again from their task."""
    task, params = FILES[name]
    return pairs_from_task(build_task(task, **params).train[: ROWS.get(name)], seed=0,
                           reply=REPLY.get(name, "{answer}"))


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for name in FILES:
        rows = rows_of(name)
        with open(DATA / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{DATA / name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
