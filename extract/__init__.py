"""Stage 1 of avel (decode, networks, extractors, runner, cache) and, in :mod:`extract.core`, the
contract that both stages share (docs/layers.md).

Modules that moved keep their old import path: ``import extract.store`` gives the very module
object ``extract.core.store``, not a copy, so monkeypatches, ``isinstance`` checks, module state
and pickles by reference are shared between the two names. Code inside ``extract/`` and
``train/`` uses the new paths (tests/test_boundary.py refuses the old ones there); the old paths
are kept for users' code and notebooks.

This file stays light: importing ``extract.core.store`` runs it first, and ``train`` must import
without stage 1 or a media library (tests/test_train_imports.py).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

#: old module path -> the module it now is (docs/layers.md, "Module -> floor")
MOVED = {
    "extract.store": "extract.core.store",
    "extract.manifest": "extract.core.manifest",
    "extract.lock": "extract.core.lock",
    "extract.frames": "extract.core.frames",
    "extract.progress": "extract.core.progress",
    "extract.devices": "extract.core.devices",
    "extract.settings": "extract.core.settings",
    "extract.clitools": "extract.core.clitools",
    "extract.daskclient": "extract.core.daskclient",
    "extract.slurm": "extract.core.slurm",
    "extract.demo": "extract.factories.demo",
    "extract.synthetic": "extract.factories.synthetic",
    "extract.store_bench": "extract.factories.store_bench",
    "extract.media": "extract.factories.media",
}


class _MovedLoader(importlib.abc.Loader):
    """Puts the new module under the old name: Python's import returns ``sys.modules[name]`` as it
    is after ``exec_module``, so the placeholder module made for the old name is dropped."""

    def create_module(self, spec):
        return None  # the default placeholder; replaced in exec_module

    def exec_module(self, module) -> None:
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Answers only the old names of :data:`MOVED`; every other import goes on as usual."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _LOADER)


_LOADER = _MovedLoader()
# first in line: the table is authoritative, also over another finder that would find a stale file
# of the old name (a setuptools editable finder of an older checkout, say); it answers no other name
if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
