"""Fixtures of the benchmark tests."""

from __future__ import annotations

import pytest

from tests.benchmarks.data import tiny_dataset


@pytest.fixture(scope="module")
def ds():
    return tiny_dataset()
