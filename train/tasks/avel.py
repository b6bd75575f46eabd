"""Task "avel": audio-visual event localization (Tian et al., ECCV 2018) on a feature store.

``run(pipeline, head_name, seed, run_dir)`` loads the store + splits (once per process, cached),
builds the head, trains it (:func:`train.loop.fit`), and writes the run directory: config.yaml,
metrics.json, epochs.csv, checkpoint.safetensors, learning_curves.png, confusion_test.png,
timeline_test.png. Returns the metrics dict.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..data import TaskData, load_from_pipeline, resolve_device
from ..evaluate import EvalResult
from ..loop import FitResult, count_parameters, fit, resolve_schedule, seed_everything
from ..registry import register_task
from ..runs import head_class_and_config, splits_to_load, write_run

log = logging.getLogger(__name__)

TASK = "avel"


def build_head(pipeline, head_name: str, num_classes: int, device: torch.device):
    """The registered head ``head_name`` with its ``heads.<name>`` overrides applied."""
    head_cls, config = head_class_and_config(pipeline, head_name, TASK)
    return head_cls(num_classes=num_classes, setting=pipeline.train.setting, config=config).to(device)


@register_task(TASK)
def run(pipeline, head_name: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train and evaluate one head with one seed; write ``run_dir``; return the metrics."""
    started = time.perf_counter()
    cfg = pipeline.train
    device = resolve_device(cfg.device)
    data = load_from_pipeline(pipeline, splits_to_load(pipeline), device)
    seed_everything(seed, device)
    model = build_head(pipeline, head_name, data.num_classes, device)
    schedule = resolve_schedule(cfg, type(model))
    log.info("head %s: %d parameters", head_name, count_parameters(model))
    result = fit(model, data, cfg, schedule, seed)
    metrics = build_metrics(pipeline, head_name, seed, model, data, result, device, Path(run_dir))
    metrics["wall_seconds"] = time.perf_counter() - started
    checkpoint_meta = {
        "task": TASK, "head": head_name, "head_config": model.config_dict(), "num_classes": data.num_classes,
        "setting": cfg.setting, "class_names": data.class_names, "seed": seed, "selected_epoch": result.best_epoch,
    }
    write_run(run_dir, pipeline, metrics, result.epochs, result.best_state, checkpoint_meta)
    write_plots(Path(run_dir), pipeline, head_name, data, result)
    return metrics


def build_metrics(pipeline, head_name: str, seed: int, model, data: TaskData, result: FitResult, device, run_dir: Path) -> dict[str, Any]:
    """metrics.json: identity of the run, the selection, and val/test metrics of the selected weights."""
    cfg = pipeline.train
    s = result.schedule
    metrics: dict[str, Any] = {
        "task": TASK,
        "head": head_name,
        "head_config": model.config_dict(),
        "param_count": count_parameters(model),
        "setting": cfg.setting,
        # the pooling the head's weak loss really applies (heads whose paper fixes it ignore train.weak_pool)
        "weak_pool": model.weak_pooling(cfg.weak_pool) if cfg.setting == "weak" else None,
        "seed": seed,
        "selection": result.selection,
        "selected_epoch": result.best_epoch,
        "epochs": s.epochs,
        "schedule": {"lr": s.lr, "batch_size": s.batch_size, "epochs": s.epochs, "lr_step": s.lr_step,
                     "lr_gamma": s.lr_gamma, "weight_decay": s.weight_decay, "source": s.source},
        "store": str(data.bank.store_path),
        "store_fingerprint": data.bank.fingerprint,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "samples": {name: len(split) for name, split in data.splits.items()},
        "skipped_samples": {name: len(split.skipped) for name, split in data.splits.items()},
        # segments without real features (video shorter than T s); they still count in accuracy
        "invalid_segments": {name: int((~split.valid).sum()) for name, split in data.splits.items()},
        "device": str(device),
        "train_seconds": result.train_seconds,
        "run_dir": str(run_dir),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    for role in ("val", "test"):
        res: EvalResult | None = result.results.get(role)
        metrics[f"{role}_accuracy"] = res.accuracy if res is not None else None
        if res is not None:
            metrics[role] = res.to_json(data.class_names)
    return metrics


def write_plots(run_dir: Path, pipeline, head_name: str, data: TaskData, result: FitResult) -> None:
    """learning_curves.png, confusion_test.png, timeline_test.png."""
    from .. import plots

    cfg = pipeline.train
    title = f"{TASK} / {head_name} / {cfg.setting} — selection: {result.selection}"
    plots.plot_learning_curves(result.epochs, run_dir / "learning_curves.png", title, result.best_epoch)
    test = result.results.get("test")
    if test is None:
        return
    names = data.class_names
    plots.plot_confusion(test.confusion, names, run_dir / "confusion_test.png", f"{title}\ntest accuracy {test.accuracy:.4f}")
    split = data.splits[cfg.test_split]
    labels = split.labels.cpu().numpy()
    chosen = plots.choose_timeline_samples(labels, data.num_classes - 1, cfg.timeline_videos)
    if chosen:
        sample_names = [f"{sid} ({key})" for sid, key in zip(split.sample_ids, _keys(split))]
        plots.plot_timelines(test.predictions, labels, sample_names, names, run_dir / "timeline_test.png", chosen, title)


def _keys(split) -> list[str]:
    by_id = {s.sample_id: s.key for s in split.manifest.samples}
    return [by_id[sid] for sid in split.sample_ids]
