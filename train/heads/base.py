"""The one interface every event-localization head implements.

A head maps per-segment features to per-segment class scores::

    audio  [B, T, 128]          VGGish embedding per 1-s segment
    visual [B, T, 7, 7, 512]    VGG-19 pool5 map per segment (mean of its frames)
    ->  HeadOutput.scores [B, T, C]   C = event classes + background (AVE: 29), logits
        HeadOutput.spatial [B, T, H, W] or None   the head's spatial map over the visual grid
        HeadOutput.extras {name: tensor}   other by-products (further maps, branch scores, ...)

``loss`` turns an output and a batch into the training loss for a setting; every head implements
its own (``segment_loss`` is plain per-segment cross-entropy).
Heads of other tasks (cross-modality matching, sounding-object maps) subclass Head with their own
``task`` and document their own forward signature.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Union

import torch
from torch import nn
from torch.nn import functional as F

from extract.core.settings import merge, to_dict


@dataclasses.dataclass
class NoConfig:
    """A head without options."""


@dataclasses.dataclass
class HeadOutput:
    #: [B, T, C] per-segment logits
    scores: torch.Tensor
    #: other by-products (branch scores, further attention maps ...), each documented by its head
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: [B, T, H, W] the head's spatial map of each segment (or frame) over the H x W grid of its
    #: visual input (AVE's VGG-19 maps: 7 x 7), row-major as the input's positions: where the
    #: head looks, e.g. an audio-guided attention (a softmax over the H*W positions sums to 1 per
    #: segment); None for heads without one. What avel-predict draws and the sol task scores.
    spatial: torch.Tensor | None = None


def grid_map(weights: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Weights over flattened positions [B, T, H*W] as :attr:`HeadOutput.spatial` [B, T, H, W],
    H and W taken from the visual input [B, T, H, W, C] (its flattening is row-major)."""
    return weights.reshape(*weights.shape[:2], visual.shape[2], visual.shape[3])


class Head(nn.Module):
    """Base class. Subclasses set ``Config`` (a dataclass of their options), ``train_defaults``
    (the paper's optimiser schedule: lr, batch_size, epochs, lr_step or milestones, lr_gamma,
    weight_decay, grad_clip; a head whose paper trains the weak setting differently also sets
    ``weak_train_defaults``) and implement ``forward``. A head with a public reference training
    script records its protocol per setting in ``reference_protocols`` (batch order, evaluation
    cadence, selection; :class:`train.protocol.Protocol`), which ``train.protocol: reference``
    follows."""

    name: ClassVar[str] = ""
    task: ClassVar[str] = "avel"
    settings: ClassVar[tuple[str, ...]] = ("supervised", "weak")
    Config: ClassVar[type] = NoConfig
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "batch_size": 64, "epochs": 300}
    #: setting -> :class:`train.protocol.Protocol` of the reference training script (none by default)
    reference_protocols: ClassVar[dict[str, Any]] = {}

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__()
        if setting not in self.settings:
            raise ValueError(f"head {self.name!r} supports settings {self.settings}, not {setting!r}")
        self.num_classes = num_classes
        self.setting = setting
        self.config = config if config is not None else self.Config()

    @classmethod
    def make_config(cls, overrides: Mapping[str, Any] | None = None) -> Any:
        """The head's Config with ``overrides`` applied strictly (unknown keys are errors)."""
        return merge(cls.Config(), overrides or {}, f"heads.{cls.name}")

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.config)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:  # pragma: no cover
        raise NotImplementedError

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> "LossValue":  # pragma: no cover
        """Training loss of a batch in the head's setting (every head implements its paper's
        objective). ``batch['labels']`` [B, T] segment classes, ``batch['video_label']`` [B],
        ``batch['valid']`` [B, T]; ``weak_pool`` = ``train.weak_pool`` for heads whose weak loss
        lets the trainer choose the MIL pooling.

        Returns a scalar tensor, or a dict ``{"loss": total, "<term>": scalar, ...}`` when the
        objective has named parts (auxiliary losses): the loop back-propagates ``total`` and logs
        the mean of every term per epoch as ``train_<term>`` (see :func:`split_loss`)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before training epoch ``epoch`` (1-based) of ``epochs``;
        heads whose objective changes during training (a loss switched on after some epochs)
        keep the state here. Default: nothing."""

    def weak_pooling(self, requested: str) -> str:
        """The MIL pooling this head's weak loss really applies when the trainer asks for
        ``requested`` (``train.weak_pool``); heads whose paper fixes the pooling return their own.
        Recorded in metrics.json."""
        return requested

    def predict(self, out: HeadOutput) -> torch.Tensor:
        """[B, T] predicted class per segment."""
        return out.scores.argmax(dim=-1)


#: what ``Head.loss`` returns: a scalar tensor or ``{"loss": total, "<term>": scalar, ...}``
LossValue = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def split_loss(value: LossValue) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, terms)`` of a head's loss value: a tensor is its own total without terms; a dict
    must hold the total under ``"loss"``, every other entry is a named term (logged, not summed)."""
    if torch.is_tensor(value):
        return value, {}
    if "loss" not in value:
        raise ValueError(f"a head's loss dict needs the total under 'loss'; got keys {sorted(value)}")
    return value["loss"], {k: v for k, v in value.items() if k != "loss"}


def total_loss(value: LossValue) -> torch.Tensor:
    """The back-propagated total of a head's loss value (see :func:`split_loss`)."""
    return split_loss(value)[0]


def segment_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over all segments: scores [B, T, C], labels [B, T]."""
    return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1))
