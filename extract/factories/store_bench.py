"""Benchmark: reading rows of a sharded feature store (which Python / zarr to recommend).

    python -m extract.factories.store_bench --store /tmp/bench --rows 512

Creates the store once under the ``--store`` folder (:func:`extract.factories.synthetic.make_synthetic`:
float16 visual maps of AVE's row shape) if it does not exist, then times
random single-row reads, random batches of 64 rows, and one full sequential read of ``visual``.
Imports numpy, zarr and yaml only, so it runs under any Python that has them.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from ..core.store import open_store
from .synthetic import make_synthetic


def build(folder: Path, rows: int, segments: int, rows_per_shard: int) -> Path:
    """The synthetic store of :func:`extract.factories.synthetic.make_synthetic` (AVE row shape) under
    ``folder``; returns the store's path."""
    written = make_synthetic(folder, splits={"train": rows}, classes=[f"event{k:02d}" for k in range(28)],
                             segments=segments, rows_per_shard=rows_per_shard)
    return written.store


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/tmp/avel-store-bench"), help="folder of the synthetic store")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--singles", type=int, default=200, help="random single-row reads")
    args = parser.parse_args()
    import zarr

    path = args.store / "store.zarr"
    if not path.exists():
        build(args.store, args.rows, args.segments, args.rows_per_shard)
    store = open_store(path)
    n = len(store)
    rng = np.random.default_rng(1)
    singles = rng.integers(0, n, args.singles)
    batches = [rng.choice(n, 64, replace=False) for _ in range(8)]
    row_mb = store.array("visual").nbytes / n / 2**20

    t_single = timed(lambda: [store.read("visual", [int(r)]) for r in singles], 2)
    t_batch = timed(lambda: [store.read("visual", b) for b in batches], 2)
    t_full = timed(lambda: store.read("visual"), 1)
    print(f"python {platform.python_version()}  zarr {zarr.__version__}  numpy {np.__version__}  store {path} ({n} rows, {row_mb:.2f} MiB/row)")
    print(f"random single rows : {args.singles / t_single:8.1f} rows/s  ({args.singles * row_mb / t_single:7.1f} MiB/s)")
    print(f"random 64-row batch: {8 * 64 / t_batch:8.1f} rows/s  ({8 * 64 * row_mb / t_batch:7.1f} MiB/s)")
    print(f"full sequential    : {n / t_full:8.1f} rows/s  ({n * row_mb / t_full:7.1f} MiB/s)")


if __name__ == "__main__":
    main()
