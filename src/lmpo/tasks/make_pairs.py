"""Write the shipped pair files (``lmpo/tasks/data/*.jsonl``) from built-in tasks: ``python -m lmpo.tasks.make_pairs``.

- ``pairs_copy.jsonl``: the copy task of the tiny model (prompt "3=", chosen "3", rejected another digit), for tests
  and the tiny config; its task eval is ``task: copy``.
- ``pairs_arithmetic.jsonl``: two-operand addition ("What is 37 + 85?"), chosen the correct sum, rejected a near
  miss; the train split of ``task: arithmetic`` with its default seed, so the task's eval rows stay held out.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmpo.tasks import build_task
from lmpo.tasks.pairs import pairs_from_task

DATA = Path(__file__).parent / "data"
FILES = {
    "pairs_copy.jsonl": ("copy", {"length": 1, "num_train": 256, "num_eval": 0, "seed": 1}),
    "pairs_arithmetic.jsonl": ("arithmetic", {"num_train": 1000, "num_eval": 128}),
}


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for name, (task, params) in FILES.items():
        rows = pairs_from_task(build_task(task, **params).train, seed=0)
        with open(DATA / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{DATA / name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
