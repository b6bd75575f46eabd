"""Measurement behind docs/training.md "Training parity": avel against the transcribed reference
trainers (tests/reference_trainers.py), each with its OWN initialisation and batch order, on an
AVE-sized synthetic store. Not a test (pytest does not collect it); run from the repository root::

    python tests/training_parity_measure.py make-store /tmp/29-measure/store --ave ../shared/ave
    python tests/training_parity_measure.py run --store /tmp/29-measure/store --side avel --head dmrn \\
           --seed 0 --epochs 25 --out /tmp/29-measure/results.jsonl
    python tests/training_parity_measure.py run ... --side reference ...
    python tests/training_parity_measure.py table /tmp/29-measure/results.jsonl

``run --side avel`` trains the head exactly as ``avel-train --head H --seeds K`` does (the runner's
setup and :func:`train.loop.fit`, default protocol: a new order every epoch, every sample, val
evaluated after every epoch); ``--side reference`` builds the reference model (tests/test_*_parity.py)
under ``torch.manual_seed(seed)`` and runs the script's loop (fixed or per-epoch order, last partial
batch dropped or kept, its evaluation cadence and selection). Both record the test accuracy at every
epoch they evaluate, so each gives the test accuracy of the epoch selected on val and the best test
accuracy (selection on test, as most reference scripts report). One JSON line per run.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: AVE's sizes: 3339 / 402 / 402 videos of T = 10 segments, 28 events + background
SPLITS = {"train": 3339, "val": 402, "test": 402}
T = 10
EVENTS = 28


@click.group()
def main():
    """avel vs the transcribed reference trainers (see the module docstring)."""


@main.command("make-store")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale", type=float, default=1.5, show_default=True, help="Prototype scale (extract.factories.synthetic).")
@click.option("--mislabelled", type=float, default=0.15, show_default=True, help="Share of event videos whose features carry another class.")
@click.option("--one-modality", type=float, default=0.3, show_default=True, help="Share of background segments with the prototype in one modality.")
@click.option("--sizes", default="3339,402,402", show_default=True, help="train,val,test videos (smaller: a smoke test).")
@click.option("--ave", "ave_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of AVE's Annotations.txt and {train,val,test}Set.txt: the store takes their classes, "
                   "event windows and split sizes (features stay synthetic).")
def make_store(directory, seed, scale, mislabelled, one_modality, sizes, ave_dir):
    """An AVE-sized synthetic store (3339 / 402 / 402 videos, T = 10, 28 classes + background)."""
    from extract.factories.synthetic import make_synthetic

    splits = dict(zip(SPLITS, (int(n) for n in sizes.split(","))))
    classes, events = [f"event{k:02d}" for k in range(EVENTS)], None
    if ave_dir:
        classes, events = ave_events(Path(ave_dir))
        splits = {split: len(rows) for split, rows in events.items()}
    written = make_synthetic(directory, splits=splits, classes=classes, segments=T, events=events,
                             seed=seed, one_modality_share=one_modality, prototype_scale=scale,
                             mislabelled_share=mislabelled, rows_per_shard=64,
                             attrs={"fingerprint": f"training-parity-{seed}-{scale}-{mislabelled}-{one_modality}",
                                    "extractor": {"name": "tests/training_parity_measure.py"},
                                    "weights": {"visual": "synthetic", "audio": "synthetic"}, "versions": {}})
    click.echo(f"wrote {written.store} and {written.pipeline}")


def ave_events(ave_dir: Path) -> tuple[list[str], dict[str, list[tuple[int, int, int]]]]:
    """AVE's classes (order of first appearance in Annotations.txt, the reference's indices) and,
    per split, ``(class, onset, offset)`` of every video in the split file's order."""
    from extract.ave import SPLIT_FILES, assign_split_rows, class_order, read_annotations

    annotations = read_annotations(ave_dir / "Annotations.txt")
    classes = class_order(annotations)
    events = {}
    for split, filename in SPLIT_FILES.items():
        rows = assign_split_rows(annotations, ave_dir / filename)
        events[split] = [(classes.index(annotations[r].category), annotations[r].start, annotations[r].end) for r in rows]
    return classes, events


