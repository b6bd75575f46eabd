"""Devices and model sizes, shared by both stages (plumbing: torch is imported when called)."""
from __future__ import annotations

from typing import Any

__all__ = ["resolve_device", "count_parameters"]


def resolve_device(device: str | None, *, check: bool = False) -> str:
    """``"auto"``/None/"" -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; anything else as given.

    With ``check``, a CUDA device that torch cannot use is a ValueError saying what to pass instead
    (extraction leaves that to its preflight, which reports it with the other checks)."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if check and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


def count_parameters(module: Any, trainable_only: bool = False) -> int:
    """Parameters of a torch module: all of them, or only those that receive a gradient."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
