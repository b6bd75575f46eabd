"""Devices and model sizes, shared by both stages (plumbing: torch is imported when called)."""
from __future__ import annotations

from typing import Any

__all__ = ["resolve_device", "count_parameters"]


def resolve_device(device: str | None, *, check: bool = False) -> str:
    """``"auto"``/None/"" -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; anything else as given.

    With ``check``, a name torch does not know, or a CUDA device that torch cannot use (no CUDA, or
    an index beyond the GPUs it sees), is a ValueError saying what to pass instead (the CLIs print
    it as one line and exit 2)."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if not check:
        return device
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def count_parameters(module: Any, trainable_only: bool = False) -> int:
    """Parameters of a torch module: all of them, or only those that receive a gradient."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
