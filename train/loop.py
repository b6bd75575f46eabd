"""The training loop: seeds, Adam with step decay, per-epoch metrics, model selection.

One run = :func:`fit`: train for ``epochs`` epochs on the train split, evaluate the selection split
after every ``eval_every`` epochs, keep the weights of the best epoch in memory (highest selection
accuracy; the earliest on ties), then evaluate validation and test ONCE with those weights.

Selection (``train.select_on``): ``val`` (default, honest), ``last`` (the final epoch) or ``test``
(only to compare with published numbers, which most public AVE code selects on test; results are
labelled :data:`TEST_SELECTION_LABEL` in metrics and outputs).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from typing import Any, Callable

import numpy as np
import torch

from .data import FeatureBank, SplitData, TaskData, iterate_batches
from .evaluate import EvalResult, evaluate_split

log = logging.getLogger(__name__)

TEST_SELECTION_LABEL = "test (optimistic, not a fair estimate)"
SCHEDULE_KEYS = ("lr", "batch_size", "epochs", "lr_step", "lr_gamma", "weight_decay")
SCHEDULE_FALLBACK = {"lr": 1e-3, "batch_size": 64, "epochs": 300, "lr_step": None, "lr_gamma": 0.1, "weight_decay": 0.0}
EVAL_BATCH = 256

#: the CLI turns the epoch progress bar on (library default: off)
SHOW_PROGRESS = False


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Resolved optimiser schedule: TrainConfig value, else the head's ``train_defaults``, else
    :data:`SCHEDULE_FALLBACK`. ``lr_step=None`` means no decay."""

    lr: float
    batch_size: int
    epochs: int
    lr_step: int | None
    lr_gamma: float
    weight_decay: float
    source: dict[str, str]

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)} ({self.source[k]})" for k in SCHEDULE_KEYS]
        return "schedule: " + ", ".join(parts)


def resolve_schedule(train_cfg, head_cls) -> Schedule:
    """TrainConfig ``null`` fields take the head's defaults for the setting:
    ``head_cls.<setting>_train_defaults`` (e.g. ``weak_train_defaults``) if the head has one, else
    ``head_cls.train_defaults``."""
    setting = getattr(train_cfg, "setting", "supervised")
    per_setting = getattr(head_cls, f"{setting}_train_defaults", None)
    defaults = dict(per_setting or getattr(head_cls, "train_defaults", {}) or {})
    values, source = {}, {}
    for key in SCHEDULE_KEYS:
        given = getattr(train_cfg, key, None)
        if given is not None:
            values[key], source[key] = given, "config"
        elif defaults.get(key) is not None:
            values[key], source[key] = defaults[key], f"{head_cls.name} default"
        else:
            values[key], source[key] = SCHEDULE_FALLBACK[key], "fallback"
    if values["lr_gamma"] is None:
        values["lr_gamma"] = SCHEDULE_FALLBACK["lr_gamma"]
    if values["epochs"] < 1 or values["batch_size"] < 1 or values["lr"] <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {values}")
    return Schedule(
        lr=float(values["lr"]), batch_size=int(values["batch_size"]), epochs=int(values["epochs"]),
        lr_step=None if values["lr_step"] in (None, 0) else int(values["lr_step"]),
        lr_gamma=float(values["lr_gamma"]), weight_decay=float(values["weight_decay"]), source=source,
    )


