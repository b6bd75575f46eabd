"""The contract that both stages share (docs/layers.md, floor 0): the feature store, the manifest
and the lock that fences writers; later also the frame-time rule, settings, CLI helpers, progress,
devices and the Dask client.

Modules here import nothing of ``extract`` outside ``extract.core`` and nothing of ``train``
(tests/test_boundary.py). This file imports nothing, so ``import extract.core.store`` loads only
the store.
"""
