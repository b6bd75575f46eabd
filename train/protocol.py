"""Training protocols: the batch order of every epoch, which epochs are evaluated and which one is kept.

:func:`train.loop.fit` follows one :class:`Protocol`, resolved from ``train.protocol``
(:func:`resolve_protocol`):

- ``avel`` (default): a new random order of the training split every epoch (``train.shuffle``;
  false = the manifest's order every epoch), every sample used every epoch (the last batch may be
  smaller), the selection split (``train.select_on``) evaluated every ``train.eval_every`` epochs
  and after the last one, the earliest best epoch kept.
- ``reference``: the protocol of the head's reference training script as recorded in the head's
  ``reference_protocols`` (one per setting): its batch order (one fixed order, or a new permutation
  every epoch), whether it drops the last partial batch, the split it selects on, the epochs it
  evaluates, its rule for replacing the kept epoch, and schedule details that the head's
  ``train_defaults`` cannot say (a learning-rate step counted in optimiser steps). ``train.shuffle``,
  ``train.select_on`` and ``train.eval_every`` are then not used. Every output of such a run says
  so: metrics.json (``protocol``), the learning-curve title, the printed results table and the run
  folder (``<task>-<head>-<setting>-reference``).

What a reference protocol cannot reproduce is listed in its ``notes`` (e.g. a script that trains in
float64, or draws its permutation from Python's ``random``); the measured effect of each difference
is in docs/training.md and tests/test_training_parity.py.

Imports nothing heavy (no torch).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

#: the values of ``train.protocol``
PROTOCOLS = ("avel", "reference")

#: how a newly evaluated epoch replaces the kept one
KEEP_RULES = ("better", "better_or_equal", "positive")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Batch order, evaluation cadence and selection of one training run.

    ``shuffle``: a new permutation of the training split every epoch (drawn from the run's
    generator), else the split's (manifest) order every epoch. ``drop_last``: the last batch of an
    epoch is left out when it is smaller than the batch size (``len // batch_size`` batches).
    ``select_on``: "val", "test" or "last". Epoch ``e`` (1-based) of ``E`` is evaluated when
    ``e >= eval_first`` and ``(e - eval_first) % eval_every == 0``, or ``eval_last`` and ``e == E``.
    ``keep``: an evaluated epoch replaces the kept one when its score is ``better`` (strictly
    higher: the earliest best epoch is kept), ``better_or_equal`` (the latest best) or
    ``positive`` (above 0: the latest evaluated epoch, for a script whose best score is never
    updated). ``schedule``: schedule values of the reference script that override the head's
    ``train_defaults`` (config values still win), e.g. ``{"lr_step": 15000, "lr_step_unit":
    "iteration"}``. ``script``: the reference script (repository and file); ``notes``: what of it is
    not reproduced."""

    name: Literal["avel", "reference"] = "avel"
    script: str = ""
    shuffle: bool = True
    drop_last: bool = False
    select_on: Literal["val", "test", "last"] = "val"
    eval_first: int = 1
    eval_every: int = 1
    eval_last: bool = True
    keep: Literal["better", "better_or_equal", "positive"] = "better"
    schedule: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.name!r}")
        if self.eval_first < 1 or self.eval_every < 1:
            raise ValueError(f"eval_first and eval_every must be >= 1, got {self.eval_first} and {self.eval_every}")
        if self.keep not in KEEP_RULES:
            raise ValueError(f"keep must be one of {KEEP_RULES}, got {self.keep!r}")

    @property
    def is_reference(self) -> bool:
        return self.name == "reference"

    @property
    def label(self) -> str:
        """``avel`` or ``reference protocol (<script>)``: how outputs name the protocol."""
        return f"reference protocol ({self.script})" if self.is_reference else "avel"

    def evaluates(self, epoch: int, epochs: int) -> bool:
        """Whether epoch ``epoch`` (1-based) of ``epochs`` is evaluated on the selection split."""
        on_cadence = epoch >= self.eval_first and (epoch - self.eval_first) % self.eval_every == 0
        return on_cadence or (self.eval_last and epoch == epochs)

    def evaluated_epochs(self, epochs: int) -> list[int]:
        return [e for e in range(1, epochs + 1) if self.evaluates(e, epochs)]

    def replaces(self, score: float, kept: float) -> bool:
        """Whether an evaluated epoch scoring ``score`` replaces the kept one (score ``kept``;
        -inf before the first evaluation)."""
        if self.keep == "better":
            return score > kept
        if self.keep == "better_or_equal":
            return score >= kept
        return score > 0

    def describe(self) -> str:
        """One line for the log: order, evaluated epochs, selection."""
        order = "a new permutation every epoch" if self.shuffle else "the split's fixed order every epoch"
        last = ", last partial batch dropped" if self.drop_last else ""
        cadence = f"epochs {self.eval_first}, {self.eval_first + self.eval_every}, ..."
        if self.eval_last:
            cadence += " and the last"
        return (f"protocol {self.label}: batches in {order}{last}; {self.select_on} evaluated at {cadence}; "
                f"kept epoch replaced when {self.keep.replace('_', ' ')}")

    def to_json(self) -> dict[str, Any]:
        """The metrics.json entry ``protocol``."""
        out = dataclasses.asdict(self)
        out["schedule"] = dict(self.schedule)
        out["notes"] = list(self.notes)
        out["label"] = self.label
        return out


def avel_protocol(train_cfg) -> Protocol:
    """The ``avel`` protocol of a ``train`` section: ``shuffle``, ``select_on`` and ``eval_every``."""
    every = int(getattr(train_cfg, "eval_every", 1))
    if every < 1:
        raise ValueError(f"train.eval_every must be >= 1, got {every}")
    return Protocol("avel", shuffle=bool(getattr(train_cfg, "shuffle", True)), select_on=train_cfg.select_on,
                    eval_first=every, eval_every=every, eval_last=True)


def resolve_protocol(train_cfg, head_cls) -> Protocol:
    """The protocol of a run: :func:`avel_protocol`, or with ``train.protocol: reference`` the
    head's ``reference_protocols[train.setting]`` (a ValueError names the heads that have one
    when this head has none for the setting)."""
    name = getattr(train_cfg, "protocol", "avel")
    if name == "avel":
        return avel_protocol(train_cfg)
    if name != "reference":
        raise ValueError(f"train.protocol must be one of {PROTOCOLS}, got {name!r}")
    setting = getattr(train_cfg, "setting", "supervised")
    recorded = (getattr(head_cls, "reference_protocols", None) or {}).get(setting)
    if recorded is None:
        raise ValueError(f"train.protocol=reference: head {head_cls.name!r} has no recorded reference training "
                         f"protocol for the {setting} setting; heads that have one: {', '.join(heads_with_protocol(setting))}")
    return recorded


def heads_with_protocol(setting: str) -> list[str]:
    """Registered heads with a reference protocol for ``setting``."""
    from .registry import HEADS, discover

    discover()
    return sorted(name for name, cls in HEADS.items() if (getattr(cls, "reference_protocols", None) or {}).get(setting))


def run_group_suffix(protocol_name: str) -> str:
    """Suffix of the run folder group: ``-reference`` for the reference protocol, else nothing."""
    return "-reference" if protocol_name == "reference" else ""
