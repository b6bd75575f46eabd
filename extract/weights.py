"""The weights rule: where network weights come from, and how they are identified.

A weights *spec* (``extract.visual_weights`` for VGG-19, ``extract.audio_weights`` for VGGish and
its PCA, ``extract.sol_visual_weights`` for ResNet-152 in pipeline.yaml: :data:`CONFIG_KEYS`) is one of

- ``"imagenet"`` (VGG-19, ResNet-152: torchvision ``IMAGENET1K_V1``), ``"vggish"`` (VGGish and its
  PCA parameters: the torchvggish port of the AudioSet release) or ``"pretrained"`` (either):
  the canonical file (:data:`CANONICAL`) is looked up, in this order,

  1. in the folder named by the environment variable ``AVEL_WEIGHTS_DIR``;
  2. in the torch hub cache, ``torch.hub.get_dir()/checkpoints/<filename>``;
  3. downloaded from its URL into the torch hub cache (unless ``AVEL_OFFLINE=1``), the sha256
     prefix in the file name checked;

- a path to a ``.pth``/``.pt`` (pickled state dict) or ``.safetensors`` file;
- ``"random"``: freshly initialised weights from a seed (tests, smoke runs).

Nothing falls back silently: if the file cannot be found or fetched, :class:`WeightsUnavailable`
names the file, where avel looked for it, where to download it and put it, and the config key that
chooses these weights (so that it can point at a file, or at ``random``).

The *identity* of weights (``{"name", "sha256", "seed"}``) enters the store fingerprint; the file
digest is cached per (path, mtime, size) so repeated resolution does not re-hash 550 MB.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

__all__ = [
    "WeightsKind",
    "WeightsSource",
    "WeightsUnavailable",
    "CANONICAL",
    "CONFIG_KEYS",
    "resolve_weights",
    "file_sha256",
    "load_state_dict",
    "WEIGHTS_DIR_ENV",
    "OFFLINE_ENV",
]

WeightsKind = Literal["vgg19", "vggish", "vggish_pca", "resnet152"]

WEIGHTS_DIR_ENV = "AVEL_WEIGHTS_DIR"
OFFLINE_ENV = "AVEL_OFFLINE"


@dataclasses.dataclass(frozen=True)
class Canonical:
    """The published file of a network: file name (with sha256 prefix), URL, accepted spec words."""

    filename: str
    url: str
    specs: tuple[str, ...]
    #: other names the same file is known under (e.g. the torch hub cache uses the URL basename)
    aliases: tuple[str, ...] = ()


CANONICAL: dict[str, Canonical] = {
    "vgg19": Canonical(
        "vgg19-dcbb9e9d.pth", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", ("imagenet", "pretrained")
    ),
    "resnet152": Canonical(
        "resnet152-394f9c45.pth",
        "https://download.pytorch.org/models/resnet152-394f9c45.pth",
        ("imagenet", "pretrained"),
    ),
    "vggish": Canonical(
        "vggish-10086976.pth",
        "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
        ("vggish", "pretrained"),
    ),
    "vggish_pca": Canonical(
        "pca_params-970ea276.pth",
        "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish_pca_params-970ea276.pth",
        ("vggish", "pretrained"),
        aliases=("vggish_pca_params-970ea276.pth",),
    ),
}


#: network kind -> the pipeline.yaml key whose spec chooses its weights
CONFIG_KEYS: dict[str, str] = {
    "vgg19": "extract.visual_weights",
    "resnet152": "extract.sol_visual_weights",
    "vggish": "extract.audio_weights",
    "vggish_pca": "extract.audio_weights",
}


def config_key(kind: str) -> str:
    """The config key of network ``kind`` (KeyError for an unknown kind)."""
    return CONFIG_KEYS[kind]


class WeightsUnavailable(FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine and could not be downloaded."""


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Resolved weights: a file (``path``) or ``random`` initialisation from ``seed``."""

    kind: str
    name: str
    path: Path | None
    sha256: str
    seed: int | None

    @property
    def is_random(self) -> bool:
        return self.path is None

    def identity(self) -> dict[str, Any]:
        """JSON identity for the store fingerprint: ``{"name", "sha256" | "random", "seed"}``."""
        return {"name": self.name, "sha256": self.sha256, "seed": self.seed}

    def load(self) -> dict[str, Any]:
        """The state dict of the file (CPU tensors); ValueError for random weights."""
        if self.path is None:
            raise ValueError(f"{self.kind}: random weights have no state dict to load")
        return load_state_dict(self.path)


# ------------------------------------------------------------------------------------------
# digests

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, cached per (absolute path, mtime_ns, size)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


# ------------------------------------------------------------------------------------------
# loading


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load a state dict with ``torch.load(weights_only=True)`` (or safetensors) on the CPU.

    The torchvggish PCA file stores numpy arrays; their reconstruction functions are allowed for
    this load only (still the restricted ``weights_only`` unpickler, no arbitrary code).
    """
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        raise ValueError(f"{path}: cannot be loaded as a state dict with torch.load(weights_only=True): {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
    return obj


def _numpy_safe_globals() -> list[Any]:
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype]
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["_reconstruct"])
            allowed.append(module._reconstruct)
        except (ImportError, AttributeError):
            pass
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


