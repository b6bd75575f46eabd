"""The training loop of every task: seeds, Adam with step or milestone decay and optional gradient
clipping, per-epoch metrics (with the head's named loss terms), model selection.

One run = :func:`fit`: train for ``epochs`` epochs on the train split, evaluate the selection split
after every ``eval_every`` epochs, keep the weights of the best epoch in memory (highest selection
score; the earliest on ties), then evaluate validation and test ONCE with those weights. What is
trained on and how it is scored comes from a task: any object with the methods of
:class:`TrainingTask` (:class:`train.tasks.base.Task` and its subclasses avel, cml, sol). The loop
knows nothing of run folders, threads or configuration files: :mod:`train.runner` does.

Selection (``train.select_on``): ``val`` (default, honest), ``last`` (the final epoch) or ``test``
(only to compare with published numbers, which most public AVE code selects on test; results are
labelled :data:`TEST_SELECTION_LABEL` in metrics and outputs).

Batch order, evaluated epochs and the rule that replaces the kept epoch come from the run's
:class:`train.protocol.Protocol` (``train.protocol``: ``avel``, or ``reference`` = the head's
reference training script's).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import os
import random
import sys
import time
import typing
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from extract.core.progress import progress_bar

from .protocol import Protocol, resolve_protocol

log = logging.getLogger(__name__)

TEST_SELECTION_LABEL = "test (optimistic, not a fair estimate)"
SCHEDULE_KEYS = ("lr", "batch_size", "epochs", "lr_step", "milestones", "lr_gamma", "weight_decay", "grad_clip")
SCHEDULE_FALLBACK = {"lr": 1e-3, "batch_size": 64, "epochs": 300, "lr_step": None, "milestones": None,
                     "lr_gamma": 0.1, "weight_decay": 0.0, "grad_clip": None}
EVAL_BATCH = 256


class TrainingTask(typing.Protocol):
    """What :func:`fit` asks of a task (:class:`train.tasks.base.Task` documents each member).

    ``train_cfg``: the ``train`` section; ``splits``: the loaded splits by name; ``order``: the
    batch order (:class:`train.data.BatchOrder`, set by :func:`fit` from the protocol);
    ``input_arrays``: the store array each batch input is read from."""

    train_cfg: Any
    device: torch.device
    splits: Mapping[str, Any]
    order: Any
    input_arrays: Mapping[str, str]

    def train_batches(self, model, batch_size: int, generator: torch.Generator,
                      rng: np.random.Generator) -> Iterable[dict[str, Any]]: ...

    def batch_videos(self, batch: Mapping[str, Any]) -> list[str]: ...

    def batch_finite(self, batch: Mapping[str, Any]) -> bool | None: ...

    def loss(self, model, out, batch: Mapping[str, Any]) -> Any: ...

    def batch_accuracy(self, model, out, batch: Mapping[str, Any]) -> tuple[Any, int] | None: ...

    def prepare_evaluation(self, model) -> None: ...

    def evaluate(self, model, split_name: str) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Resolved optimiser schedule: TrainConfig value, else the head's ``train_defaults``, else
    :data:`SCHEDULE_FALLBACK`.

    The learning rate is multiplied by ``lr_gamma`` every ``lr_step`` epochs (StepLR), or at each
    epoch of ``milestones`` (MultiStepLR: after those epochs); neither = constant. ``grad_clip``:
    before every step the gradients are scaled to a global L2 norm of at most this
    (``clip_grad_norm_``, as the CMRAN/PSP/CMBS scripts do); None = no clipping.
    ``lr_step_unit``: "epoch" (StepLR stepped after every epoch), or "iteration" (set only by a
    reference protocol: the decay counts optimiser steps and is applied before each step, as
    AVE-ECCV18's ``scheduler.step(); optimizer.step()`` does)."""

    lr: float
    batch_size: int
    epochs: int
    lr_step: int | None
    lr_gamma: float
    weight_decay: float
    source: dict[str, str]
    milestones: tuple[int, ...] | None = None
    grad_clip: float | None = None
    lr_step_unit: str = "epoch"

    def describe(self) -> str:
        unit = lambda k: " iterations" if k == "lr_step" and self.lr_step_unit == "iteration" else ""  # noqa: E731
        parts = [f"{k}={getattr(self, k)}{unit(k)} ({self.source[k]})" for k in SCHEDULE_KEYS]
        return "schedule: " + ", ".join(parts)


