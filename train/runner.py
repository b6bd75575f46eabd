"""One training run, from a resolved pipeline to a run folder: what ``avel-train`` and every
sweep worker call. Read it top to bottom::

    setup(pipeline, head, seed)      threads, device, the task's data and checks, seeds, the head,
                                     attach, schedule, protocol check -> Setup(task, model, schedule, device)
    run(pipeline, head, seed)        setup; then the run folder (made only now, once every check
                                     passed); fit; metrics; config.yaml, metrics.json, epochs.csv,
                                     checkpoint and the task's files. When anything after the folder
                                     was made fails, the folder is removed again (:func:`run_folder`)
    evaluate_run(run_dir, split)     a finished run's checkpoint scored again on one split, through
                                     the same task methods that gave its metrics.json figures

Who does what: a task (:class:`train.tasks.base.Task`: avel, cml, sol) gives the data, the loss
and the metric; the loop (:func:`train.loop.fit`) owns epochs, schedule and selection; this module
puts them together and owns threads, device, seeds and the run folder.

Errors a user can fix (a missing store, missing arrays, a manifest that does not fit, bad head
options) are raised by :func:`setup` before any run folder is made; a ``ValueError`` raised there
becomes a :class:`SetupError` (the CLI prints it as one line and exits 2).
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

from .loop import Schedule, check_protocol_epochs, count_parameters, fit, resolve_schedule, seed_everything
from .protocol import resolve_protocol

log = logging.getLogger(__name__)


class SetupError(ValueError):
    """A run cannot start: a check made before training failed (bad head options, a device that
    is not there, ...); the message says what to change."""


def resolve_threads(threads: int | None) -> int:
    """``train.threads`` / ``--threads``: None or 0 = every core (``os.cpu_count()``)."""
    if threads is None or int(threads) == 0:
        return max(1, os.cpu_count() or 1)
    if int(threads) < 0:
        raise SetupError(f"train.threads must be >= 1 (0 or null = all {os.cpu_count()} cores), got {threads}")
    return int(threads)


class Setup(NamedTuple):
    """What :func:`setup` returns: the task holding the run's data, the head on ``device``, the
    resolved optimiser schedule and the device."""

    task: Any
    model: torch.nn.Module
    schedule: Schedule
    device: torch.device


def task_class(pipeline, task_cls: type | None = None) -> type:
    """``task_cls``, else the registered task of ``train.task``."""
    if task_cls is not None:
        return task_cls
    from .registry import get_task

    return get_task(pipeline.train.task)


def _environment(cfg) -> torch.device:
    """torch's CPU threads (``train.threads``) and the device of ``train.device``."""
    from .data import resolve_device

    torch.set_num_threads(resolve_threads(getattr(cfg, "threads", None)))
    return resolve_device(cfg.device)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A ValueError that is not already a user error becomes a :class:`SetupError`."""
    from extract.core.manifest import ManifestError
    from extract.core.settings import ConfigError

    from .data import DataError

    try:
        yield
    except (DataError, ManifestError, ConfigError, SetupError):
        raise
    except ValueError as exc:
        raise SetupError(str(exc)) from exc


def setup(pipeline, head_name: str, seed: int, task_cls: type | None = None) -> Setup:
    """Everything before the first epoch: threads and device, the data with its checks
    (``Task.prepare``), the seeds, the head (``Task.build_head``), ``Task.attach`` and the
    schedule, whose epochs the run's protocol must be able to evaluate."""
    cfg = pipeline.train
    task_cls = task_class(pipeline, task_cls)
    with _user_errors():
        device = _environment(cfg)
        task = task_cls.prepare(pipeline, device)
        seed_everything(seed, device)
        model = task.build_head(head_name)
        task.attach(model)
        schedule = resolve_schedule(cfg, type(model))
        check_protocol_epochs(resolve_protocol(cfg, type(model)), schedule.epochs)
    return Setup(task, model, schedule, device)


