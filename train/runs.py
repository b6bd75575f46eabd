"""Run directories and what every run writes (shared by all tasks: avel, cml, sol).

Layout::

    runs_root/<task>-<head>-<setting>[-reference]/     (-reference: train.protocol reference)
        seed<k>-<YYYYmmdd-HHMMSS>/
            config.yaml              resolved pipeline (pipeline.dump())
            metrics.json             the task's metrics dict (+ run identity)
            epochs.csv               one row per epoch
            checkpoint.safetensors   weights, metadata = JSON (head, head config, pipeline, ...)
            *.png                    plots written by the task (train.plots)
        summary.json, summary.md     mean +- std over the seeds of the last multi-seed call
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .checkpoint import save_checkpoint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# run setup (shared by the tasks)


def splits_to_load(pipeline) -> list[str]:
    """train + test, and val when configured (required when selecting on val); no repeats."""
    cfg = pipeline.train
    names = [cfg.train_split, cfg.test_split]
    if cfg.select_on == "val" or cfg.val_split in pipeline.data.splits:
        names.append(cfg.val_split)
    return list(dict.fromkeys(names))


#: ``heads: {"*": {loss: ce}}`` sets an option for every head whose config has it
ALL_HEADS = "*"


def head_overrides(heads: Mapping[str, Any] | None, head_name: str) -> dict[str, Any]:
    """The options of section ``heads`` for ``head_name``: the ``"*"`` entry's keys that its
    config has, then its own entry. Keys of ``heads`` that name no registered head, and ``"*"``
    keys that no registered head has, are errors (a typo must not be ignored silently)."""
    from .registry import HEADS, discover, get_head

    discover()
    heads = heads or {}
    unknown = [name for name in heads if name != ALL_HEADS and name not in HEADS]
    if unknown:
        raise ValueError(f"heads.{unknown[0]}: no such head; registered: {', '.join(sorted(HEADS))}")
    common = dict(heads.get(ALL_HEADS) or {})
    known_fields = {f.name for cls in HEADS.values() if dataclasses.is_dataclass(cls.Config)
                    for f in dataclasses.fields(cls.Config)}
    for key in common:
        if key not in known_fields:
            raise ValueError(f'heads."{ALL_HEADS}".{key}: no registered head has an option {key!r}')
    fields = {f.name for f in dataclasses.fields(get_head(head_name).Config)}
    return {**{k: v for k, v in common.items() if k in fields}, **(heads.get(head_name) or {})}


def head_class_and_config(pipeline, head_name: str, task: str):
    """The registered head class ``head_name`` (which must belong to ``task``) and its config
    with the ``heads."*"`` and ``heads.<name>`` overrides of ``pipeline`` applied."""
    from .registry import get_head

    head_cls = get_head(head_name)
    if head_cls.task != task:
        raise ValueError(f"head {head_name!r} belongs to task {head_cls.task!r}, not {task!r}")
    return head_cls, head_cls.make_config(head_overrides(pipeline.heads, head_name))


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"0,1,2"``, ``"0-4"``, ``"0-2,7"`` -> list of ints (order kept, duplicates dropped)."""
    if not isinstance(text, str):
        return list(dict.fromkeys(int(s) for s in text))
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r}: end before start")
            seeds.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise ValueError(f"seeds {text!r}: expected e.g. 0,1,2 or 0-4, got {part!r}")
    if not seeds:
        raise ValueError(f"seeds {text!r}: no seed given")
    return list(dict.fromkeys(seeds))


def group_dir(runs_root: str | Path, task: str, head: str, setting: str, protocol: str = "avel") -> Path:
    """``runs_root/<task>-<head>-<setting>``, with ``-reference`` appended for runs of the
    reference protocol (``train.protocol``)."""
    from .protocol import run_group_suffix

    return Path(runs_root) / f"{task}-{head}-{setting}{run_group_suffix(protocol)}"