def resolve_schedule(train_cfg, head_cls) -> Schedule:
    """TrainConfig ``null`` fields take the head's defaults for the setting:
    ``head_cls.<setting>_train_defaults`` (e.g. ``weak_train_defaults``) if the head has one, else
    ``head_cls.train_defaults``. With ``train.protocol: reference`` the reference protocol's
    ``schedule`` entries come before the head's defaults (config values still win)."""
    setting = getattr(train_cfg, "setting", "supervised")
    per_setting = getattr(head_cls, f"{setting}_train_defaults", None)
    defaults = dict(per_setting or getattr(head_cls, "train_defaults", {}) or {})
    from_protocol = dict(resolve_protocol(train_cfg, head_cls).schedule)
    unit = from_protocol.pop("lr_step_unit", "epoch")
    values, source = {}, {}
    for key in SCHEDULE_KEYS:
        given = getattr(train_cfg, key, None)
        if given is not None:
            values[key], source[key] = given, "config"
        elif from_protocol.get(key) is not None:
            values[key], source[key] = from_protocol[key], "reference protocol"
        elif defaults.get(key) is not None:
            values[key], source[key] = defaults[key], f"{head_cls.name} default"
        else:
            values[key], source[key] = SCHEDULE_FALLBACK[key], "fallback"
    if values["lr_gamma"] is None:
        values["lr_gamma"] = SCHEDULE_FALLBACK["lr_gamma"]
    if values["epochs"] < 1 or values["batch_size"] < 1 or values["lr"] <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {values}")
    lr_step = None if values["lr_step"] in (None, 0) else int(values["lr_step"])
    milestones = tuple(int(m) for m in values["milestones"] or ()) or None
    if milestones is not None:
        if list(milestones) != sorted(set(milestones)) or milestones[0] < 1:
            raise ValueError(f"milestones must be increasing epoch numbers >= 1, got {list(milestones)}")
        if lr_step is not None:
            if source["milestones"] == source["lr_step"]:
                raise ValueError(f"set either lr_step ({lr_step}) or milestones ({list(milestones)}), not both")
            # the one given in the config wins over the head's default
            if source["lr_step"] == "config":
                milestones, source["milestones"] = None, "config (lr_step given)"
            else:
                lr_step, source["lr_step"] = None, "config (milestones given)"
    grad_clip = None if values["grad_clip"] in (None, 0) else float(values["grad_clip"])
    if grad_clip is not None and grad_clip < 0:
        raise ValueError(f"grad_clip must be > 0 (0 or null = off), got {grad_clip}")
    return Schedule(
        lr=float(values["lr"]), batch_size=int(values["batch_size"]), epochs=int(values["epochs"]),
        lr_step=lr_step, lr_gamma=float(values["lr_gamma"]), weight_decay=float(values["weight_decay"]),
        source=source, milestones=milestones, grad_clip=grad_clip,
        lr_step_unit=unit if lr_step is not None and source["lr_step"] == "reference protocol" else "epoch",
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
    """Adam (the optimiser of every AVEL reference) and a per-epoch StepLR or MultiStepLR (or None).

    On a GPU, Adam runs fused (one kernel per step for all parameters, equal to the default
    implementation to float rounding), which also lets :class:`StepGuard` skip a step on the
    device; on a CPU it is torch's default implementation, bit for bit as before. A step decay
    counted in iterations (``lr_step_unit``) is applied by the optimiser itself
    (:func:`step_decay_per_iteration`) and no per-epoch scheduler is returned."""
    on_gpu = any(p.device.type == "cuda" for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay,
                                 **({"fused": True} if on_gpu else {}))
    scheduler = None
    if schedule.lr_step and schedule.lr_step_unit == "iteration" and not schedule.milestones:
        step_decay_per_iteration(optimizer, schedule.lr_step, schedule.lr_gamma)
    elif schedule.milestones:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule.milestones),
                                                         gamma=schedule.lr_gamma)
    elif schedule.lr_step:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.lr_step, gamma=schedule.lr_gamma)
    return optimizer, scheduler


