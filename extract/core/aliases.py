"""Old import paths of modules that moved (docs/layers.md): ``import extract.store`` gives the very
module object ``extract.core.store``, not a copy, so monkeypatches, ``isinstance`` checks, module
state and pickles by reference are shared between the two names.

:func:`install` puts one finder first in ``sys.meta_path`` that answers only the old names of the
tables given to it (``extract.MOVED``, ``train.MOVED``). Code inside ``extract/`` and ``train/``
uses the new paths (tests/test_boundary.py refuses the old ones there); the old paths are kept for
users' code and notebooks. ``python -m <old name>`` does not go through a finder: use the new name.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

#: old module path -> new module path, from every table installed so far
MOVED: dict[str, str] = {}


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


def install(table: dict[str, str]) -> None:
    """Answer the old names of ``table`` with their new modules from now on. The finder goes first
    in line: the table is authoritative, also over another finder that would find a stale file of
    the old name (a setuptools editable finder of an older checkout, say); it answers no other name."""
    MOVED.update(table)
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
