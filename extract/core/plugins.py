"""The one plugin mechanism of avel: entry points (docs/layers.md, "One plugin mechanism").

Every kind that has a registry is extended the same way: a distribution (avel itself, or a third
package) names its modules in an entry-point group, :func:`load` imports them, and the decorators
in those modules fill the registry, refusing a name that is already taken::

    avel.heads            modules with @register_head classes          (train.registry.HEADS)
    avel.tasks            modules with @register_task classes          (train.registry.TASKS)
    avel.extractors       modules with @register_extractor classes     (extract.extractor_base.EXTRACTORS)
    avel.config_sections  modules with @section dataclasses            (extract.core.settings.SECTIONS)
    avel.commands         click commands, ``name = module:object``     (avel-train subcommands)

In the first four groups an entry point's name is a label (``avel = train.heads.avel``; a module
may register several heads); in ``avel.commands`` it is the subcommand's name. A third package
declares, in its own ``setup.cfg`` / ``pyproject.toml``::

    [options.entry_points]
    avel.heads =
        myheads = myheads.models

Where the entry points come from (:func:`entry_points`):

- every installed distribution's metadata (``importlib.metadata``), except avel's own when the
  running avel is a source tree (a ``setup.cfg`` of ``name = avel`` next to ``extract/``): then
  avel's entry points are read from that ``setup.cfg``. The metadata of the installed ``avel`` is
  a copy made at ``pip install`` time; an uninstalled checkout has none, and an editable install of
  *another* checkout (or of this one before its last ``pip install -e .``) has another checkout's
  list. The file beside the code that runs is the list that belongs to that code.
- the order is avel's plugins first, then the other distributions' by name, so that a third
  package that takes a name avel already has is the one refused.

A plugin that cannot be imported, or whose registration fails (a duplicate name), raises
:class:`PluginError` naming the group, the entry point and its distribution. Nothing here imports
a stage: the contract only knows module names, read from metadata.
"""
from __future__ import annotations

import ast
import configparser
import dataclasses
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

HEADS = "avel.heads"
TASKS = "avel.tasks"
EXTRACTORS = "avel.extractors"
CONFIG_SECTIONS = "avel.config_sections"
COMMANDS = "avel.commands"
GROUPS = (HEADS, TASKS, EXTRACTORS, CONFIG_SECTIONS, COMMANDS)

DISTRIBUTION = "avel"
#: the folder that holds ``extract/`` (and, in a source tree, ``setup.cfg``)
SOURCE_ROOT = Path(__file__).resolve().parents[2]

#: group -> the objects loaded from it (each group is loaded once per process)
_loaded: dict[str, list[Any]] = {}


class PluginError(RuntimeError):
    """A plugin could not be loaded; the message names the plugin and its distribution."""


@dataclasses.dataclass(frozen=True)
class Plugin:
    """One entry point: ``name = value`` in ``group``, declared by ``distribution``."""

    group: str
    name: str
    #: ``package.module`` or ``package.module:object``
    value: str
    #: who declared it, for messages: ``fakeplug 0.1`` or ``avel (source tree /path/setup.cfg)``
    distribution: str

    @property
    def module(self) -> str:
        return self.value.partition(":")[0].strip()

    @property
    def attr(self) -> str | None:
        return self.value.partition(":")[2].strip() or None

    def describe(self) -> str:
        return f"plugin {self.name!r} of {self.group} ({self.value}, from {self.distribution})"

    def load(self) -> Any:
        """Import the module (and return the object after ``:`` if any); :class:`PluginError` on failure."""
        try:
            obj = importlib.import_module(self.module)
            for part in (self.attr or "").split(".") if self.attr else ():
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(f"{self.describe()} failed to load: {type(exc).__name__}: {exc}") from exc
        return obj


def source_setup_cfg() -> Path | None:
    """This source tree's ``setup.cfg`` when the running avel is a source tree, else ``None``."""
    path = SOURCE_ROOT / "setup.cfg"
    if not path.is_file():
        return None
    parser = configparser.ConfigParser()
    parser.read(path)
    return path if parser.get("metadata", "name", fallback="") == DISTRIBUTION else None


