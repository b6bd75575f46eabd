"""Training sweeps: heads x settings x seeds as independent runs, in sequence or as Dask tasks.

``avel-train --head dmrn,bmfn --seeds 0-4 [--setting supervised,weak] [--scheduler ...]`` expands
into one run per (head, setting, seed) (:func:`expand_runs`). Each run is exactly what
``avel-train --head H --setting S --seeds K`` does (the task of ``train.task`` writes its own run
directory under ``runs_root``), so a sweep's numbers equal the single runs' numbers.

Where they run:

- no ``--scheduler``: one after the other in this process;
- ``--scheduler local``: an embedded LocalCluster on 127.0.0.1 (``dask.n_workers`` processes,
  ``dask.threads_per_worker`` threads; keep 1 thread: runs seed torch's global generator);
- ``--scheduler tcp://...`` / ``tls://...``: an existing cluster (see :mod:`extract.core.daskclient`
  for TLS). Runs on ``train.device`` cuda ask for the resource ``GPU=1``;
- ``--scheduler slurm``: worker jobs on SLURM (:mod:`extract.core.slurm`, section ``dask.slurm``); a
  job that ends early is replaced and its run starts again (a run is deterministic for its seed).

On a cluster every worker must read the store and write the run folders at the driver's paths
(checked on the workers before the first run is submitted).

The results are gathered in the driver into ``runs_root/sweep-<task>-<time>/``: ``runs.csv``
(one row per run), ``results.csv`` and ``results.md`` (per head and setting: number of runs and
mean ± sample std of the validation and test accuracy, and of the task's other headline metrics
(sol: test cIoU@0.5 / IoU@0.5), each beside its trivial baseline: the ``baseline`` entries of the
runs' metrics.json, i.e. majority class (avel), chance (cml), centre box (sol)). A run that fails
is listed with its error and left out of the means.

Importing this module does not import torch or dask.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

__all__ = ["RunSpec", "parse_list", "expand_runs", "run_one", "run_sweep", "sweep_table", "sweep_markdown",
           "write_sweep"]

#: metrics copied from each run into the sweep tables
RESULT_KEYS = ("val_accuracy", "test_accuracy", "selected_epoch", "selection", "param_count", "wall_seconds")
#: the accuracies summarised per head and setting
TABLE_KEYS = ("val_accuracy", "test_accuracy")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep."""

    head: str
    setting: str
    seed: int


def parse_list(text: str | Sequence[str]) -> list[str]:
    """``"dmrn, bmfn"`` -> ``["dmrn", "bmfn"]`` (order kept, duplicates and blanks dropped)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return list(dict.fromkeys(item.strip() for item in items if item and item.strip()))


def expand_runs(heads: Sequence[str], settings: Sequence[str], seeds: Sequence[int]) -> list[RunSpec]:
    """Every (head, setting, seed), heads outermost, seeds innermost."""
    return [RunSpec(h, s, int(k)) for h in heads for s in settings for k in seeds]


# ------------------------------------------------------------------------------------------
# one run (runs in a worker)


def _pipeline_for(state: dict[str, Any], base_dir: str, source: str | None, spec: RunSpec):
    """The resolved pipeline of the sweep with ``train.head/setting/seeds`` of ``spec``."""
    from extract.core.settings import load_pipeline

    sections = {name: dict(values) if isinstance(values, dict) else values for name, values in state.items()}
    sections["train"] = {**sections["train"], "head": spec.head, "setting": spec.setting, "seeds": [spec.seed]}
    pipeline = load_pipeline(None, sections, search=False)
    pipeline.base_dir = Path(base_dir)
    pipeline.source = source
    return pipeline


def check_spec(task: str, spec: RunSpec) -> None:
    """ValueError when the head is unknown, of another task, or does not support the setting."""
    from .registry import get_head

    try:
        head_cls = get_head(spec.head)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    if head_cls.task != task:
        raise ValueError(f"head {spec.head!r} is a {head_cls.task!r} head, the sweep's task is {task!r}")
    if spec.setting not in head_cls.settings:
        raise ValueError(f"head {spec.head!r} supports --setting {'/'.join(head_cls.settings)}, not {spec.setting!r}")


def run_one(state: dict[str, Any], base_dir: str, source: str | None, spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one (head, setting, seed); returns its row for the sweep tables.

    ``state`` = ``pipeline.to_dict()`` of the sweep (a plain dict travels to any worker).
    """
    from . import runner

    pipeline = _pipeline_for(state, base_dir, source, spec)
    cfg = pipeline.train
    check_spec(cfg.task, spec)
    # the run folder is made once the run's checks have passed, and removed again if it fails
    metrics = runner.run(pipeline, spec.head, spec.seed)
    row = {"task": cfg.task, **dataclasses.asdict(spec), "run_dir": metrics["run_dir"], "error": ""}
    row.update({key: metrics.get(key) for key in RESULT_KEYS})
    row["protocol"] = (metrics.get("protocol") or {}).get("label", "avel")
    row.update(baseline_columns(metrics))
    return row


