"""Configuration: defaults in dataclasses, ``pipeline.yaml`` only overrides them.

Every top-level section of ``pipeline.yaml`` belongs to one dataclass, registered with
:func:`section`. The dataclass holds the defaults, next to the code it configures; the YAML file
and ``--set key=value`` options override fields. Unknown keys and wrong types are errors that name
the key (``train.lr: expected float, got 'fast'``).

This module imports nothing heavy (no torch, decord, librosa, zarr) so both stages can use it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from . import plugins

#: the sections are registered by the modules of the entry-point group ``avel.config_sections``
#: (setup.cfg: this module, ``extract.config``, ``train.config``; a third package adds its own the
#: same way), loaded through :mod:`extract.core.plugins`: the contract names no stage
SECTIONS_GROUP = plugins.CONFIG_SECTIONS

#: section name -> dataclass type
SECTIONS: dict[str, type] = {}

DEFAULT_PIPELINE = "pipeline.yaml"
PIPELINE_ENV = "AVEL_PIPELINE"


class ConfigError(ValueError):
    """A configuration key is unknown or has the wrong type. The message names the key."""


def section(name: str) -> Callable[[type], type]:
    """Register a dataclass as the defaults of top-level section ``name`` of pipeline.yaml."""
    return lambda cls: register_section(name, cls)


def register_section(name: str, cls: Any) -> Any:
    """Register ``cls`` (a dataclass, or a type annotation such as ``dict[str, dict]``) as a section."""
    if name in SECTIONS and SECTIONS[name] != cls:
        raise ValueError(f"config section {name!r} is already registered by {SECTIONS[name]!r}")
    SECTIONS[name] = cls
    return cls


# --------------------------------------------------------------------------------------------
# sections owned by the foundation (data roots, splits, store, Dask)


@dataclasses.dataclass
class SplitConfig:
    """One split: a manifest and the folder its ``path`` column is relative to."""

    manifest: str = ""
    video_root: str = ""


@section("data")
@dataclasses.dataclass
class DataConfig:
    """Where data lives. Relative paths are relative to the directory of pipeline.yaml."""

    root: str = "data"
    #: split name -> manifest + video root
    splits: dict[str, SplitConfig] = dataclasses.field(default_factory=dict)


@section("store")
@dataclasses.dataclass
class StoreConfig:
    """Feature store location and layout (layout choices do not change the numbers)."""

    #: the store `avel-extract` writes and `avel-train` reads
    path: str = "data/stores/ave.zarr"
    #: shared cache of feature sets reused across projects (env AVEL_CACHE overrides)
    cache_root: str = "data/cache"
    #: videos per shard (one writer per shard, see the store contract)
    rows_per_shard: int = 16
    #: zstd level of the feature arrays
    compression_level: int = 3


@dataclasses.dataclass
class SlurmConfig:
    """``--scheduler slurm``: Dask worker jobs on a SLURM cluster (dask-jobqueue, :mod:`extract.core.slurm`).

    Each job runs one Dask worker process with ``dask.threads_per_worker`` task threads; a job that
    ends early (``scancel``, walltime, node failure) is replaced while there is work. Every job is
    cancelled when the command ends. ``avel-extract --print-job-script`` shows the job script.
    """

    #: partition (``#SBATCH -p``); null = the cluster's default partition
    partition: str | None = None
    #: account charged (``#SBATCH -A``); null = your default account
    account: str | None = None
    #: worker jobs kept running while there is work (a job that ends early is replaced)
    jobs: int = 1
    #: CPUs per job (``--cpus-per-task``): on a CPU, the torch threads of the networks
    cores: int = 1
    #: memory per job (``--mem``), e.g. 16GB
    memory: str = "8GB"
    #: walltime per job (``-t``): MINUTES, HH:MM:SS or D-HH:MM:SS (SLURM's resolution is one minute)
    walltime: str = "01:00:00"
    #: GPUs per job (``--gres=gpu:1``): 0 or 1; one worker per GPU, more GPUs = more jobs
    gpus: int = 0
    #: GPU type in the request (``--gres=gpu:TYPE:1``, e.g. a100); null = any GPU
    gpu_type: str | None = None
    #: shell lines of the job script run before the worker starts (``module load ...``,
    #: ``source /path/venv/bin/activate``)
    prologue: list[str] = dataclasses.field(default_factory=list)
    #: extra ``#SBATCH`` options, e.g. ``[--qos=normal, --constraint=v100]``
    directives: list[str] = dataclasses.field(default_factory=list)
    #: network interface of the scheduler (here) and the workers: ib0, eth0, ...; lo on a
    #: one-machine SLURM; null = the address of this host's default route
    interface: str | None = None
    #: the Python of the jobs (null = the one running avel: the same environment on the shared file system)
    python: str | None = None
    #: each job's stdout/stderr (``<job name>-<job id>.out/.err``), relative to pipeline.yaml's folder
    log_directory: str = "data/slurm-logs"
    #: a worker's scratch folder (Dask spilling), e.g. $TMPDIR; null = Dask's default
    local_directory: str | None = None
    #: seconds to wait for the first worker (jobs pending in the queue); null = as long as it takes
    start_timeout: float | None = None
    #: seconds a worker waits for a scheduler it lost before it exits (ends its job): a killed
    #: avel leaves no job running for longer than this
    death_timeout: float = 60.0
    #: seconds between looks at the queue (one ``squeue`` call) for jobs that ended; Dask moves a lost
    #: worker's tasks at once, this only decides how soon a new job is asked for
    poll_interval: float = 15.0
    #: job names are ``<job_name>-<stage>-<run id>`` (squeue -n ...)
    job_name: str = "avel"
    #: jobs that end before their worker connected, in a row, before the run stops (exit 2)
    max_failed_starts: int = 3


@section("dask")
@dataclasses.dataclass
class DaskConfig:
    """How work is distributed. ``scheduler: null`` = an embedded LocalCluster on loopback;
    ``slurm`` = worker jobs on SLURM (section ``dask.slurm``)."""

    scheduler: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    #: TLS material for ``tls://`` schedulers (files); env DASK_DISTRIBUTED__COMM__TLS__* also work
    tls_ca_file: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    #: how many times a task is retried after an exception
    retries: int = 2
    #: seconds to wait for a tcp:// / tls:// scheduler to answer before the run stops (exit 2)
    connect_timeout: float = 10.0
    #: ``--scheduler slurm``: the worker jobs
    slurm: SlurmConfig = dataclasses.field(default_factory=SlurmConfig)


# --------------------------------------------------------------------------------------------
# generic machinery


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int is accepted for float); return it.

    Dataclass-typed fields accept a mapping (merged into the defaults); ``dict[str, X]`` and
    ``list[X]`` are checked element-wise.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alt in args:
            if alt is type(None):
                continue
            try:
                return coerce(value, alt, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return merge(tp(), value, key)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        ktp, vtp = args if args else (Any, Any)
        return {coerce(k, ktp, f"{key}"): coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        etp = args[0] if args else Any
        out = [coerce(v, etp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def merge(instance: Any, overrides: Mapping[str, Any] | None, where: str) -> Any:
    """Return a copy of dataclass ``instance`` with ``overrides`` applied, strictly."""
    if not overrides:
        return dataclasses.replace(instance)
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {overrides!r}")
    hints = typing.get_type_hints(type(instance))
    names = [f.name for f in dataclasses.fields(instance)]
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(names)})")
        tp = hints[key]
        current = getattr(instance, key)
        if _is_dataclass_type(tp) and isinstance(value, Mapping):
            changes[key] = merge(current, value, f"{where}.{key}")
        else:
            changes[key] = coerce(value, tp, f"{where}.{key}")
    result = dataclasses.replace(instance, **changes)
    # a section may resolve keys that depend on which ones were given (extract.recipe fills and
    # checks the keys of its recipe: ExtractConfig.resolve_overrides)
    hook = getattr(result, "resolve_overrides", None)
    return hook(overrides, where) if callable(hook) else result


def to_dict(obj: Any) -> Any:
    """Plain-JSON form of a dataclass tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces) of a dataclass tree or plain data."""
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(obj: Any, length: int = 16) -> str:
    """sha256 over the canonical JSON of ``obj``, first ``length`` hex digits."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def parse_set_option(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "extract.fps=8"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = dotted.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is both a value and a section")
        node[parts[-1]] = value
    return out