# ------------------------------------------------------------------------------------------
# resolution


def weights_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(os.path.expanduser(value)) if value else None


def hub_checkpoints_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _candidate_paths(canon: Canonical) -> list[Path]:
    names = (canon.filename,) + canon.aliases
    folders = [d for d in (weights_dir(), hub_checkpoints_dir()) if d is not None]
    return [folder / name for folder in folders for name in names]


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Fetch ``url`` into ``dest`` (via a temporary file in the same folder); verify the sha256 prefix.

    The file name's part after the last ``-`` (e.g. ``dcbb9e9d`` in ``vgg19-dcbb9e9d.pth``) is the
    beginning of the file's sha256, as torch.hub names its checkpoints.
    """
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = dest.stem.rsplit("-", 1)[-1] if "-" in dest.stem else ""
    h = hashlib.sha256()
    log.info("downloading %s to %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                h.update(block)
        if prefix and not h.hexdigest().startswith(prefix):
            raise RuntimeError(f"sha256 {h.hexdigest()[:16]}... does not start with {prefix} (corrupt download?)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unavailable_message(kind: str, canon: Canonical, searched: list[Path], why: str) -> str:
    """The message of a missing canonical file: the file, why, every path looked at, where to
    download it and put it, and the config key that chooses these weights. Starts with
    ``"<kind> weights"`` (the preflight reads the kind from there)."""
    where = weights_dir()
    target = where if where is not None else hub_checkpoints_dir()
    key = config_key(kind)
    return (
        f"{kind} weights {canon.filename!r} (chosen by {key}) are not available ({why}). Looked in: "
        + ", ".join(str(p) for p in searched)
        + f". Download {canon.url} and save it as {target / canon.filename}"
        + (f" (or set ${WEIGHTS_DIR_ENV} to the folder holding it)" if where is None else "")
        + f"; or set {key} to the path of the file (e.g. --set {key}=/path/to/{canon.filename}), "
        + f"or to 'random' for untrained weights (--set {key}=random)."
    )


def _resolve_canonical(kind: str, canon: Canonical) -> Path:
    searched = _candidate_paths(canon)
    for path in searched:
        if path.is_file():
            log.debug("%s weights: using %s", kind, path)
            return path
    if _offline():
        raise WeightsUnavailable(_unavailable_message(kind, canon, searched, f"${OFFLINE_ENV} forbids downloads"))
    dest = hub_checkpoints_dir() / canon.filename
    try:
        _download(canon.url, dest)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise WeightsUnavailable(_unavailable_message(kind, canon, searched, f"download failed: {exc}")) from None
    return dest


def resolve_weights(spec: str, kind: WeightsKind, seed: int = 0) -> WeightsSource:
    """Resolve a weights spec for network ``kind`` (``vgg19``, ``vggish``, ``vggish_pca``, ``resnet152``).

    ``spec``: ``"imagenet"`` / ``"vggish"`` / ``"pretrained"`` (the canonical file, see the module
    docstring), a file path, or ``"random"`` (identity ``sha256="random"`` with ``seed``).
    Raises :class:`WeightsUnavailable` (file missing, download impossible) or ValueError (a spec
    word that does not fit ``kind``).
    """
    if kind not in CANONICAL:
        raise ValueError(f"unknown network kind {kind!r} (known: {', '.join(CANONICAL)})")
    canon = CANONICAL[kind]
    spec = str(spec).strip()
    if spec == "random":
        return WeightsSource(kind=kind, name="random", path=None, sha256="random", seed=int(seed))
    if spec in canon.specs:
        path = _resolve_canonical(kind, canon)
        return WeightsSource(kind=kind, name=canon.filename, path=path, sha256=file_sha256(path), seed=None)
    looks_like_path = os.sep in spec or spec.endswith((".pth", ".pt", ".safetensors", ".bin")) or Path(spec).exists()
    if not looks_like_path:
        allowed = ", ".join(repr(s) for s in canon.specs + ("random",))
        raise ValueError(f"{kind} weights ({config_key(kind)}): unknown spec {spec!r}; expected {allowed} or a file path")
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        key = config_key(kind)
        raise WeightsUnavailable(
            f"{kind} weights file {path} (set by {key}) does not exist (looked at {path.resolve()}); fix the path "
            f"in {key}, or set it to {canon.specs[0]!r} ({canon.url}) or 'random'"
        )
    return WeightsSource(kind=kind, name=path.name, path=path, sha256=file_sha256(path), seed=None)
