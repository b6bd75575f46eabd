"""Registries of heads and tasks: plain dicts filled by decorators, keyed by name.

Head and task modules under ``train/heads/`` and ``train/tasks/`` are discovered automatically
(every module in those packages is imported once on first lookup), so adding a head is adding a
module with a ``@register_head("name")`` class, and adding a task a module with a
``@register_task("name")`` subclass of :class:`train.tasks.base.Task`. The CLI's choices come from these dicts.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

HEADS: dict[str, type] = {}
TASKS: dict[str, type] = {}
_discovered = False


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: add a :class:`train.heads.base.Head` subclass under ``name``."""

    def add(cls: type) -> type:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered by {HEADS[name].__module__}.{HEADS[name].__qualname__}")
        cls.name = name
        HEADS[name] = cls
        return cls

    return add


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: add a :class:`train.tasks.base.Task` subclass under ``name``."""

    def add(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered by {TASKS[name].__module__}.{TASKS[name].__qualname__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def discover() -> None:
    """Import every module of ``train.heads`` and ``train.tasks`` (idempotent)."""
    global _discovered
    if _discovered:
        return
    for package_name in ("train.heads", "train.tasks"):
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    _discovered = True


def head_names(task: str | None = None) -> list[str]:
    discover()
    return sorted(n for n, cls in HEADS.items() if task is None or cls.task == task)


def get_head(name: str) -> type:
    discover()
    try:
        return HEADS[name]
    except KeyError:
        raise KeyError(f"unknown head {name!r}; registered: {', '.join(sorted(HEADS))}") from None


def get_task(name: str) -> type:
    """The registered :class:`train.tasks.base.Task` subclass ``name`` (``.run(...)`` trains one head)."""
    discover()
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(sorted(TASKS))}") from None