def _deep_update(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_update(dict(out[key]), value)
        else:
            out[key] = value
    return out


class Pipeline:
    """The resolved configuration: one dataclass instance per section, as attributes.

    ``pipeline.train`` is a :class:`train.config.TrainConfig`, ``pipeline.extract`` an
    :class:`extract.config.ExtractConfig` and so on. ``base_dir`` is the directory relative paths
    are resolved against (the directory of pipeline.yaml, or the working directory).
    """

    def __init__(self, sections: dict[str, Any], base_dir: Path, source: str | None):
        self._sections = sections
        self.base_dir = base_dir
        self.source = source

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def path(self, value: str | os.PathLike) -> Path:
        """Resolve a path from the config against :attr:`base_dir` (``~`` expanded)."""
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else (self.base_dir / p)

    def split(self, name: str) -> SplitConfig:
        try:
            return self.data.splits[name]
        except KeyError:
            known = ", ".join(sorted(self.data.splits)) or "none"
            raise ConfigError(
                f"data.splits.{name}: unknown split (configured: {known}); add it to pipeline.yaml "
                f"or pass --manifest"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {name: to_dict(value) for name, value in self._sections.items()}

    def dump(self) -> str:
        """The fully resolved configuration as YAML."""
        header = f"# resolved from {self.source or 'defaults'}\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def load_sections() -> dict[str, type]:
    """Import every module that registers sections (entry points of :data:`SECTIONS_GROUP`, e.g.
    ``train = train.config``) and return :data:`SECTIONS`."""
    plugins.load(SECTIONS_GROUP)
    return SECTIONS


def find_pipeline_file(explicit: str | os.PathLike | None = None) -> Path | None:
    """``--config`` if given, else $AVEL_PIPELINE, else ./pipeline.yaml if present."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    env = os.environ.get(PIPELINE_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"${PIPELINE_ENV}={env} does not exist")
        return path
    path = Path(DEFAULT_PIPELINE)
    return path if path.is_file() else None


def load_pipeline(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    search: bool = True,
) -> Pipeline:
    """Resolve the configuration: dataclass defaults <- pipeline.yaml <- ``overrides``.

    ``path=None`` looks for $AVEL_PIPELINE or ./pipeline.yaml when ``search`` is true.
    """
    sections = load_sections()
    file = find_pipeline_file(path) if (path or search) else None
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        raw = dict(loaded)
    if overrides:
        raw = _deep_update(raw, overrides)
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(sections))})")
    resolved = {
        name: merge(cls(), raw.get(name), name) if _is_dataclass_type(cls) else coerce(raw.get(name) or {}, cls, name)
        for name, cls in sections.items()
    }
    base_dir = file.resolve().parent if file is not None else Path.cwd()
    return Pipeline(resolved, base_dir, str(file) if file is not None else None)


# ------------------------------------------------------------------------------------------
# the feature cache's folder

#: environment variable that overrides ``store.cache_root`` (several projects share one cache)
CACHE_ENV = "AVEL_CACHE"


def cache_root(pipeline: Pipeline | None = None, explicit: str | os.PathLike | None = None) -> Path | None:
    """The feature cache folder that applies, the one precedence every command follows:
    ``explicit`` (a ``--cache-root`` / ``--root`` option) > ``$AVEL_CACHE`` > the pipeline's
    ``store.cache_root`` (relative to its folder, :meth:`Pipeline.path`). ``~`` is expanded.

    Without a pipeline the answer is None when neither of the first two is given (so
    ``cache_root()`` says whether the environment overrides the configuration). With a pipeline
    whose ``store.cache_root`` is empty it is a :class:`ConfigError` saying how to set one."""
    for value in (explicit, os.environ.get(CACHE_ENV)):
        if value:
            return Path(os.path.expanduser(str(value)))
    if pipeline is None:
        return None
    configured = getattr(getattr(pipeline, "store", None), "cache_root", None)
    if not configured:
        raise ConfigError(f"no feature cache configured: set store.cache_root in pipeline.yaml or ${CACHE_ENV}")
    return pipeline.path(configured)
