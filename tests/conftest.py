"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mim.data.fashion_mnist import find_fashion_mnist


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The folder with the packaged Fashion-MNIST IDX files; skips when absent (fails under `make test`)."""
    try:
        return find_fashion_mnist()
    except FileNotFoundError:
        if os.environ.get("MIM_REQUIRE_DATA") == "1":  # set by `make test`: the data must be there
            raise
        pytest.skip("Fashion-MNIST not installed (run `make data`)")
