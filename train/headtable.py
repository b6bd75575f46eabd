"""Measurement: parameter count and accuracy of every event-localization head, as one table.

``python -m train.headtable --config data/demo/pipeline.yaml --out /tmp/headtable/demo`` trains
every head of task ``avel`` (or ``--heads``) in each ``--settings`` through the same task runner
``avel-train`` uses (:func:`train.sweep.run_one` -> :func:`train.runner.run`), one run after the
other in this process, and writes ``headtable.csv`` and ``headtable.md`` under ``--out`` after
every run (a partial table survives an interruption). Columns: head, parameters (built for the
number of classes of the store's manifests), setting, epochs, selected epoch, validation and test
segment accuracy, the majority-class baseline of the test split (share of the most frequent
segment label in the test manifest), and wall seconds of the run.

``python -m train.headtable --make-synthetic DIR`` writes an AVE-sized synthetic store with
learnable structure (see :func:`make_synthetic`) and its ``pipeline.yaml``; train on it with
``--config DIR/pipeline.yaml``.

Importing this module imports neither torch nor decord/librosa.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

log = logging.getLogger(__name__)

TASK = "avel"
#: heads measured first (the papers' heads), the rest follow in name order
PRIORITY = ("dmrn", "a+v-att", "coattention", "bmfn", "avltc", "cace", "cmbs", "cmran", "cpsp", "psp")
COLUMNS = ("head", "parameters", "setting", "epochs", "selected_epoch", "val_accuracy", "test_accuracy",
           "test_majority_baseline", "beats_baseline", "wall_seconds", "error")

# AVE's shape: 4143 videos of T = 10 one-second segments, 28 events + background
SYN_T = 10
SYN_EVENTS = 28
SYN_SPLITS = {"train": 3339, "val": 402, "test": 402}
#: background-only videos added to the training split, as the 178 "noisy" videos of AVE's weakly
#: supervised training: without them a model that sees only video labels never sees background
SYN_BACKGROUND_TRAIN = 178


# ------------------------------------------------------------------------------------------
# synthetic store


def make_synthetic(directory: str | Path, *, seed: int = 0, one_modality_share: float = 0.3, noise: float = 1.0,
                   rows_per_shard: int = 64) -> Path:
    """Write an AVE-sized synthetic store with learnable structure; returns its pipeline.yaml.

    4143 videos (train/val/test = 3339/402/402) plus :data:`SYN_BACKGROUND_TRAIN` background-only
    training videos (empty category; AVE's 178 "noisy" videos) x T=10 segments, visual [7, 7, 512] float16,
    audio [128], 28 event classes + background (29), written by :func:`extract.factories.synthetic.make_synthetic`
    (one event class and window per video, class prototypes on the event segments, a
    ``one_modality_share`` of the background segments with the prototype in ONE modality).
    Layout of ``directory``: ``store.zarr``, ``manifests/{train,val,test}.csv`` + ``classes.txt``,
    ``pipeline.yaml``.
    """
    from extract.factories.synthetic import make_synthetic as write_synthetic

    written = write_synthetic(
        directory, splits=SYN_SPLITS, background={"train": SYN_BACKGROUND_TRAIN}, segments=SYN_T,
        classes=[f"event{k:02d}" for k in range(SYN_EVENTS)], seed=seed, noise=noise,
        one_modality_share=one_modality_share, rows_per_shard=rows_per_shard,
        attrs={"fingerprint": f"synthetic-headtable-{seed}", "extractor": {"name": "train.headtable synthetic"},
               "weights": {"visual": "synthetic", "audio": "synthetic"}, "versions": {}},
        split_options={"video_root": "videos"},
        pipeline_header="# synthetic AVE-sized store written by `python -m train.headtable --make-synthetic`\n")
    log.info("synthetic store %s: %d rows", written.store, len(written.ids))
    return written.pipeline


# ------------------------------------------------------------------------------------------
# baseline and runs


def majority_baseline(pipeline, split: str, segments: int) -> float:
    """Share of the most frequent segment label (background included) of ``split``'s manifest."""
    from extract.core.manifest import read_manifest

    from .data import split_manifest

    labels = read_manifest(split_manifest(pipeline, split)).segment_labels(segments)
    return float(np.bincount(labels.ravel()).max() / labels.size)


def ordered_heads(names: Sequence[str]) -> list[str]:
    """``names`` with the :data:`PRIORITY` heads first."""
    first = [h for h in PRIORITY if h in names]
    return first + [h for h in names if h not in first]


def disable_plots() -> None:
    """Replace the avel task's PNG writer by a no-op (matplotlib dominates short demo runs)."""
    from .tasks import avel_task as avel

    avel.write_plots = lambda *args, **kwargs: None


def measure(pipeline, heads: Sequence[str], settings: Sequence[str], seed: int, out: Path) -> list[dict[str, Any]]:
    """Train every head x setting once (seed ``seed``); rewrite the tables after each run."""
    from extract.core.store import open_store

    from .sweep import RunSpec, _failed_row, run_one

    cfg = pipeline.train
    segments = open_store(pipeline.path(pipeline.store.path)).segments
    baseline = majority_baseline(pipeline, cfg.test_split, segments)
    state, base_dir, source = pipeline.to_dict(), str(pipeline.base_dir), pipeline.source
    rows: list[dict[str, Any]] = []
    for setting in settings:
        for head in heads:
            spec = RunSpec(head, setting, seed)
            started = time.perf_counter()
            try:
                run = run_one(state, base_dir, source, spec)
            except Exception as exc:  # noqa: BLE001 - a failed head is a row of the table
                log.error("%s %s failed: %s", head, setting, exc)
                run = _failed_row(TASK, spec, exc)
            test = run.get("test_accuracy")
            row = {"head": head, "parameters": run.get("param_count"), "setting": setting, "epochs": cfg.epochs or "head default",
                   "selected_epoch": run.get("selected_epoch"), "val_accuracy": run.get("val_accuracy"),
                   "test_accuracy": test, "test_majority_baseline": baseline,
                   "beats_baseline": "" if test is None else ("yes" if test > baseline else "NO"),
                   "wall_seconds": round(time.perf_counter() - started, 1), "error": run.get("error", "")}
            rows.append(row)
            click.echo(f"{head:<18} {setting:<10} params {row['parameters']} test {_fmt(test)} "
                       f"(baseline {baseline:.4f}) {row['wall_seconds']} s {row['error']}", err=True)
            write_tables(out, rows, pipeline)
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_tables(out: Path, rows: Sequence[dict[str, Any]], pipeline) -> tuple[Path, Path]:
    """``out/headtable.csv`` and ``out/headtable.md``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "headtable.csv", out / "headtable.md"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    lines = [f"store: `{pipeline.path(pipeline.store.path)}`, selection on {pipeline.train.select_on}, "
             f"seed {pipeline.train.seeds[0]}", "",
             "| head | parameters | setting | epochs | sel. epoch | val acc | test acc | test majority | beats | wall s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        params = "-" if r["parameters"] is None else f"{r['parameters']:,}"
        beats = r["beats_baseline"] or f"failed: {r['error'][:60]}"
        lines.append(f"| {r['head']} | {params} | {r['setting']} | {r['epochs']} | {r['selected_epoch'] or '-'} | "
                     f"{_fmt(r['val_accuracy'])} | {_fmt(r['test_accuracy'])} | {r['test_majority_baseline']:.4f} | "
                     f"{beats} | {r['wall_seconds']} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def read_table(folder: str | Path) -> list[dict[str, str]]:
    """The rows of ``folder/headtable.csv``."""
    with (Path(folder) / "headtable.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def combined_markdown(stores: Sequence[tuple[str, Sequence[dict[str, str]]]], parameters: dict[str, int]) -> str:
    """One row per head: ``parameters`` (e.g. built for AVE's 29 classes), then per (store, setting)
    the test accuracy, with the test majority baseline of each column in its header. ``stores``:
    (label, rows of :func:`read_table`); a head missing from a table shows "-", a failed run "failed",
    an accuracy not above the baseline is marked "(NO)"."""
    baselines: dict[tuple[str, str], float] = {}  # (store label, setting) -> majority share, in column order
    cells: dict[tuple[str, str, str], str] = {}
    heads: list[str] = []
    for label, rows in stores:
        for row in rows:
            key = (label, row["setting"])
            baselines.setdefault(key, float(row["test_majority_baseline"]))
            if row["head"] not in heads:
                heads.append(row["head"])
            if row.get("error"):
                text = "failed"
            else:
                acc = float(row["test_accuracy"])
                text = f"{acc:.3f}" + ("" if row["beats_baseline"] == "yes" else " (NO)")
            cells[(label, row["setting"], row["head"])] = text
    header = "| head | parameters (C = 29) | " + " | ".join(f"{lab} {st} (majority {b:.3f})" for (lab, st), b in baselines.items()) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(baselines)]
    for head in ordered_heads(heads):
        params = parameters.get(head)
        lines.append(f"| `{head}` | {'-' if params is None else f'{params:,}'} | "
                     + " | ".join(cells.get((lab, st, head), "-") for lab, st in baselines) + " |")
    return "\n".join(lines) + "\n"


def ave_parameter_counts(heads: Sequence[str], num_classes: int = SYN_EVENTS + 1) -> dict[str, int]:
    """Parameter count of each head built for ``num_classes`` (AVE: 29), supervised setting."""
    from .loop import count_parameters
    from .registry import get_head

    return {h: count_parameters(get_head(h)(num_classes, "supervised")) for h in heads}


# ------------------------------------------------------------------------------------------
# CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="pipeline.yaml of the store and splits (e.g. data/demo/pipeline.yaml).")
@click.option("--heads", default=None, metavar="NAME[,NAME...]", help="Heads to measure (default: every avel head; dmrn, a+v-att, coattention, bmfn, avltc first).")
@click.option("--settings", default="supervised", show_default=True, metavar="LIST", help="supervised, weak, or supervised,weak.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per run (default: train.epochs of --config, else each head's paper schedule).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size (default: train.batch_size of --config, else the head's).")
@click.option("--seed", type=int, default=0, show_default=True, help="The one seed of every run.")
@click.option("--out", type=click.Path(file_okay=False), default="/tmp/avel-headtable", show_default=True, help="Folder for headtable.csv/.md; runs go to OUT/runs.")
@click.option("--plots/--no-plots", default=False, show_default=True, help="Write each run's PNG plots.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads.")
@click.option("--loss", type=click.Choice(["ce", "reference"]), default=None, help="Set heads.\"*\".loss: the loss of every head whose config has a loss option (default: leave the config as is).")
@click.option("--make-synthetic", "synthetic_dir", type=click.Path(file_okay=False), default=None, help="Write the AVE-sized synthetic store + manifests + pipeline.yaml into this folder and exit.")
@click.option("--combine", "combine", multiple=True, metavar="LABEL=DIR", help="Print one markdown table of earlier --out folders (repeatable, e.g. --combine demo=/tmp/ht/demo --combine synthetic=/tmp/ht/syn): per head its parameter count for 29 classes and the test accuracy of every store and setting; then exit.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Any other pipeline override (repeatable), e.g. --set train.select_on=last.")
@click.option("-v", "--verbose", count=True, help="More logging.")
def main(config, heads, settings, epochs, batch_size, seed, out, plots, threads, loss, synthetic_dir, combine, sets, verbose):
    """Train every avel head on one store and write a table of parameters and accuracies
    (val/test segment accuracy vs the test split's majority-class baseline).

    \b
    Examples:
      python -m train.headtable --config data/demo/pipeline.yaml --out /tmp/headtable/demo
      python -m train.headtable --make-synthetic /tmp/headtable/syn
      python -m train.headtable --config /tmp/headtable/syn/pipeline.yaml --epochs 2 \\
             --heads dmrn,a+v-att --out /tmp/headtable/syn-out
    """
    from extract.core.clitools import resolve, setup_logging

    setup_logging(verbose)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if synthetic_dir:
        click.echo(f"wrote {make_synthetic(synthetic_dir)}")
        return
    if combine:
        stores = []
        for item in combine:
            label, sep, folder = item.partition("=")
            if not sep:
                raise click.BadParameter(f"{item!r}: expected LABEL=DIR", param_hint="--combine")
            stores.append((label, read_table(folder)))
        names = list(dict.fromkeys(r["head"] for _, rows in stores for r in rows))
        click.echo(combined_markdown(stores, ave_parameter_counts(names)), nl=False)
        return
    import torch

    from .registry import head_names
    from .sweep import parse_list

    torch.set_num_threads(threads)
    known = head_names(task=TASK)
    chosen = parse_list(heads) if heads else known
    unknown = [h for h in chosen if h not in known]
    if unknown:
        raise click.BadParameter(f"not avel heads: {unknown}; known: {', '.join(known)}", param_hint="--heads")
    out = Path(out)
    train = {"task": TASK, "seeds": [seed], "runs_root": str((out / "runs").resolve())}
    if epochs is not None:
        train["epochs"] = epochs
    if batch_size is not None:
        train["batch_size"] = batch_size
    extra: dict[str, Any] = {"train": train}
    if loss:
        extra["heads"] = {"*": {"loss": loss}}  # every head whose config has a loss option
    pipeline = resolve(config, sets, extra)
    if not plots:
        disable_plots()
    rows = measure(pipeline, ordered_heads(chosen), parse_list(settings), seed, out)
    click.echo((out / "headtable.md").read_text())
    failed = [r["head"] for r in rows if r["error"]]
    if failed:
        click.echo(f"failed: {failed}", err=True)


if __name__ == "__main__":
    main()
