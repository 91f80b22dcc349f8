"""Shared test set-up: the factories of ``tests/factories.py`` (one copy of every batch builder) as fixtures.

Module-level helpers and parametrised cases import the functions directly (``from factories import make_batch``;
pyproject puts ``tests/`` on the import path); a test may instead take the same-named fixture.
"""

from __future__ import annotations

import pytest

import factories


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
