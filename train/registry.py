"""Registries of heads and tasks: plain dicts filled by decorators, keyed by name.

A head is a ``@register_head("name")`` class, a task a ``@register_task("name")`` subclass of
:class:`train.tasks.base.Task`, in a module named in the entry-point group ``avel.heads`` /
``avel.tasks`` (setup.cfg; a third package lists its modules in its own metadata). The modules are
imported on the first lookup, through the one plugin mechanism :mod:`extract.core.plugins`; a name
registered twice is refused with both classes named. The CLI's choices come from these dicts.
"""
from __future__ import annotations

from typing import Callable

from extract.core import plugins

HEADS: dict[str, type] = {}
TASKS: dict[str, type] = {}


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: add a :class:`train.heads.base.Head` subclass under ``name``."""

    def add(cls: type) -> type:
        if name in HEADS:
            raise ValueError(f"head {name!r} of {cls.__module__}.{cls.__qualname__} is already registered by "
                             f"{HEADS[name].__module__}.{HEADS[name].__qualname__}")
        cls.name = name
        HEADS[name] = cls
        return cls

    return add


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: add a :class:`train.tasks.base.Task` subclass under ``name``."""

    def add(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task {name!r} of {cls.__module__}.{cls.__qualname__} is already registered by "
                             f"{TASKS[name].__module__}.{TASKS[name].__qualname__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def discover() -> None:
    """Import every head and task plugin (entry points ``avel.tasks`` and ``avel.heads``; once)."""
    plugins.load(plugins.TASKS)
    plugins.load(plugins.HEADS)


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