def seed_everything(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Seed python, numpy and torch (CPU and CUDA); on CUDA also ask for deterministic kernels
    (CPU kernels are deterministic already). Returns a CPU generator for the batch order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def make_optimizer(model: torch.nn.Module, schedule: Schedule) -> tuple[torch.optim.Optimizer, Any]:
    """Adam (the AVEL papers' optimiser) and a per-epoch StepLR (or None)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = None
    if schedule.lr_step:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.lr_step, gamma=schedule.lr_gamma)
    return optimizer, scheduler


def train_one_epoch(model, optimizer, bank: FeatureBank, split: SplitData, batch_size: int, generator: torch.Generator, weak_pool: str = "mean") -> tuple[float, float]:
    """One pass over the shuffled train split. Returns (mean loss per sample, segment accuracy of
    the training predictions, taken before each step)."""
    model.train()
    loss_sum, correct, segments = 0.0, 0, 0
    for batch in iterate_batches(bank, split, batch_size, shuffle=True, generator=generator):
        out = model(batch["audio"], batch["visual"])
        loss = model.loss(out, batch, weak_pool)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(batch["index"])
        loss_sum += float(loss.detach()) * n
        with torch.no_grad():
            correct += int((model.predict(out) == batch["labels"]).sum())
        segments += batch["labels"].numel()
    return loss_sum / max(len(split), 1), correct / max(segments, 1)


def optimize_batches(model, optimizer, batches, count_key: str) -> float:
    """One Adam step per batch of ``batches`` (dicts with ``audio``, ``visual`` and the targets
    of ``model.loss``), model in train mode; the mean loss per batch element, where a batch has
    ``batch[count_key].shape[0]`` elements."""
    model.train()
    total, count = 0.0, 0
    for batch in batches:
        out = model(batch["audio"], batch["visual"])
        loss = model.loss(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int(batch[count_key].shape[0])
        total += float(loss.detach()) * n
        count += n
    return total / max(count, 1)


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (kept in memory for the best epoch)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns. ``epochs`` = one dict per epoch (the rows of epochs.csv)."""

    schedule: Schedule
    selection: str
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    epochs: list[dict[str, Any]]
    results: dict[str, EvalResult]
    train_seconds: float


def selection_label(select_on: str) -> str:
    return TEST_SELECTION_LABEL if select_on == "test" else select_on


def fit(
    model,
    data: TaskData,
    train_cfg,
    schedule: Schedule,
    seed: int,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``data.splits[train_split]``, select an epoch, evaluate val/test once.

    Splits used: ``train_cfg.train_split``, ``test_split`` and ``val_split`` when present in
    ``data.splits``. ``select_on`` = "val" needs the val split.
    """
    generator = seed_everything(seed, data.bank.device)
    bank, C, pool = data.bank, data.num_classes, train_cfg.weak_pool
    train_split = data.splits[train_cfg.train_split]
    select_on = train_cfg.select_on
    select_name = {"val": train_cfg.val_split, "test": train_cfg.test_split}.get(select_on)
    if select_name is not None and select_name not in data.splits:
        raise ValueError(f"select_on={select_on!r} needs the split {select_name!r}, which is not loaded")
    optimizer, scheduler = make_optimizer(model, schedule)
    log.info("%s; selection on %s", schedule.describe(), selection_label(select_on))
    best_acc, best_epoch, best_state, rows = -1.0, 0, state_copy(model), []
    started = time.perf_counter()
    bar = _progress(schedule.epochs)
    for epoch in range(1, schedule.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(model, optimizer, bank, train_split, schedule.batch_size, generator, pool)
        if scheduler is not None:
            scheduler.step()
        row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc}
        evaluate_now = select_name is not None and (epoch % train_cfg.eval_every == 0 or epoch == schedule.epochs)
        if evaluate_now:
            sel = evaluate_split(model, bank, data.splits[select_name], C, EVAL_BATCH, pool)
            row.update({f"{select_name}_loss": sel.loss, f"{select_name}_accuracy": sel.accuracy})
            if sel.accuracy > best_acc:
                best_acc, best_epoch, best_state = sel.accuracy, epoch, state_copy(model)
        if select_on == "last":
            best_epoch = epoch
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        _advance(bar, row, select_name)
        if on_epoch is not None:
            on_epoch(row)
    if bar is not None:
        bar.close()
    if select_on != "last":
        model.load_state_dict(best_state)
    else:
        best_state = state_copy(model)
    train_seconds = time.perf_counter() - started
    results = final_evaluation(model, data, train_cfg)
    return FitResult(schedule, selection_label(select_on), best_epoch, best_state, rows, results, train_seconds)


def final_evaluation(model, data: TaskData, train_cfg) -> dict[str, EvalResult]:
    """Evaluate the selected weights once on val (if loaded) and test."""
    out = {}
    for role in ("val", "test"):
        name = getattr(train_cfg, f"{role}_split")
        if name in data.splits:
            out[role] = evaluate_split(model, data.bank, data.splits[name], data.num_classes, EVAL_BATCH, train_cfg.weak_pool)
    return out


def _progress(total: int):
    if not SHOW_PROGRESS:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="epoch", desc="train", dynamic_ncols=True)


def _advance(bar, row: dict[str, Any], select_name: str | None) -> None:
    if bar is None:
        return
    post = {"loss": f"{row['train_loss']:.4f}", "train_acc": f"{row['train_accuracy']:.3f}"}
    if select_name and f"{select_name}_accuracy" in row:
        post[f"{select_name}_acc"] = f"{row[f'{select_name}_accuracy']:.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