def baseline_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's headline metrics that have a baseline (metrics.json ``baseline``) and not in
    :data:`RESULT_KEYS` already (sol: ``test_ciou@0.5``...), and ``baseline_<key>`` for each."""
    out: dict[str, Any] = {}
    for key, entry in (metrics.get("baseline") or {}).items():
        if key not in RESULT_KEYS:
            out[key] = metrics.get(key)
        out[f"baseline_{key}"] = entry.get("value") if isinstance(entry, dict) else entry
    return out


def _failed_row(task: str, spec: RunSpec, exc: BaseException) -> dict[str, Any]:
    return {"task": task, **dataclasses.asdict(spec), "run_dir": "", "error": f"{type(exc).__name__}: {exc}",
            **{key: None for key in RESULT_KEYS}}


# ------------------------------------------------------------------------------------------
# the sweep (driver)


def run_sweep(pipeline, specs: Sequence[RunSpec], *, scheduler: str | None = None, client=None,
              on_result: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Run every spec; returns their rows in the order of ``specs``.

    ``client`` (a :class:`distributed.Client`) or ``scheduler`` (``local``, ``tcp://``, ``tls://``)
    runs them as Dask tasks; neither = one after the other in this process. Specs that name an
    unknown head or an unsupported setting are refused before anything runs.
    """
    task = pipeline.train.task
    for spec in specs:
        check_spec(task, spec)
    state, base_dir, source = pipeline.to_dict(), str(pipeline.base_dir), pipeline.source
    rows: dict[RunSpec, dict[str, Any]] = {}
    if client is None and scheduler is None:
        for spec in specs:
            log.info("sweep run %s", spec)
            try:
                rows[spec] = run_one(state, base_dir, source, spec)
            except Exception as exc:  # noqa: BLE001 - a failed run is reported, the sweep goes on
                log.error("run %s failed: %s", spec, exc)
                rows[spec] = _failed_row(task, spec, exc)
            if on_result is not None:
                on_result(rows[spec])
        return [rows[spec] for spec in specs]

    from extract.core.daskclient import check_workers, dask_client

    gpu = str(pipeline.train.device).startswith("cuda")
    with (dask_client(pipeline.dask, scheduler, gpu=gpu, resolve_path=pipeline.path, stage="train") if client is None
          else contextlib.nullcontext(client)) as c:
        from distributed import as_completed

        # the shared file system rule: the store is read and the run folders written at the same paths
        check_workers(c, [str(pipeline.path(pipeline.store.path))], [str(pipeline.path(pipeline.train.runs_root))])
        token = f"{time.time_ns():x}"
        futures = {}
        for i, spec in enumerate(specs):
            future = c.submit(run_one, state, base_dir, source, spec, key=f"avel-train-{spec.head}-{spec.setting}-"
                              f"{spec.seed}-{token}-{i}", pure=False, retries=pipeline.dask.retries,
                              resources={"GPU": 1} if gpu else None)
            futures[future.key] = (future, spec)
        for future in as_completed([f for f, _ in futures.values()]):
            spec = futures[future.key][1]
            try:
                rows[spec] = future.result()
            except Exception as exc:  # noqa: BLE001
                log.error("run %s failed: %s", spec, exc)
                rows[spec] = _failed_row(task, spec, exc)
            log.info("sweep: %d of %d runs finished", len(rows), len(specs))
            if on_result is not None:
                on_result(rows[spec])
    return [rows[spec] for spec in specs]


# ------------------------------------------------------------------------------------------
# tables


