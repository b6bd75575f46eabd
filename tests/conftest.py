"""Shared fixtures. Real data beside the checkout (../shared) is optional: tests skip without it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AVEL_SHARED", REPO.parent / "shared"))

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (papers, AVE annotations, real media); skips the test when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def ave_dir(shared_dir) -> Path:
    path = shared_dir / "ave"
    if not (path / "Annotations.txt").is_file():
        pytest.skip(f"{path}/Annotations.txt is absent")
    return path


@pytest.fixture(scope="session")
def media_dir(shared_dir) -> Path:
    path = shared_dir / "media"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path
