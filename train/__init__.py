"""Stage 2: train localization heads on a feature store (``avel-train``).

Importing the package registers its configuration sections (``train``, ``heads``, ``sol``, see
:mod:`train.config`), so every module that reads a pipeline can rely on them.
"""
from . import config as _config  # noqa: F401 - registers the sections of this stage
