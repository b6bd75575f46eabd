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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README quick start done once per session (tests/demo_testutils.py): demo folder, DMRN run."""
    from demo_testutils import make_demo_run

    return make_demo_run(tmp_path_factory.mktemp("demo_e2e"))


_MEDIA_TESTS: set[str] = set()
#: tests against the real SLURM that tests/test_slurm.py starts (marker ``slurm``)
_SLURM_TESTS: set[str] = set()


def pytest_collection_modifyitems(items):
    _MEDIA_TESTS.update(item.nodeid for item in items if "media_dir" in getattr(item, "fixturenames", ()))
    _SLURM_TESTS.update(item.nodeid for item in items if item.get_closest_marker("slurm"))


def _outcomes(terminalreporter, nodeids: set[str]) -> dict[str, int]:
    """passed / failed / skipped / error counts of the tests ``nodeids`` (one outcome per test)."""
    outcomes: dict[str, int] = {}
    for status in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(status, []):
            if getattr(report, "nodeid", None) in nodeids and getattr(report, "when", "call") in ("call", "setup"):
                if status == "passed" and report.when != "call":
                    continue
                outcomes[status] = outcomes.get(status, 0) + 1
    return outcomes


def pytest_terminal_summary(terminalreporter):
    """One line each saying whether the tests on the real clips of ../shared/media and the tests
    against a real SLURM ran (CI reads them: .ci/run fails when the SLURM tests did not all pass)."""
    if _MEDIA_TESTS:
        outcomes = _outcomes(terminalreporter, _MEDIA_TESTS)
        text = ", ".join(f"{n} {s}" for s, n in sorted(outcomes.items())) or "none run"
        terminalreporter.write_line(f"real-media tests ({SHARED / 'media'}): {text} of {len(_MEDIA_TESTS)}")
    if _SLURM_TESTS:
        outcomes = _outcomes(terminalreporter, _SLURM_TESTS)
        text = ", ".join(f"{n} {s}" for s, n in sorted(outcomes.items())) or "none run"
        terminalreporter.write_line(f"slurm tests: {text} of {len(_SLURM_TESTS)}")
