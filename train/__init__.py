"""Stage 2: train localization heads on a feature store (``avel-train``).

Importing the package registers its configuration sections (``train``, ``heads``, ``sol``, see
:mod:`train.config`), so every module that reads a pipeline can rely on them.
"""
from . import config as _config  # noqa: F401 - registers the sections of this stage

from extract.core.aliases import install as _install  # noqa: E402

#: old module path -> the module it now is (docs/layers.md, "Module -> floor"); ``train.predict``
#: itself is now the package of the join floor: its former contents are :mod:`train.predict.run`
MOVED = {
    "train.predict_cli": "train.predict.cli",
    "train.predict_plots": "train.predict.plots",
    "train.gpucheck": "train.predict.gpucheck",
}
_install(MOVED)
