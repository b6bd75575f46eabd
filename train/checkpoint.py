"""Checkpoints as safetensors: weights plus the run's configuration, nothing executable.

A checkpoint can come from someone else, so it is never unpickled: ``checkpoint.safetensors``
holds plain tensors, and its string metadata holds one JSON document under the key ``avel``
(head name, head config, number of classes, setting, task, the resolved pipeline, metrics
summary). :func:`build_head` rebuilds the head from the registry and loads the weights strictly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

METADATA_KEY = "avel"
FORMAT = "avel-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or not an avel checkpoint; the message names the file."""


def save_checkpoint(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write ``state`` (a state dict) and ``metadata`` (JSON-able) to ``path`` (.safetensors).

    Tensors are copied to contiguous CPU memory (safetensors refuses shared storage).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(metadata)}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(doc, sort_keys=True, default=str)})
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a checkpoint, read without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if raw is None:
        raise CheckpointError(f"{path}: no '{METADATA_KEY}' metadata; not written by avel-train")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {metadata.get('format')!r} v{metadata.get('format_version')}, "
            f"this avel reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    return state, metadata


def build_head(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the registered head a checkpoint was trained with and load its weights (strict).

    Returns ``(head, metadata)``; the head is in eval mode.
    """
    from .registry import get_head

    state, meta = load_checkpoint(path, device)
    try:
        cls = get_head(meta["head"])
        config = cls.make_config(meta.get("head_config") or {})
        head = cls(num_classes=int(meta["num_classes"]), setting=meta.get("setting", "supervised"), config=config)
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit head {meta['head']!r}: {exc}") from None
    return head.to(device).eval(), meta
