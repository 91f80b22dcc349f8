"""Shared test set-up: the factories of ``tests/factories.py`` (one copy of every batch builder) as fixtures.

Module-level helpers and parametrised cases import the functions directly (``from factories import make_batch``;
pyproject puts ``tests/`` on the import path); a test may instead take the same-named fixture.
"""

from __future__ import annotations

import os


def _pin_xdist_worker() -> None:
    """Under ``pytest -n N`` (``make test``), pin worker k to its own core when there are at least N: each worker's
    runs then see one core (``train.threads: auto`` -> 1 thread, subprocesses inherit the pin), so N workers never
    oversubscribe the machine. With fewer cores than workers, nothing is pinned."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < int(count):
        return
    index = int(worker.removeprefix("gw"))
    share = len(cpus) // int(count)
    os.sched_setaffinity(0, set(cpus[index * share:(index + 1) * share]))


_pin_xdist_worker()  # before anything imports torch (OpenMP sizes its pool from the affinity when it starts)

import pytest  # noqa: E402

import factories  # noqa: E402


@pytest.fixture
def make_batch():
    """:func:`factories.make_batch`: a hand case from rewards, groups and a mask (or lengths)."""
    return factories.make_batch


@pytest.fixture
def random_batch():
    """:func:`factories.random_batch`: random group structure, rewards and masks, deterministic in its seed."""
    return factories.random_batch


@pytest.fixture
def random_full_batch():
    """:func:`factories.random_full_batch`: fixed groups, every field the trainer fills."""
    return factories.random_full_batch


@pytest.fixture
def from_config():
    """:func:`factories.from_config`: build a registered component as a config does."""
    return factories.from_config


@pytest.fixture
def echo_generator():
    """A fresh model-free :class:`factories.EchoGenerator` (answers "7", records its prompts)."""
    return factories.EchoGenerator()
