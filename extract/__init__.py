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

from .core.aliases import install as _install

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

_install(MOVED)
