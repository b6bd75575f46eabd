"""Counting the places where the host waits for the device (tests and ``avel-train gpucheck``).

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.cpu()``,
``.tolist()``, ``.numpy()``), or an operation whose output size depends on the values (boolean
mask indexing, ``nonzero``, ``unique``), makes the host wait until the device has finished all
queued work: the queue drains and the GPU idles while Python prepares the next step. The training
loop is meant to do that once per epoch, not once per batch. :class:`HostSyncCounter` counts such
calls (a :class:`torch.overrides.TorchFunctionMode`, so it sees calls made inside torch's own
Python code too) by name.

On a CPU every tensor is a host tensor, so the counter counts every such call (``device_only=False``):
the code under test must then keep its host-side bookkeeping in numpy, as the training loop does.
On a GPU, ``device_only=True`` counts only calls on tensors that live on the device.
"""
from __future__ import annotations

import collections
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter", "SYNCING"]

#: calls that wait for the device's result (by ``__name__``)
SYNCING = frozenset({
    "item", "__float__", "__int__", "__bool__", "__index__", "__array__", "__format__", "tolist", "numpy", "cpu",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
})


def _is_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    return any((isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
               for t in targets)


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` / ``syncs.calls`` (name -> count).

    Counted: the calls of :data:`SYNCING`, indexing with a boolean mask, ``.to("cpu")`` of a
    device tensor (on a CPU, where the device is the host, ``.to("cpu")`` is not counted), and
    ``torch.cuda.synchronize`` (as ``cuda.synchronize``).
    ``device_only``: count only calls whose tensor is not on the CPU (meaningful on a GPU).
    :meth:`paused` (a context manager) stops counting for a while, e.g. inside an optimiser step
    whose step counter is a host tensor by design."""

    def __init__(self, device_only: bool = False):
        super().__init__()
        self.device_only = device_only
        self.calls: collections.Counter[str] = collections.Counter()
        self._paused = 0

    def __enter__(self):
        # an explicit wait is no torch function: counted by wrapping it while the mode is active
        self._synchronize = torch.cuda.synchronize

        def synchronize(*args, **kwargs):
            if not self._paused:
                self.calls["cuda.synchronize"] += 1
            return self._synchronize(*args, **kwargs)

        torch.cuda.synchronize = synchronize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.cuda.synchronize = self._synchronize
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def pause(self) -> None:
        self._paused += 1

    def resume(self) -> None:
        self._paused -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            name = getattr(func, "__name__", "")
            syncing = (name in SYNCING
                       or (name == "__getitem__" and len(args) > 1 and _is_mask(args[1]))
                       or (name == "where" and len(args) + len(kwargs) == 1)
                       or (name == "to" and _to_cpu(args, kwargs)))
            if syncing:
                tensor = args[0] if args and torch.is_tensor(args[0]) else None
                on_host = tensor is None or tensor.device.type == "cpu"
                # .to("cpu") of a host tensor is a no-op; on a CPU it cannot be told from .to(device)
                if not ((self.device_only or name == "to") and on_host):
                    self.calls[name] += 1
        return func(*args, **kwargs)
