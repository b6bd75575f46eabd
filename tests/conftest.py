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

#: the most a test's time budget is stretched on a busy machine
MAX_LOAD_FACTOR = 8.0
_STRETCHED: dict[str, tuple[float, float]] = {}


def load_factor() -> float:
    """How many times slower than on an idle machine a CPU-bound test runs now: the 1-minute load
    average per usable core, at least 1, at most :data:`MAX_LOAD_FACTOR`."""
    try:
        load = float(os.environ.get("AVEL_TEST_LOAD") or os.getloadavg()[0])  # AVEL_TEST_LOAD: tests of this hook
    except (AttributeError, OSError, ValueError):
        return 1.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_LOAD_FACTOR, max(1.0, load / max(1, cores)))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item):
    """Slow end-to-end tests (marked ``slow``, or using the ``demo_run`` fixture, whose setup
    generates, extracts and trains the demo) get pytest-timeout's budget times
    :func:`load_factor`, measured when the test starts: a machine at 4x load gives them 4x the
    time instead of erroring them all (a test's own ``timeout`` marker wins)."""
    slow = item.get_closest_marker("slow") is not None or "demo_run" in getattr(item, "fixturenames", ())
    if slow and item.get_closest_marker("timeout") is None:
        base = getattr(item.config, "_env_timeout", None)
        if base is None:
            try:
                base = float(item.config.getini("timeout") or 0)
            except (ValueError, KeyError):
                base = 0
        factor = load_factor()
        if base and factor > 1.0:
            item.add_marker(pytest.mark.timeout(base * factor))
            _STRETCHED[item.nodeid] = (float(base), factor)
    yield


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
    if _STRETCHED:
        top = max(f for _, f in _STRETCHED.values())
        terminalreporter.write_line(f"busy machine: the budget of {len(_STRETCHED)} slow test(s) was stretched by up to "
                                    f"{top:.1f}x (load average per core)")
