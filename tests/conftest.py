"""Shared test configuration: marker skipping and the BCCD dataset location.

- ``gpu``: skipped without a CUDA device.
- ``tensorrt``: skipped without the ``tensorrt`` package and a CUDA device.
- ``slow``: skipped unless ``--runslow`` or ``REFINEDET_SLOW=1``.
- ``ray``: skipped without Ray (extra ``scale``); the test itself also needs root, ``unshare`` and ``ip``.
- ``browser``: skipped without a Chromium binary (``browser.chromium_path``: Debian's ``chromium``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from browser import chromium_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def bccd_root() -> Path | None:
    """The shared BCCD dataset (env REFINEDET_BCCD, else ../shared/data/BCCD beside the repo)."""
    candidates = [
        os.environ.get("REFINEDET_BCCD"),
        REPO_ROOT.parent / "shared" / "data" / "BCCD",
        REPO_ROOT / "data" / "BCCD",
    ]
    for c in candidates:
        if c and (Path(c) / "Annotations").is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def bccd() -> Path:
    root = bccd_root()
    if root is None:
        pytest.skip("BCCD dataset not found (set REFINEDET_BCCD or place it at ../shared/data/BCCD)")
    return root


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("REFINEDET_SLOW") == "1"
    has_cuda = _cuda()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skips = {
        "slow": None if run_slow else "slow test: run with --runslow or REFINEDET_SLOW=1",
        "gpu": None if has_cuda else "needs a CUDA GPU (none on this machine)",
        "tensorrt": None
        if (has_trt and has_cuda)
        else "needs TensorRT 10 and a CUDA GPU (TensorRT cannot be installed on this machine)",
        "ray": None
        if importlib.util.find_spec("ray") is not None
        else "Ray is not installed (pip install -e '.[scale]')",
        "browser": None
        if chromium_path()
        else "needs Chromium (apt-get install chromium, or set REFINEDET_CHROMIUM to its binary)",
    }
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