def reference_model(head: str):
    """The transcribed reference model of ``head`` and the trainer that runs it."""
    import reference_trainers as rt

    if head == "a+v-att":
        from test_avel_parity import RefAttNet

        return rt.script_initialisation(head, RefAttNet()), rt.ave_eccv18_supervised
    if head == "dmrn":
        from test_avel_parity import RefTBMRFNet

        return rt.script_initialisation(head, RefTBMRFNet()), rt.ave_eccv18_supervised
    if head == "psp":
        from test_psp_parity import RefPspNetFully

        return rt.script_initialisation(head, RefPspNetFully()), rt.psp_fully_supervised
    if head == "cmbs":
        from test_cmbs_parity import MAIN_JSON, RefSupvMainModel

        return rt.script_initialisation(head, RefSupvMainModel(MAIN_JSON)), rt.cmbs_supervised
    raise click.BadParameter(f"no reference trainer for {head!r}")


def run_reference(store: Path, head: str, seed: int, epochs: int) -> dict:
    import torch

    import reference_trainers as rt

    manifests = {s: store / "manifests" / f"{s}.csv" for s in SPLITS}
    data = rt.reference_data(store / "store.zarr", manifests)
    torch.manual_seed(seed)
    model, trainer = reference_model(head)
    dtype = torch.float64 if head == "cmbs" else torch.float32
    model = model.to(dtype)
    tests: dict[int, float] = {}
    vals: dict[int, float] = {}

    def on_evaluate(epoch, net):
        if head in ("a+v-att", "dmrn"):  # the script evaluates val; the test figure at the same epochs
            with torch.no_grad():
                tests[epoch] = evaluate_ave(net, data, data.orders["test"], dtype)
        click.echo(f"{_dt.datetime.now():%H:%M:%S} epoch {epoch} evaluated; test {tests.get(epoch)}", err=True)

    t0 = time.perf_counter()
    run = trainer(model, data, epochs, dtype=dtype, on_evaluate=on_evaluate)
    seconds = time.perf_counter() - t0
    if head in ("a+v-att", "dmrn"):
        vals = dict(run.evaluations)
        selected = run.best_epoch
        val_selected = {"epoch": selected, "val": vals.get(selected), "test": run.test_accuracy}
    elif head == "psp":
        vals = dict(run.extra["val"])
        tests = dict(run.evaluations)
        selected = max(vals, key=lambda e: (vals[e], -e)) if vals else 0  # the earliest best val epoch
        val_selected = {"epoch": selected, "val": vals.get(selected), "test": tests.get(selected)}
    else:  # cmbs evaluates test only
        tests = dict(run.evaluations)
        val_selected = {"epoch": None, "val": None, "test": None}
    best_test_epoch = max(tests, key=lambda e: (tests[e], -e)) if tests else 0
    return {"val_selected": val_selected,
            "test_selected": {"epoch": best_test_epoch, "test": tests.get(best_test_epoch)},
            "evaluated": sorted(set(tests) | set(vals)), "val_curve": vals, "test_curve": tests,
            "train_losses_last_epoch_mean": float(np.mean(run.step_losses[-max(1, len(run.step_losses) // max(epochs, 1)):])),
            "seconds": seconds}


def evaluate_ave(net, data, order, dtype) -> float:
    """The test accuracy as AVE-ECCV18's test() computes it, in chunks (memory)."""
    import torch

    import reference_trainers as rt

    was = net.training
    net.eval()
    preds = []
    for start in range(0, len(order), 64):
        rows = order[start:start + 64]
        audio = torch.from_numpy(data.audio[rows]).to(dtype)
        video = torch.from_numpy(data.visual[rows].astype(np.float32)).to(dtype)
        preds.append(net(audio, video).cpu().numpy())
    net.train(was)
    x = np.concatenate(preds)
    return rt.ave_compute_acc(data.labels[order], x, len(order))


def run_avel(store: Path, head: str, seed: int, epochs: int) -> dict:
    from extract.core.settings import load_pipeline
    from train.loop import fit
    from train.runner import setup

    pipeline = load_pipeline(store / "pipeline.yaml", {"train": {"head": head, "epochs": epochs, "seeds": [seed],
                                                                  "select_on": "val"}})
    task, model, schedule, _ = setup(pipeline, head, seed)
    rows: list[dict] = []

    def on_epoch(row):
        test = task.evaluate(model, pipeline.train.test_split)
        row = dict(row, test_accuracy=test.score)
        rows.append(row)

    t0 = time.perf_counter()
    result = fit(model, task, schedule, seed, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    tests = {r["epoch"]: r["test_accuracy"] for r in rows}
    vals = {r["epoch"]: r["val_accuracy"] for r in rows if "val_accuracy" in r}
    best_test_epoch = max(tests, key=lambda e: (tests[e], -e))
    return {"val_selected": {"epoch": result.best_epoch, "val": result.results["val"].accuracy,
                             "test": result.results["test"].accuracy},
            "test_selected": {"epoch": best_test_epoch, "test": tests[best_test_epoch]},
            "evaluated": sorted(vals), "val_curve": vals, "test_curve": tests,
            "train_curve": {r["epoch"]: {"loss": r["train_loss"], "accuracy": r.get("train_accuracy")} for r in rows},
            "seconds": seconds}


@main.command("run")
@click.option("--store", "store", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--side", type=click.Choice(["avel", "reference"]), required=True)
@click.option("--head", required=True)
@click.option("--seed", type=int, required=True)
@click.option("--epochs", type=int, required=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="JSON lines file (appended).")
def run(store, side, head, seed, epochs, threads, out):
    """One training run of one side; appends its figures to --out."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(threads)
    store = Path(store)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    figures = (run_avel if side == "avel" else run_reference)(store, head, seed, epochs)
    line = {"side": side, "head": head, "seed": seed, "epochs": epochs, "store": str(store), "threads": threads,
            "started": started, "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "load": os.getloadavg(), **figures}
    with open(out, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    click.echo(json.dumps({k: line[k] for k in ("side", "head", "seed", "val_selected", "test_selected", "seconds")}))


def at_cadence(line: dict) -> tuple[float | None, float | None]:
    """An avel run's test accuracy selected on val and on test when only the epochs the head's
    reference script evaluates are looked at (AVE-ECCV18: 1, 6, 11, ...; PSP: 6, 11, ...)."""
    from train.registry import get_head

    epochs = set(get_head(line["head"]).reference_protocols["supervised"].evaluated_epochs(line["epochs"]))
    vals = {int(e): v for e, v in line["val_curve"].items() if int(e) in epochs}
    tests = {int(e): v for e, v in line["test_curve"].items() if int(e) in epochs}
    if not tests:
        return None, None
    on_val = tests[max(vals, key=lambda e: (vals[e], -e))] if vals else None
    return on_val, max(tests.values())


@main.command("table")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
def table(results):
    """Markdown: per head and side, mean ± sample std over seeds of the test accuracy selected on
    val and on test, with the seeds' values; for avel also both figures when only the epochs the
    reference script evaluates are considered."""
    lines = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for line in lines:
        groups.setdefault((line["head"], line["side"], line["epochs"]), []).append(line)

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        arr = np.asarray(values) * 100
        spread = f" ± {arr.std(ddof=1):.1f}" if len(arr) > 1 else ""
        return f"{arr.mean():.1f}{spread} ({', '.join(f'{v:.1f}' for v in arr)})"

    out = ["| head | trainer | epochs | seeds | test acc., epoch selected on val | test acc., epoch selected on test |",
           "|---|---|---:|---|---|---|"]
    for (head, side, epochs), members in sorted(groups.items()):
        members.sort(key=lambda m: m["seed"])
        seeds = ",".join(str(m["seed"]) for m in members)
        out.append(f"| `{head}` | {side} | {epochs} | {seeds} | {cell([m['val_selected']['test'] for m in members])} | "
                   f"{cell([m['test_selected']['test'] for m in members])} |")
        if side == "avel":
            cadence = [at_cadence(m) for m in members]
            out.append(f"| `{head}` | avel, only the epochs the reference evaluates | {epochs} | {seeds} | "
                       f"{cell([c[0] for c in cadence])} | {cell([c[1] for c in cadence])} |")
    click.echo("\n".join(out))


if __name__ == "__main__":
    main()