@contextlib.contextmanager
def run_folder(pipeline, head_name: str, seed: int, run_dir: str | Path | None = None) -> Iterator[Path]:
    """The folder of one run, made on entering: ``run_dir``, or a new
    ``runs_root/<task>-<head>-<setting>[-reference]/seed<k>-<time>`` (:func:`train.runs.make_run_dir`).

    When the block raises (or is interrupted), a folder made here is removed with what was
    written to it, and so is its ``<task>-<head>-<setting>`` folder when that is left empty: a
    run folder either holds a whole run or does not exist. A ``run_dir`` that existed before is
    left as it is."""
    from .runs import make_run_dir

    cfg = pipeline.train
    if run_dir is None:
        folder = make_run_dir(pipeline.path(cfg.runs_root), cfg.task, head_name, cfg.setting, seed, protocol=cfg.protocol)
        made = True
    else:
        folder = Path(run_dir)
        made = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        if made:
            log.info("run failed: removing its folder %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
            if run_dir is None:
                with contextlib.suppress(OSError):
                    folder.parent.rmdir()  # the group folder, when it held only this run
        raise


def run(pipeline, head_name: str, seed: int, run_dir: str | Path | None = None, *, task_cls: type | None = None,
        progress: bool = False, on_run_dir: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one head with one seed; write its run folder; return its metrics.

    ``run_dir``: the folder (default: a new one under ``train.runs_root``), made only after every
    check of :func:`setup` passed and removed again when the run fails (:func:`run_folder`);
    ``on_run_dir`` is called with it once made. ``task_cls``: default the task of ``train.task``.
    ``progress``: the epoch bar on a terminal."""
    from .runs import write_run

    started = time.perf_counter()
    cfg = pipeline.train
    task, model, schedule, device = setup(pipeline, head_name, seed, task_cls)
    with run_folder(pipeline, head_name, seed, run_dir) as folder:
        if on_run_dir is not None:
            on_run_dir(folder)
        log.info("head %s: %d parameters", head_name, count_parameters(model))
        result = fit(model, task, schedule, seed, progress=progress)
        metrics = run_metrics(task, model, result, head_name, seed, device, folder)
        metrics["wall_seconds"] = time.perf_counter() - started
        write_run(folder, pipeline, metrics, result.epochs, result.best_state,
                  checkpoint_meta(task, model, result, head_name, seed))
        title = f"{task.name} / {head_name} / {cfg.setting} — selection: {result.selection}"
        if result.protocol.is_reference:
            title += f"\n{result.protocol.label}"
        task.write_outputs(folder, title, model, result)
    return metrics


def run_metrics(task, model, result, head_name: str, seed: int, device: torch.device, run_dir: Path) -> dict[str, Any]:
    """metrics.json: the run's identity (task, head, seed, schedule, protocol, store, device,
    versions) and the task's own entries (``Task.metrics``: data counts, val/test figures)."""
    cfg = task.train_cfg
    own = task.metrics(model, result)
    s = result.schedule
    schedule_entry = {"lr": s.lr, "batch_size": s.batch_size, "epochs": s.epochs, "lr_step": s.lr_step,
                      "milestones": list(s.milestones) if s.milestones else None, "lr_gamma": s.lr_gamma,
                      "weight_decay": s.weight_decay, "grad_clip": s.grad_clip, "lr_step_unit": s.lr_step_unit,
                      "source": s.source,
                      **own.pop("schedule", {})}
    return {
        "task": task.name,
        "head": head_name,
        "head_config": model.config_dict(),
        "param_count": count_parameters(model),
        "setting": cfg.setting,
        "seed": seed,
        "selection": result.selection,
        "protocol": result.protocol.to_json(),
        "selection_metric": task.selection_metric,
        "selected_epoch": result.best_epoch,
        "epochs": s.epochs,
        "schedule": schedule_entry,
        **task.store_identity(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "train_seconds": result.train_seconds,
        "run_dir": str(run_dir),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **own,
    }


def checkpoint_meta(task, model, result, head_name: str, seed: int) -> dict[str, Any]:
    """What rebuilds the head from the checkpoint (:func:`train.checkpoint.build_head`) and how it
    was trained, plus the task's entries (``Task.checkpoint_meta``)."""
    cfg = task.train_cfg
    return {
        "task": task.name, "head": head_name, "head_config": model.config_dict(), "num_classes": task.num_classes,
        "setting": cfg.setting, "seed": seed, "selected_epoch": result.best_epoch, "protocol": result.protocol.label,
        **task.checkpoint_meta(),
    }


# ---------------------------------------------------------------------------------------------
# a finished run, evaluated again

#: the splits ``avel-train evaluate`` scores, and the ``train`` key naming each
SPLIT_KEYS = {"train": "train_split", "val": "val_split", "test": "test_split"}


def evaluate_run(run_dir: str | Path, split: str = "test", *, config: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, device: str | None = None) -> dict[str, Any]:
    """Score a finished run's checkpoint on ``split`` (``train``, ``val`` or ``test``: the split
    ``train.<split>_split`` of the run's configuration) through the run's task.

    The configuration is the run's own (:func:`train.runs.run_pipeline`: its store, splits, box
    folder...), or ``config`` when given, with ``overrides`` (e.g. ``{"store": {"path": ...}}``).
    The figures come from ``Task.evaluate`` and ``Task.split_metrics``, the two methods that gave
    the run's metrics.json, on the weights the run saved: ``<split>_accuracy`` equals metrics.json's
    (val: the selected epoch's). Returns ``{"run_dir", "task", "head", "split", "split_name",
    "store", "metrics": {<split>_accuracy: ..}}``."""
    from .checkpoint import CheckpointError, build_head
    from .registry import get_task
    from .runs import run_pipeline

    run_dir = Path(run_dir).resolve()
    checkpoint = run_dir / "checkpoint.safetensors"
    if not checkpoint.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint.safetensors there; give the folder of a finished "
                              "avel-train run (it holds config.yaml, metrics.json and checkpoint.safetensors)")
    if split not in SPLIT_KEYS:
        raise SetupError(f"split {split!r}: choose train, val or test")
    pipeline = run_pipeline(run_dir, config, overrides)
    cfg = pipeline.train
    if device is not None:
        cfg.device = device
    with _user_errors():
        dev = _environment(cfg)
        model, meta = build_head(checkpoint, dev)
        task_cls = get_task(meta.get("task") or cfg.task)  # the task that trained the checkpoint
        split_name = getattr(cfg, SPLIT_KEYS[split])
        task = task_cls.prepare(pipeline, dev)
        if split_name not in task.splits:
            raise SetupError(f"split {split_name!r} (train.{SPLIT_KEYS[split]}) is not in data.splits of the run's "
                             f"configuration ({', '.join(pipeline.data.splits) or 'none'})")
        task.attach(model)
    model.eval()
    evaluation = task.evaluate(model, split_name)
    return {"run_dir": str(run_dir), "task": task.name, "head": meta.get("head"), "split": split,
            "split_name": split_name, **task.store_identity(),
            "metrics": task.split_metrics(split, evaluation.result)}

