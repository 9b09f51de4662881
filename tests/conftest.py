"""Fixtures shared by several test files."""

import pytest

from ebood.bench.builtin import torch_threads


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, which oversubscribe a shared machine."""
    with torch_threads(1):
        yield