def setup_cfg_entry_points(path: Path, group: str) -> list[Plugin]:
    """The entry points of ``group`` in ``path``'s ``[options.entry_points]`` (comments and blank
    lines skipped), in the order written."""
    parser = configparser.ConfigParser()
    parser.read(path)
    text = parser.get("options.entry_points", group, fallback="")
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, value = (part.strip() for part in line.partition("="))
            found.append(Plugin(group, name, value, f"{DISTRIBUTION} (source tree {path})"))
    return found


def entry_points(group: str) -> list[Plugin]:
    """Every entry point of ``group``: avel's (from this tree's setup.cfg in a source tree, else
    from the installed metadata), then the other installed distributions', by name.

    Two distributions declaring the same name with different values is a :class:`PluginError`
    that names both."""
    local = source_setup_cfg()
    ours: list[Plugin] = setup_cfg_entry_points(local, group) if local is not None else []
    others: list[Plugin] = []
    for entry in importlib.metadata.entry_points(group=group):
        dist = getattr(entry, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        if local is not None and _normalize(dist_name) == DISTRIBUTION:
            continue  # the metadata of an install made from some checkout: this tree's setup.cfg wins
        version = dist.version if dist is not None else ""
        plugin = Plugin(group, entry.name, entry.value, f"{dist_name} {version}".strip())
        (ours if _normalize(dist_name) == DISTRIBUTION else others).append(plugin)
    others.sort(key=lambda p: (_normalize(p.distribution), p.name))
    found: dict[str, Plugin] = {}
    for plugin in ours + others:
        seen = found.get(plugin.name)
        if seen is not None and seen.value != plugin.value:
            raise PluginError(f"{group}: the name {plugin.name!r} is declared twice: {seen.value} by "
                              f"{seen.distribution} and {plugin.value} by {plugin.distribution}")
        found.setdefault(plugin.name, plugin)
    return list(found.values())


def find(group: str, name: str) -> Plugin | None:
    """The entry point ``name`` of ``group``, or ``None``."""
    return next((p for p in entry_points(group) if p.name == name), None)


def load(group: str) -> list[Any]:
    """Import every plugin of ``group`` (once per process) and return the loaded modules / objects.

    The decorators in the modules fill the registries as they are imported; a failing import or a
    refused registration raises :class:`PluginError` naming the plugin and its distribution (and
    the group is tried again on the next call)."""
    if group not in _loaded:
        _loaded[group] = [plugin.load() for plugin in entry_points(group)]
    return _loaded[group]


def docstring(plugin: Plugin) -> str | None:
    """The help text of the object an entry point names, read from its source without importing it:
    the ``help=`` / ``short_help=`` of a decorator call, else the docstring of the function or class
    (so ``avel-train --help`` lists plugin commands without importing them). ``None`` when the
    source cannot be read this way (an extension module, an object made by a call)."""
    origin = _module_source(plugin.module)
    if origin is None or plugin.attr is None:
        return None
    try:
        tree = ast.parse(Path(origin).read_text(), origin)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == plugin.attr:
            for decorator in node.decorator_list:  # @click.command(..., help=...), not @click.option(help=...)
                func = decorator.func if isinstance(decorator, ast.Call) else None
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("command", "group"):
                    given = {k.arg: k.value.value for k in decorator.keywords if isinstance(k.value, ast.Constant)}
                    if given.get("short_help") or given.get("help"):
                        return str(given.get("short_help") or given.get("help"))
            return ast.get_docstring(node)
    return None


def _module_source(module: str) -> str | None:
    """The ``.py`` file of ``module``, found without running any package's ``__init__``."""
    parts = module.split(".")
    top = sys.modules.get(parts[0])
    try:
        spec = top.__spec__ if top is not None else importlib.util.find_spec(parts[0])
        for i in range(1, len(parts)):
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return origin if origin and origin.endswith(".py") else None


def _normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()
