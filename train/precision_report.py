"""How far reduced-precision features are from fp32 ones, and whether a head notices.

``python -m train.precision_report --fp32 A.zarr --bf16 B.zarr [--config pipeline.yaml]`` compares
two stores of the same videos made at two precisions (e.g. ``avel-extract --precision fp32`` and
``--precision bf16``):

- **per array** (``visual``, ``audio``, sol maps...): the relative L2 distance
  ``||low - fp32|| / ||fp32||`` over every segment valid in both stores, and its median and
  maximum over the rows;
- **label agreement** (with ``--config``, whose splits the stores hold): a head (default
  ``dmrn``, the pipeline's schedule and selection) is trained on the fp32 store, then predicts the
  test split once from the fp32 features and once from the low-precision ones: the share of test
  seconds that get the same label, and both accuracies.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _relative(low: np.ndarray, ref: np.ndarray) -> float:
    low, ref = low.astype(np.float64), ref.astype(np.float64)
    norm = np.linalg.norm(ref)
    return float(np.linalg.norm(low - ref) / norm) if norm > 0 else float(np.linalg.norm(low))


def store_deviation(fp32_store: str | Path, low_store: str | Path) -> dict[str, Any]:
    """``{array: {"relative_l2", "row_median", "row_max", "rows", "segments"}}`` over the rows
    done in both stores (matched by id) and their segments valid in both."""
    from extract.core.store import STATUS_DONE, open_store

    ref, low = open_store(fp32_store), open_store(low_store)
    ids = [key for key, status in zip(ref.ids.tolist(), ref.status()) if status == STATUS_DONE]
    low_done = {key for key, status in zip(low.ids.tolist(), low.status()) if status == STATUS_DONE}
    ids = [key for key in ids if key in low_done]
    ref_rows = np.asarray([ref.row_of(k) for k in ids], np.int64)
    low_rows = np.asarray([low.row_of(k) for k in ids], np.int64)
    segments = ref.segments
    out: dict[str, Any] = {}
    for name in sorted(set(ref.array_names()) & set(low.array_names())):
        a = ref.array(name)
        if len(a.shape) < 2 or a.shape[1] != segments or not np.issubdtype(np.dtype(a.dtype), np.floating):
            continue
        valid_name = "valid" if name in ("visual", "audio") else f"{name}_valid"
        both = np.ones((len(ids), segments), bool)
        if valid_name in ref.array_names() and valid_name in low.array_names():
            both = ref.read(valid_name)[ref_rows].astype(bool) & low.read(valid_name)[low_rows].astype(bool)
        x, y = ref.read(name)[ref_rows], low.read(name)[low_rows]
        per_row = [_relative(y[i][both[i]], x[i][both[i]]) for i in range(len(ids)) if both[i].any()]
        out[name] = {"relative_l2": _relative(y[both], x[both]) if both.any() else None,
                     "row_median": float(np.median(per_row)) if per_row else None,
                     "row_max": float(np.max(per_row)) if per_row else None,
                     "rows": len(per_row), "segments": int(both.sum())}
    return out


def label_agreement(config: str | Path, fp32_store: str | Path, low_store: str | Path, head: str = "dmrn",
                    seed: int = 0) -> dict[str, Any]:
    """Train ``head`` on ``fp32_store`` with ``config``'s splits and schedule, then predict its
    test split from both stores: agreement of the labels (share of test seconds), accuracies."""
    import torch

    from extract.core.settings import load_pipeline

    from .data import load_task_data, split_manifest
    from .evaluate import evaluate_split
    from .loop import fit, resolve_schedule, seed_everything
    from .runs import splits_to_load
    from .tasks.avel_task import AvelTask
    from .tasks.base import head_for_task

    pipeline = load_pipeline(str(config))
    cfg = pipeline.train
    manifests = {name: split_manifest(pipeline, name) for name in splits_to_load(pipeline)}
    reference = load_task_data(fp32_store, manifests)
    other = load_task_data(low_store, manifests)
    seed_everything(seed)
    model = head_for_task(pipeline, head, "avel", reference.num_classes)
    task = AvelTask(reference, cfg, pipeline)
    result = fit(model, task, resolve_schedule(cfg, type(model)), seed)
    test = cfg.test_split
    with torch.no_grad():
        ref_eval = evaluate_split(model, reference.bank, reference.splits[test], reference.num_classes)
        low_eval = evaluate_split(model, other.bank, other.splits[test], other.num_classes)
    same = ref_eval.predictions == low_eval.predictions
    return {"head": head, "seed": seed, "selected_epoch": result.best_epoch, "test_seconds": int(same.size),
            "label_agreement": float(same.mean()), "differing_seconds": int((~same).sum()),
            "test_accuracy_fp32_features": ref_eval.accuracy, "test_accuracy_low_features": low_eval.accuracy}


def main(argv=None) -> None:  # pragma: no cover - thin CLI, the functions are tested
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--fp32", "fp32_store", required=True, type=click.Path(exists=True, file_okay=False), help="Store made at fp32.")
    @click.option("--bf16", "low_store", required=True, type=click.Path(exists=True, file_okay=False), help="Store of the same videos made at bf16 (or fp16).")
    @click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="pipeline.yaml whose splits both stores hold: also train a head on the fp32 store and compare its test labels from both.")
    @click.option("--head", default="dmrn", show_default=True, help="Head for the label agreement.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def cli(fp32_store, low_store, config, head, seed, as_json):
        """Relative L2 per array between two stores of the same videos at two precisions, and
        (with --config) the label agreement of a head trained on the fp32 one."""
        logging.basicConfig(level=logging.WARNING)
        report: dict[str, Any] = {"fp32": fp32_store, "low": low_store, "arrays": store_deviation(fp32_store, low_store)}
        if config:
            report["labels"] = label_agreement(config, fp32_store, low_store, head, seed)
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        for name, d in report["arrays"].items():
            click.echo(f"{name}: relative L2 {d['relative_l2']:.3g} over {d['segments']} segments of {d['rows']} rows "
                       f"(per row: median {d['row_median']:.3g}, max {d['row_max']:.3g})")
        if "labels" in report:
            lab = report["labels"]
            click.echo(f"{lab['head']} trained on fp32 features (seed {lab['seed']}): the same label for "
                       f"{100 * lab['label_agreement']:.1f}% of {lab['test_seconds']} test seconds; test accuracy "
                       f"{lab['test_accuracy_fp32_features']:.4f} (fp32 features) vs {lab['test_accuracy_low_features']:.4f}")

    cli(args=argv if argv is not None else sys.argv[1:], prog_name="python -m train.precision_report")


if __name__ == "__main__":  # pragma: no cover
    main()