def step_decay_per_iteration(optimizer: torch.optim.Optimizer, step_size: int, gamma: float) -> None:
    """Before the k-th optimiser step (k = 1, 2, ...) set every group's lr to
    ``initial lr * gamma ** (k // step_size)``: what ``StepLR(step_size)`` gives when its ``step()``
    is called right BEFORE each ``optimizer.step()`` (AVE-ECCV18 supervised_main.py:107-108), so
    the decayed lr is used from the ``step_size``-th step on. An optimiser step pre-hook: the
    training loop itself is not involved."""
    initial = [group["lr"] for group in optimizer.param_groups]
    steps = [0]

    def before_step(opt, args, kwargs) -> None:
        steps[0] += 1
        for group, lr in zip(opt.param_groups, initial):
            group["lr"] = lr * gamma ** (steps[0] // step_size)

    optimizer.register_step_pre_hook(before_step)


class NonFiniteError(ValueError):
    """A training batch holds a NaN or an infinity, or a loss is not finite. The message (one line)
    names the epoch, the batch (its index in the epoch and its videos) and the array at fault."""


def _videos_text(videos: list[str], limit: int = 8) -> str:
    if not videos:
        return "videos unknown"
    more = f" and {len(videos) - limit} more" if len(videos) > limit else ""
    return "videos " + ", ".join(videos[:limit]) + more


def check_batch_finite(task: "TrainingTask", batch: dict[str, Any], epoch: int, index: int) -> None:
    """Raise :class:`NonFiniteError` when a floating-point tensor of ``batch`` holds NaN or inf.

    The message names the epoch, the batch index, the videos whose rows are not finite (from
    ``task.batch_videos``) and the input: the batch key and the store array
    it was read from (``task.input_arrays``)."""
    for name, value in batch.items():
        if not (torch.is_tensor(value) and value.is_floating_point()) or value.numel() == 0:
            continue
        finite = torch.isfinite(value)
        if bool(finite.all()):
            continue
        bad_rows = (~finite).reshape(finite.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        videos = task.batch_videos(batch)
        named = [videos[i] for i in bad_rows if i < len(videos)]
        kinds = []
        if bool(torch.isnan(value).any()):
            kinds.append("NaN")
        if bool(torch.isinf(value).any()):
            kinds.append("inf")
        source = task.input_arrays.get(name)
        array = f"input {name!r} (store array {source!r})" if source and source != name else f"input {name!r}"
        raise NonFiniteError(
            f"epoch {epoch}, batch {index} ({_videos_text(videos)}): {array} holds {'/'.join(kinds)} "
            f"in {len(bad_rows)} of {value.shape[0]} rows ({_videos_text(named)}); nothing is trained on "
            "non-finite numbers: re-extract those videos or remove them from the manifests"
        )


def loss_error(task: "TrainingTask", value: float, batch: dict[str, Any], epoch: int, index: int) -> NonFiniteError:
    """The :class:`NonFiniteError` of a batch whose loss is ``value`` (NaN or inf) although its
    inputs were finite."""
    return NonFiniteError(
        f"epoch {epoch}, batch {index} ({_videos_text(task.batch_videos(batch))}): the training loss is {value} "
        "although every input of the batch is finite: the run diverged (try a lower --lr) or the head "
        "computes a non-finite value; the weights were not updated from it"
    )


class StepGuard:
    """Optimiser steps that never learn from a non-finite loss, decided on the device (no host
    synchronisation per step).

    :meth:`observe` folds each batch's loss into an on-device flag ``healthy`` (every loss of the
    epoch so far finite) and remembers the first bad batch and its loss; :meth:`step` steps the
    optimiser only while ``healthy``: a fused optimiser skips the step itself (``found_inf``, as
    for mixed precision: parameters and moments untouched), any other one steps and the parameters
    are put back to their values before the step. After the first non-finite loss of an epoch the
    weights therefore stay those of the last finite batch; :func:`train_epoch` reads the flags with
    its epoch sums (:meth:`tensors`) and raises at the end of the epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device | str):
        self.optimizer = optimizer
        self.healthy = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.fused = bool(optimizer.defaults.get("fused"))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.saved = None if self.fused else [torch.empty_like(p) for p in self.params]

    def observe(self, loss: torch.Tensor, index: int) -> None:
        value = loss.detach()
        ok = torch.isfinite(value)
        first = self.healthy & ~ok
        self.first_bad = torch.where(first, index, self.first_bad)
        self.bad_loss = torch.where(first, value.double(), self.bad_loss)
        self.healthy = self.healthy & ok

    @torch.no_grad()
    def step(self) -> None:
        if self.fused:
            self.optimizer.found_inf = (~self.healthy).float()
            self.optimizer.step()
            return
        torch._foreach_copy_(self.saved, self.params)
        self.optimizer.step()
        for param, saved in zip(self.params, self.saved):
            param.copy_(torch.where(self.healthy, param, saved))

    def close(self) -> None:
        if self.fused and hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf

    def tensors(self) -> list[torch.Tensor]:
        """``healthy``, the first bad batch index and its loss as float64 (for one transfer)."""
        return [self.healthy.double(), self.first_bad.double(), self.bad_loss]


def train_epoch(model, optimizer, task: "TrainingTask", batch_size: int, generator: torch.Generator,
                rng: np.random.Generator, epoch: int = 1, grad_clip: float | None = None) -> dict[str, float]:
    """One Adam step per batch of ``task.train_batches`` (model in train mode); with ``grad_clip``
    the gradients are first scaled to a global L2 norm of at most that value.

    Nothing in the epoch waits for the device: losses, loss terms, training hits and clipped steps
    are summed on the device and read back once, at the end of the epoch.

    Nothing is trained on non-finite numbers. A batch whose input holds NaN or inf (the task says
    so from the host, :meth:`~train.tasks.base.Task.batch_finite`: its inputs are checked once when
    they are loaded) raises :class:`NonFiniteError` (:func:`check_batch_finite`) before the
    optimiser steps. A non-finite loss is caught on the device (:class:`StepGuard`): from that
    batch on no step changes the weights, and at the end of the epoch :class:`NonFiniteError`
    names the epoch, the batch and its videos (the batch is drawn again from the epoch's
    generator states).

    Returns the epoch-row entries ``train_loss`` (mean loss per batch element, a batch having
    ``batch["audio"].shape[0]`` elements), ``train_<term>`` for each named term of the head's loss
    (:func:`train.heads.base.split_loss`, same weighting), ``clipped_steps`` (share of steps whose
    gradient norm exceeded ``grad_clip``, when clipping) and, for tasks whose
    :meth:`~train.tasks.base.Task.batch_accuracy` counts hits, ``train_accuracy`` (of the training
    predictions, taken before each step)."""
    from .heads.base import split_loss

    model.train()
    device = task.device
    replay = _generator_copy(generator), copy.deepcopy(rng)  # to draw a failing batch again
    zero = functools.partial(torch.zeros, (), dtype=torch.float64, device=device)
    loss_sum, correct, clipped = zero(), zero(), zero()
    term_sums: dict[str, torch.Tensor] = {}
    count, total, steps, counted = 0, 0, 0, False
    guard = StepGuard(optimizer, device)
    try:
        for index, batch in enumerate(task.train_batches(model, batch_size, generator, rng)):
            if not task.batch_finite(batch):  # None (the task cannot tell from the host) or False
                check_batch_finite(task, batch, epoch, index)
            out = model(batch["audio"], batch["visual"])
            loss, terms = split_loss(task.loss(model, out, batch))
            guard.observe(loss, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                clipped += norm > grad_clip
            guard.step()
            steps += 1
            n = int(batch["audio"].shape[0])
            loss_sum += loss.detach().double() * n
            for name, term in terms.items():
                term_sums[name] = term_sums.get(name, zero()) + term.detach().double() * n
            count += n
            hits = task.batch_accuracy(model, out, batch)
            if hits is not None:
                counted = True
                correct += hits[0]
                total += int(hits[1])
    finally:
        guard.close()
    # the one synchronisation of the epoch
    values = torch.stack([loss_sum, correct, clipped, *guard.tensors(), *term_sums.values()]).tolist()
    loss_total, hit_total, clip_total, healthy, first_bad, bad_loss = values[:6]
    if not healthy:
        batch = _batch_at(task, model, batch_size, replay, int(first_bad))
        raise loss_error(task, bad_loss, batch, epoch, int(first_bad))
    row = {"train_loss": loss_total / max(count, 1)}
    row.update({f"train_{name}": value / max(count, 1) for name, value in zip(term_sums, values[6:])})
    if grad_clip is not None:
        row["clipped_steps"] = clip_total / max(steps, 1)
    if counted:
        row["train_accuracy"] = hit_total / max(total, 1)
    return row


def _generator_copy(generator: torch.Generator) -> torch.Generator:
    copy_ = torch.Generator(device=generator.device)
    copy_.set_state(generator.get_state())
    return copy_


def _batch_at(task: "TrainingTask", model, batch_size: int, replay: tuple[torch.Generator, np.random.Generator],
              index: int) -> dict[str, Any]:
    """Batch ``index`` of an epoch, drawn again from copies of the generators as they were when
    the epoch began (only when a batch must be named in an error)."""
    generator, rng = replay
    for i, batch in enumerate(task.train_batches(model, batch_size, generator, rng)):
        if i == index:
            return batch
    return {}


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (kept in memory for the best epoch)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns. ``epochs`` = one dict per epoch (the rows of epochs.csv);
    ``results`` = the task's evaluation result (``Evaluation.result``) per role "val" / "test"."""

    schedule: Schedule
    selection: str
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    epochs: list[dict[str, Any]]
    results: dict[str, Any]
    train_seconds: float
    #: the batch order / evaluation / selection protocol followed (:mod:`train.protocol`)
    protocol: Protocol = dataclasses.field(default_factory=Protocol)


def selection_label(select_on: str) -> str:
    return TEST_SELECTION_LABEL if select_on == "test" else select_on


def fit(
    model,
    task: "TrainingTask",
    schedule: Schedule,
    seed: int,
    *,
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    protocol: Protocol | None = None,
) -> FitResult:
    """Train ``model`` on the task's train split, select an epoch, evaluate val/test once.

    The loop owns the epochs, the optimiser and its schedule, the selection (by default
    ``train.select_on`` of ``task.train_cfg``: the epoch whose evaluation scores highest on the
    selection split, the earliest on ties; or the last epoch), the best weights, timing and
    logging; the task supplies the batches, the loss and the evaluation
    (:class:`train.tasks.base.Task`). ``protocol`` (default: :func:`train.protocol.resolve_protocol`
    of the task's ``train`` section and the head) decides the batch order (``task.order``), the
    selection split, the evaluated epochs and the replacement rule of the kept epoch.

    ``progress``: a tqdm bar over the epochs when stderr is a terminal. Without a bar (off, or a
    log file on a cluster) every evaluated epoch writes one INFO log line (epoch, losses, the
    selection split's metrics, seconds), so a long run is never silent.
    """
    from .data import BatchOrder

    cfg = task.train_cfg
    protocol = resolve_protocol(cfg, type(model)) if protocol is None else protocol
    check_protocol_epochs(protocol, schedule.epochs)
    task.order = BatchOrder(protocol.shuffle, protocol.drop_last)
    generator = seed_everything(seed, task.device)
    rng = np.random.default_rng(seed)  # store-side draws (task sol: one second per video)
    select_on = protocol.select_on
    select_name = {"val": cfg.val_split, "test": cfg.test_split}.get(select_on)
    if select_name is not None and select_name not in task.splits:
        raise ValueError(f"select_on={select_on!r} needs the split {select_name!r}, which is not loaded")
    optimizer, scheduler = make_optimizer(model, schedule)
    log.info("%s; selection on %s", schedule.describe(), selection_label(select_on))
    log.info("%s", protocol.describe())
    best_score, best_epoch, best_state, rows = float("-inf"), 0, state_copy(model), []
    started = time.perf_counter()
    terminal = progress and sys.stderr.isatty()
    bar = progress_bar(schedule.epochs, terminal, "train", unit="epoch")
    for epoch in range(1, schedule.epochs + 1):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        start_epoch = getattr(model, "start_epoch", None)
        if start_epoch is not None:
            start_epoch(epoch, schedule.epochs)
        row.update(train_epoch(model, optimizer, task, schedule.batch_size, generator, rng, epoch, schedule.grad_clip))
        if scheduler is not None:
            scheduler.step()
        evaluate_now = select_name is not None and protocol.evaluates(epoch, schedule.epochs)
        if evaluate_now:
            task.prepare_evaluation(model)
            sel = task.evaluate(model, select_name)
            check_evaluation_finite(sel, select_name, epoch)
            row.update({f"{select_name}_{key}": value for key, value in sel.columns.items()})
            if protocol.replaces(sel.score, best_score):
                best_score, best_epoch, best_state = sel.score, epoch, state_copy(model)
        if select_on == "last":
            best_epoch = epoch
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        bar.set_postfix(refresh=False, **{k: f"{v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "lr"})
        bar.update(1)
        if not terminal and (evaluate_now or select_name is None):
            log.info("epoch %d/%d: %s", epoch, schedule.epochs, epoch_line(row))
        if on_epoch is not None:
            on_epoch(row)
    bar.close()
    if select_on == "last":
        task.prepare_evaluation(model)
        best_state = state_copy(model)
    else:
        model.load_state_dict(best_state)
    train_seconds = time.perf_counter() - started
    results = {}
    for role in ("val", "test"):
        name = getattr(cfg, f"{role}_split")
        if name in task.splits:
            results[role] = task.evaluate(model, name).result
    return FitResult(schedule, selection_label(select_on), best_epoch, best_state, rows, results, train_seconds, protocol)


def check_protocol_epochs(protocol: Protocol, epochs: int) -> None:
    """ValueError when a run of ``epochs`` epochs would never evaluate its selection split under
    ``protocol`` (e.g. a reference protocol whose first evaluation is after epoch 6)."""
    if protocol.select_on != "last" and not protocol.evaluated_epochs(epochs):
        raise ValueError(f"{protocol.label} evaluates {protocol.select_on} first after epoch {protocol.eval_first}: "
                         f"a run of {epochs} epochs would select nothing; train at least {protocol.eval_first} epochs")


def check_evaluation_finite(evaluation, split_name: str, epoch: int) -> None:
    """Raise :class:`NonFiniteError` when the selection score or the loss of an evaluation is not
    finite (a non-finite feature of that split, or weights that diverged)."""
    bad = {k: v for k, v in {"score": evaluation.score, **evaluation.columns}.items()
           if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteError(
            f"epoch {epoch}: evaluating split {split_name!r} gave non-finite "
            f"{', '.join(f'{k}={v}' for k, v in bad.items())}; a video of that split may have non-finite "
            "features, or the weights diverged"
        )


def epoch_line(row: dict[str, Any]) -> str:
    """``train_loss=0.4121, val_loss=0.52, val_accuracy=0.7312, seconds=3.2`` (the float entries)."""
    return ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "lr")


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters (the figure of metrics.json and the head docstrings)."""
    from extract.core.devices import count_parameters as count

    return count(model, trainable_only=True)