def make_run_dir(runs_root: str | Path, task: str, head: str, setting: str, seed: int, now: _dt.datetime | None = None,
                 protocol: str = "avel") -> Path:
    """Create and return ``runs_root/<task>-<head>-<setting>[-reference]/seed<k>-<timestamp>`` (a
    suffix -1, -2 ... is added if that directory exists)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = group_dir(runs_root, task, head, setting, protocol) / f"seed{seed}-{stamp}"
    path, n = base, 0
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def write_epochs_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Per-epoch rows as CSV; columns = union of the rows' keys in first-seen order."""
    path = Path(path)
    columns: list[str] = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def read_epochs_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars/arrays -> python, Paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_run(
    run_dir: str | Path,
    pipeline,
    metrics: Mapping[str, Any],
    epochs_rows: Sequence[Mapping[str, Any]],
    state: Mapping[str, Any] | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write config.yaml, metrics.json, epochs.csv and (if ``state``) checkpoint.safetensors.

    ``state`` = the weights to save (a state dict, or a module whose state dict is saved);
    ``checkpoint_meta`` = what rebuilds the model (``head``, ``head_config``, ``num_classes``,
    ``setting``, ``task``); the resolved pipeline and ``metrics`` are embedded as well.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # the folder the configuration's relative paths are relative to: with config.yaml, the run
    # describes itself (:func:`run_pipeline`) from whatever folder a later command starts in
    metrics = {**metrics, PROJECT_DIR: str(Path(pipeline.base_dir).resolve())}
    written = {
        "config": _write_text(run_dir / "config.yaml", pipeline.dump()),
        "metrics": write_json(run_dir / "metrics.json", metrics),
        "epochs": write_epochs_csv(run_dir / "epochs.csv", epochs_rows),
    }
    if state is not None:
        if hasattr(state, "state_dict"):
            state = state.state_dict()
        meta = {**dict(checkpoint_meta or {}), "pipeline": pipeline.to_dict(), "metrics": _jsonable(_summary_of(metrics))}
        written["checkpoint"] = save_checkpoint(run_dir / "checkpoint.safetensors", state, _jsonable(meta))
    log.info("run written to %s", run_dir)
    return written


#: metrics.json's entry for the folder the run's relative paths start from (``Pipeline.base_dir``)
PROJECT_DIR = "project_dir"


def run_pipeline(run_dir: str | Path, config: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None):
    """The configuration a run was trained with, so that ``--run RUN`` needs nothing else: its
    ``config.yaml`` (store, splits, box folder, cache, every section), relative paths resolved
    against the folder the run was started from, then ``overrides`` (``{"store": {"path": ...}}``).

    ``config``: a pipeline file the user named explicitly (``--config``), used instead of the
    run's. The start folder is metrics.json's ``project_dir``; for runs written before it was
    recorded, or whose project moved, it is the folder from which ``train.runs_root`` leads to
    the run (``<root>/<runs_root>/<group>/<seed folder>``)."""
    from extract.core.settings import ConfigError, load_pipeline

    run_dir = Path(run_dir).resolve()
    if config is not None:
        return load_pipeline(config, overrides)
    file = run_dir / "config.yaml"
    if not file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml there (an avel-train run folder holds config.yaml, "
                          "metrics.json and checkpoint.safetensors)")
    pipeline = load_pipeline(file, overrides, search=False)
    pipeline.base_dir = _project_dir(run_dir, pipeline)
    pipeline.source = f"{file} (the run's configuration)"
    return pipeline


def _project_dir(run_dir: Path, pipeline) -> Path:
    try:
        recorded = json.loads((run_dir / "metrics.json").read_text()).get(PROJECT_DIR)
    except (OSError, ValueError):
        recorded = None
    runs_root = Path(os.path.expanduser(str(pipeline.train.runs_root)))
    group = run_dir.parent.parent
    if recorded and Path(recorded).is_dir() and (runs_root.is_absolute() or (Path(recorded) / runs_root).resolve() == group
                                                 or run_dir.is_relative_to(Path(recorded).resolve())):
        return Path(recorded)  # the project has not moved (a run folder given by path may lie anywhere in it)
    if runs_root.is_absolute():
        return Path(recorded) if recorded else run_dir
    for candidate in run_dir.parents:
        if (candidate / runs_root).resolve() == group:
            return candidate
    log.warning("%s: cannot tell the folder its relative paths start from (train.runs_root %s does not lead "
                "to it); using the run folder", run_dir, runs_root)
    return run_dir


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _summary_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of metrics (what goes into the checkpoint's metadata)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


# ---------------------------------------------------------------------------------------------
# several seeds

SUMMARY_KEYS = (
    "val_accuracy", "test_accuracy",
    # task cml (absent from other tasks' metrics, then skipped): A2V / V2A and the chance level
    "test_a2v_accuracy", "test_v2a_accuracy", "test_chance_accuracy",
)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def mean_std_text(values: Sequence[float], digits: int = 4, unit: str = "") -> str:
    """``0.7312`` for one value, ``0.7312 ± 0.0100`` (sample std) for several, ``n/a`` for none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def summarize(runs: Sequence[Mapping[str, Any]], keys: Sequence[str] = SUMMARY_KEYS) -> dict[str, Any]:
    """Mean +- std of ``keys`` over runs (each a metrics dict with ``seed`` and ``run_dir``)."""
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in runs], "runs": [str(r.get("run_dir", "")) for r in runs]}
    for key in ("task", "head", "setting", "selection"):
        values = {str(r.get(key)) for r in runs if key in r}
        if values:
            out[key] = values.pop() if len(values) == 1 else sorted(values)
    labels = {str(r["protocol"].get("label")) for r in runs if isinstance(r.get("protocol"), Mapping)}
    if labels:  # avel, or "reference protocol (<script>)"
        out["protocol_label"] = labels.pop() if len(labels) == 1 else sorted(labels)
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            mean, std = mean_std(values)
            out[key] = {"mean": mean, "std": std, "n": len(values), "values": values}
    baselines = [r["baseline"] for r in runs if r.get("baseline")]
    if baselines:  # the trivial predictor of the task on the same data (the same for every seed)
        out["baseline"] = baselines[0]
    return out


def summary_markdown(summary: Mapping[str, Any], keys: Sequence[str] = SUMMARY_KEYS) -> str:
    """A small Markdown table: one row per seed, then mean +- std."""
    present = [k for k in keys if k in summary]
    lines = [
        f"# {summary.get('task', '?')} / {summary.get('head', '?')} / {summary.get('setting', '?')}",
        "",
        f"selection: {summary.get('selection', '?')}; protocol: {summary.get('protocol_label', 'avel')}; "
        "std = sample standard deviation over seeds",
        "",
        "| seed | " + " | ".join(present) + " |",
        "|---|" + "---|" * len(present),
    ]
    for i, seed in enumerate(summary.get("seeds", [])):
        cells = []
        for k in present:
            vals = summary[k]["values"]
            cells.append(f"{vals[i]:.4f}" if i < len(vals) else "")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}" for k in present) + " |")
    base = summary.get("baseline") or {}
    cells = [f"{(base.get(k) or {}).get('value'):.4f}" if (base.get(k) or {}).get("value") is not None else "-" for k in present]
    if any(c != "-" for c in cells):
        lines.append("| baseline | " + " | ".join(cells) + " |")
        methods = dict.fromkeys((base[k] or {}).get("method", "") for k in present if base.get(k))
        lines += ["", "baseline: " + "; ".join(m for m in methods if m)]
    return "\n".join(lines) + "\n"


def write_summary(directory: str | Path, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    js = write_json(directory / "summary.json", summary)
    md = directory / "summary.md"
    md.write_text(summary_markdown(summary))
    return js, md
