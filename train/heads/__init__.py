"""Localization heads. Every module here is imported by :func:`train.registry.discover`."""
