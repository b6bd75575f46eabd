"""Localization heads. Each module that registers heads is named in setup.cfg's ``avel.heads``
entry points and imported by :func:`train.registry.discover` (docs/layers.md, "One plugin mechanism")."""
