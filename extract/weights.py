"""The weights rule: where network weights come from, and how they are identified.

A weights *spec* (``extract.visual_weights`` for VGG-19, ``extract.audio_weights`` for VGGish and
its PCA, ``extract.sol_visual_weights`` for ResNet-152 in pipeline.yaml: :data:`CONFIG_KEYS`) is one of

- ``"imagenet"`` (VGG-19, ResNet-152: torchvision ``IMAGENET1K_V1``), ``"vggish"`` (VGGish and its
  PCA parameters: the torchvggish port of the AudioSet release) or ``"pretrained"`` (either):
  the canonical file (:data:`CANONICAL`) is looked up, in this order,

  1. in the folder named by the environment variable ``AVEL_WEIGHTS_DIR``;
  2. in the torch hub cache, ``torch.hub.get_dir()/checkpoints/<filename>``;
  3. in the Keras cache, ``$KERAS_HOME/models`` (default ``~/.keras/models``);
  4. downloaded from its URL into the torch hub cache (unless ``AVEL_OFFLINE=1``), its checksum
     checked;

- ``"keras-imagenet"`` (VGG-19 only, the ``ave2018`` recipe): the Keras applications ``imagenet``
  weights, i.e. Oxford VGG's Caffe weights, as any of their files (:data:`ALTERNATES`), looked up
  the same way: ``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`` (downloaded if none is
  found), ``vgg19_weights_tf_dim_ordering_tf_kernels.h5`` or jcjohnson's ``vgg19-d01eb7cb.pth``;
- a path to a ``.pth``/``.pt`` (pickled state dict), ``.safetensors`` file, or (VGG-19) a Keras
  ``.h5`` weights file in the legacy HDF5 layout (:mod:`extract.keras_h5`);
- ``"random"``: freshly initialised weights from a seed (tests, smoke runs).

Nothing falls back silently: if the file cannot be found or fetched, :class:`WeightsUnavailable`
names the file, where avel looked for it, where to download it and put it, and the config key that
chooses these weights (so that it can point at a file, or at ``random``).

The *identity* of weights (``{"name", "sha256", "seed"}``) enters the store fingerprint. A file
listed in :data:`KNOWN_FILES` (recognised by its published checksum: the md5 Keras publishes, or
the sha256 prefix in a torch hub file name) has a **logical** identity, ``{"name": <logical
name>, "sha256": None, "seed": None}``: the Keras ``.h5`` files and jcjohnson's ``.pth`` of the
same Caffe weights are all ``vgg19-keras-imagenet``, so features made from either fingerprint
equal, and a store imported from the public AVE files (which records that identity without
having the files) matches an ``ave2018`` extraction. Any other file is identified by its own
sha256 (``{"name": <file name>, "sha256": <digest>, "seed": None}``), random weights by their seed.
Digests are cached per (path, mtime, size) so repeated resolution does not re-hash 550 MB.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

__all__ = [
    "WeightsKind",
    "WeightsSource",
    "WeightsUnavailable",
    "CANONICAL",
    "ALTERNATES",
    "KNOWN_FILES",
    "KnownFile",
    "known_identity",
    "declared_identity",
    "identify_file",
    "file_md5",
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


#: other pretrained weights of a network kind, by spec word: the first file name is the one
#: downloaded when none of them is found (the aliases are other files of the same weights)
ALTERNATES: dict[str, dict[str, Canonical]] = {
    "vgg19": {
        "keras-imagenet": Canonical(
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            ("keras-imagenet",),
            aliases=("vgg19_weights_tf_dim_ordering_tf_kernels.h5", "vgg19-d01eb7cb.pth"),
        ),
    },
}


@dataclasses.dataclass(frozen=True)
class KnownFile:
    """A published weights file: its logical identity and how to recognise it.

    ``md5``: the full md5 hex digest (Keras publishes these as ``file_hash`` in
    ``keras/applications/*.py``); ``sha256_prefix``: the prefix of the sha256 that a torch hub
    file name carries (``vgg19-dcbb9e9d.pth``)."""

    kind: str
    logical: str
    filename: str
    url: str
    md5: str | None = None
    sha256_prefix: str | None = None


#: the files avel knows, one logical identity per set of weights (docs/extraction.md, "Weights")
KNOWN_FILES: tuple[KnownFile, ...] = (
    KnownFile("vgg19", "vgg19-torchvision-imagenet1k-v1", "vgg19-dcbb9e9d.pth",
              "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", sha256_prefix="dcbb9e9d"),
    # Keras applications VGG19(weights="imagenet"): Oxford VGG's ILSVRC-2014 Caffe model ported to
    # Keras (TensorFlow kernel order); md5 from keras/applications/vgg19.py
    KnownFile("vgg19", "vgg19-keras-imagenet", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
              "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", md5="253f8cb515780f3b799900260a226db6"),
    KnownFile("vgg19", "vgg19-keras-imagenet", "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
              "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
              "vgg19_weights_tf_dim_ordering_tf_kernels.h5", md5="cbe5617147190e668d6c5d5026f83318"),
    # the same Caffe model converted to a torchvision state dict (github.com/jcjohnson/pytorch-vgg)
    KnownFile("vgg19", "vgg19-keras-imagenet", "vgg19-d01eb7cb.pth",
              "https://s3-us-west-2.amazonaws.com/jcjohns-models/vgg19-d01eb7cb.pth", sha256_prefix="d01eb7cb"),
    KnownFile("resnet152", "resnet152-torchvision-imagenet1k-v1", "resnet152-394f9c45.pth",
              "https://download.pytorch.org/models/resnet152-394f9c45.pth", sha256_prefix="394f9c45"),
    KnownFile("vggish", "vggish-audioset", "vggish-10086976.pth",
              "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
              sha256_prefix="10086976"),
    KnownFile("vggish_pca", "vggish-audioset-pca", "pca_params-970ea276.pth",
              "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish_pca_params-970ea276.pth",
              sha256_prefix="970ea276"),
)


def known_identity(logical: str) -> dict[str, Any]:
    """The weights identity of the known weights ``logical`` (e.g. ``"vgg19-keras-imagenet"``),
    as a resolved file of them has it; no file needed (``avel-extract import-h5`` records it)."""
    if not any(k.logical == logical for k in KNOWN_FILES):
        raise ValueError(f"unknown logical weights {logical!r} (known: {', '.join(sorted({k.logical for k in KNOWN_FILES}))})")
    return {"name": logical, "sha256": None, "seed": None}


def upgrade_identity(identity: Any) -> Any:
    """The identity a weights file has now, for an identity recorded before logical identities
    existed (avel 0.1 stores and checkpoints: ``{"name": <file name>, "sha256": <its sha256>,
    "seed": None}``): a known file (:data:`KNOWN_FILES`, recognised by its sha256 prefix as
    :func:`identify_file` does) becomes its logical identity (:func:`known_identity`); anything
    else is returned unchanged. Stores made with the published files then keep matching the
    features avel computes with those files today."""
    if not isinstance(identity, dict) or identity.get("seed") is not None:
        return identity
    sha = str(identity.get("sha256") or "")
    if len(sha) != 64:
        return identity
    for known in KNOWN_FILES:
        if known.sha256_prefix and sha.startswith(known.sha256_prefix):
            return known_identity(known.logical)
    return identity


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
    """Resolved weights: a file (``path``) or ``random`` initialisation from ``seed``.

    ``logical``: the logical identity of a known file (:data:`KNOWN_FILES`), else None."""

    kind: str
    name: str
    path: Path | None
    sha256: str
    seed: int | None
    logical: str | None = None

    @property
    def is_random(self) -> bool:
        return self.path is None

    def identity(self) -> dict[str, Any]:
        """JSON identity for the store fingerprint: ``{"name", "sha256" | "random", "seed"}``; a
        known file's is its logical one (:func:`known_identity`), whichever of its files this is."""
        if self.logical is not None:
            return known_identity(self.logical)
        return {"name": self.name, "sha256": self.sha256, "seed": self.seed}

    def load(self) -> dict[str, Any]:
        """The state dict of the file (CPU tensors); ValueError for random weights."""
        if self.path is None:
            raise ValueError(f"{self.kind}: random weights have no state dict to load")
        return load_state_dict(self.path, kind=self.kind)


# ------------------------------------------------------------------------------------------
# digests

_DIGESTS: dict[tuple[str, str, int, int], str] = {}


def _file_digest(path: str | os.PathLike, algorithm: str) -> str:
    path = Path(path).resolve()
    st = path.stat()
    key = (algorithm, str(path), st.st_mtime_ns, st.st_size)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.new(algorithm)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, cached per (absolute path, mtime_ns, size)."""
    return _file_digest(path, "sha256")


def file_md5(path: str | os.PathLike) -> str:
    """md5 hex digest of a file (the checksum Keras publishes), cached like :func:`file_sha256`."""
    return _file_digest(path, "md5")


def identify_file(path: str | os.PathLike, kind: str) -> KnownFile | None:
    """The known file (:data:`KNOWN_FILES`) of network ``kind`` that ``path`` is, by checksum (the
    file's name does not matter), or None. HDF5 files are compared by md5, others by the sha256
    prefix."""
    path = Path(path)
    hdf5 = path.suffix.lower() in (".h5", ".hdf5")
    for known in KNOWN_FILES:
        if known.kind != kind:
            continue
        if known.md5 and hdf5 and file_md5(path) == known.md5:
            return known
        if known.sha256_prefix and not hdf5 and file_sha256(path).startswith(known.sha256_prefix):
            return known
    return None


# ------------------------------------------------------------------------------------------
# loading


def load_state_dict(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Load a state dict with ``torch.load(weights_only=True)`` (or safetensors) on the CPU.

    The torchvggish PCA file stores numpy arrays; their reconstruction functions are allowed for
    this load only (still the restricted ``weights_only`` unpickler, no arbitrary code). A Keras
    ``.h5`` weights file (legacy HDF5 layout) loads for ``kind="vgg19"`` as a torchvision
    ``features.*`` state dict (:func:`extract.keras_h5.vgg19_state_dict`); it is refused, naming
    the file, the layer and the shape, when its layers are not VGG-19's.
    """
    import torch

    path = Path(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        if kind != "vgg19":
            raise ValueError(f"{path}: Keras .h5 weights files are read for VGG-19 only, not for {kind or 'this network'}")
        from .keras_h5 import vgg19_state_dict

        return {name: torch.from_numpy(value) for name, value in vgg19_state_dict(path).items()}
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


def keras_models_dir() -> Path:
    """Where Keras keeps downloaded application weights: ``$KERAS_HOME/models`` (``~/.keras/models``)."""
    return Path(os.path.expanduser(os.environ.get("KERAS_HOME") or "~/.keras")) / "models"


def _candidate_paths(canon: Canonical) -> list[Path]:
    names = (canon.filename,) + canon.aliases
    folders = [d for d in (weights_dir(), hub_checkpoints_dir(), keras_models_dir()) if d is not None]
    return [folder / name for folder in folders for name in names]


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Fetch ``url`` into ``dest`` with ``torch.hub.download_url_to_file`` and check it against the
    weights table before it is moved into place.

    torch.hub checks the sha256 prefix (the part of a hub file name after its last ``-``, e.g.
    ``dcbb9e9d`` in ``vgg19-dcbb9e9d.pth``, or :data:`KNOWN_FILES`' ``sha256_prefix``); a Keras
    file's full md5 (:data:`KNOWN_FILES`, as Keras publishes it) is checked here after the download.
    The file is downloaded under a temporary name in ``dest``'s folder and renamed to ``dest`` only
    once every check passed, so an interrupted or corrupt download never sits under the real name.
    ``timeout`` (seconds) bounds each blocking socket operation: torch.hub has no timeout of its own,
    so the process' default socket timeout is set for the download and restored after.
    """
    import socket
    import uuid

    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    known = next((k for k in KNOWN_FILES if k.filename == dest.name), None)
    prefix = (known.sha256_prefix if known is not None and known.sha256_prefix
              else dest.stem.rsplit("-", 1)[-1] if "-" in dest.stem else None)
    md5 = known.md5 if known is not None else None
    log.info("downloading %s to %s", url, dest)
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.download")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(url, str(tmp), hash_prefix=None if md5 else prefix,
                                       progress=sys.stderr.isatty())
        if md5:
            got = _file_digest(tmp, "md5")
            if got != md5:
                raise RuntimeError(f"md5 {got} is not the published {md5} of {dest.name} (corrupt download?)")
        os.replace(tmp, dest)
    finally:
        socket.setdefaulttimeout(previous)
        tmp.unlink(missing_ok=True)


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
        + (f"; any of {', '.join(canon.aliases)} (the same weights) is used as well" if canon.aliases else "")
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


def _file_source(kind: str, path: Path) -> WeightsSource:
    known = identify_file(path, kind)
    return WeightsSource(kind=kind, name=path.name, path=path, sha256=file_sha256(path), seed=None,
                         logical=known.logical if known is not None else None)


def resolve_weights(spec: str, kind: WeightsKind, seed: int = 0) -> WeightsSource:
    """Resolve a weights spec for network ``kind`` (``vgg19``, ``vggish``, ``vggish_pca``, ``resnet152``).

    ``spec``: ``"imagenet"`` / ``"vggish"`` / ``"pretrained"`` (the canonical file, see the module
    docstring), ``"keras-imagenet"`` (VGG-19: any file of the Keras applications weights,
    :data:`ALTERNATES`), a file path, or ``"random"`` (identity ``sha256="random"`` with ``seed``).
    Raises :class:`WeightsUnavailable` (file missing, download impossible) or ValueError (a spec
    word that does not fit ``kind``).
    """
    if kind not in CANONICAL:
        raise ValueError(f"unknown network kind {kind!r} (known: {', '.join(CANONICAL)})")
    canon = CANONICAL[kind]
    spec = str(spec).strip()
    if spec == "random":
        return WeightsSource(kind=kind, name="random", path=None, sha256="random", seed=int(seed))
    alternate = ALTERNATES.get(kind, {}).get(spec)
    if spec in canon.specs or alternate is not None:
        path = _resolve_canonical(kind, alternate or canon)
        source = _file_source(kind, path)
        if source.logical is None:
            log.warning("%s weights %s do not have the published checksum of %s (a partial download or another "
                        "file under its name?): identified by their own sha256 %s..., so stores made with the "
                        "published file will not match", kind, path, path.name, source.sha256[:12])
        return source
    looks_like_path = (os.sep in spec or spec.endswith((".pth", ".pt", ".safetensors", ".bin", ".h5", ".hdf5"))
                       or Path(spec).exists())
    if not looks_like_path:
        words = canon.specs + tuple(ALTERNATES.get(kind, {})) + ("random",)
        allowed = ", ".join(repr(s) for s in words)
        raise ValueError(f"{kind} weights ({config_key(kind)}): unknown spec {spec!r}; expected {allowed} or a file path")
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        key = config_key(kind)
        raise WeightsUnavailable(
            f"{kind} weights file {path} (set by {key}) does not exist (looked at {path.resolve()}); fix the path "
            f"in {key}, or set it to {canon.specs[0]!r} ({canon.url}) or 'random'"
        )
    return _file_source(kind, path)


def declared_identity(spec: str, kind: WeightsKind, seed: int = 0) -> dict[str, Any]:
    """The identity weights ``spec`` WOULD resolve to, without needing the canonical files: a spec
    word of published weights gives their logical identity (:func:`known_identity`), ``random``
    the seeded one; a file path is resolved and hashed (the file must exist). Used to record
    what made features computed elsewhere (``avel-extract import-h5``)."""
    spec = str(spec).strip()
    if spec == "random":
        return WeightsSource(kind=kind, name="random", path=None, sha256="random", seed=int(seed)).identity()
    canon = ALTERNATES.get(kind, {}).get(spec) or (CANONICAL[kind] if spec in CANONICAL[kind].specs else None)
    if canon is not None:
        known = next((k for k in KNOWN_FILES if k.kind == kind and k.filename == canon.filename), None)
        if known is None:  # every canonical file is in the table (tests/test_ave2018.py checks it)
            raise ValueError(f"{kind} weights {spec!r}: {canon.filename} is not in the known-files table")
        return known_identity(known.logical)
    return resolve_weights(spec, kind, seed=seed).identity()