def table_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """:data:`TABLE_KEYS` and every other metric the rows give a baseline of (``baseline_<key>``)
    that is a test or val figure (sol: ``test_ciou@0.5``, ``test_iou@0.5``)."""
    keys = list(TABLE_KEYS)
    for row in rows:
        for column in row:
            key = column[len("baseline_"):] if column.startswith("baseline_") else None
            if key and key not in keys and "@" in key:
                keys.append(key)
    return keys


def sweep_table(rows: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per (head, setting), in first-seen order: ``runs`` (successful), ``failed``, ``seeds``,
    ``<key>_mean`` / ``<key>_std`` (sample std, ddof=1; 0 for one run) of each metric of
    ``keys`` (default :func:`table_keys`) and ``<key>_baseline`` (the mean of the runs'
    baselines of it; empty when the runs give none)."""
    from .runs import mean_std

    keys = table_keys(rows) if keys is None else keys
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["head"], row["setting"]), []).append(row)
    table = []
    for (head, setting), members in groups.items():
        ok = [r for r in members if not r.get("error")]
        entry: dict[str, Any] = {"head": head, "setting": setting, "runs": len(ok), "failed": len(members) - len(ok),
                                 "seeds": " ".join(str(r["seed"]) for r in ok),
                                 "protocol": ", ".join(dict.fromkeys(str(r.get("protocol") or "avel") for r in ok)) or "avel"}
        for key in keys:
            values = [r[key] for r in ok if r.get(key) is not None]
            mean, std = mean_std(values) if values else (None, None)
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean, std
            bases = [r[f"baseline_{key}"] for r in ok if r.get(f"baseline_{key}") is not None]
            entry[f"{key}_baseline"] = mean_std(bases)[0] if bases else None
        table.append(entry)
    return table


def sweep_markdown(table: Sequence[dict[str, Any]], task: str, keys: Sequence[str] | None = None) -> str:
    """Markdown: one row per head and setting, mean ± std of each metric and, in the column after
    it, its baseline (majority class / chance / centre box: the runs' ``baseline`` entries)."""
    if keys is None:
        keys = list(dict.fromkeys(k[: -len("_mean")] for entry in table for k in entry if k.endswith("_mean")))
        keys = keys or list(TABLE_KEYS)

    def cell(entry, key):
        mean, std = entry.get(f"{key}_mean"), entry.get(f"{key}_std")
        return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"

    def base(entry, key):
        value = entry.get(f"{key}_baseline")
        return "-" if value is None else f"{value:.4f}"

    header = " | ".join(f"{k} | {k} baseline" for k in keys)
    protocols = [p for p in dict.fromkeys(str(entry.get("protocol") or "avel") for entry in table) if p != "avel"]
    lines = [f"# sweep: task {task}", "",
             "mean ± sample standard deviation over seeds; baseline = the task's trivial predictor on the same data "
             "(avel: majority class, cml: chance, sol: centre box / majority class)", "",
             *([f"trained with the {'; '.join(protocols)}", ""] if protocols else []),
             "| head | setting | runs | " + header + " |", "|---|---|---|" + "---|---|" * len(keys)]
    for entry in table:
        runs = f"{entry['runs']}" + (f" ({entry['failed']} failed)" if entry["failed"] else "")
        cells = " | ".join(f"{cell(entry, k)} | {base(entry, k)}" for k in keys)
        lines.append(f"| {entry['head']} | {entry['setting']} | {runs} | {cells} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def write_sweep(runs_root: str | Path, task: str, rows: Sequence[dict[str, Any]],
                now: _dt.datetime | None = None) -> dict[str, Path]:
    """Write ``runs.csv``, ``results.csv`` and ``results.md`` into ``runs_root/sweep-<task>-<time>/``."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    directory = Path(runs_root) / f"sweep-{task}-{stamp}"
    n = 0
    while directory.exists():
        n += 1
        directory = Path(runs_root) / f"sweep-{task}-{stamp}-{n}"
    directory.mkdir(parents=True)
    table = sweep_table(rows)
    paths = {"runs": _write_csv(directory / "runs.csv", rows), "results": _write_csv(directory / "results.csv", table)}
    paths["markdown"] = directory / "results.md"
    paths["markdown"].write_text(sweep_markdown(table, task))
    return paths
