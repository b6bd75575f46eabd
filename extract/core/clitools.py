"""Pieces shared by the two CLIs (`avel-extract`, `avel-train`): logging set-up, configuration
resolution (pipeline.yaml <- CLI options <- --set) and the common click options.

Imports click and :mod:`extract.core.settings` only.
"""
from __future__ import annotations

import logging

import click

from .settings import ConfigError, load_pipeline, parse_set_option


def setup_logging(verbose: int) -> None:
    """INFO by default, DEBUG with -v or more. Only the CLIs configure logging."""
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # Dask's own INFO lines (cluster start, worker registration) only with -v
        import os

        # read by distributed when it is imported, here and in the worker processes it starts
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        for name in ("distributed", "dask"):
            logging.getLogger(name).setLevel(logging.WARNING)


def resolve(config: str | None, sets: tuple[str, ...], extra: dict | None = None):
    """pipeline.yaml (or --config) <- CLI options (``extra``) <- --set, as a Pipeline;
    a ConfigError becomes a click usage error."""
    overrides: dict = {}
    try:
        for source in (extra or {}, parse_set_option(sets)):
            for sec, values in source.items():
                if isinstance(values, dict) and isinstance(overrides.get(sec), dict):
                    overrides[sec].update(values)
                else:
                    overrides[sec] = dict(values) if isinstance(values, dict) else values
        pipeline = load_pipeline(config, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from .settings import cache_root

    env_cache = cache_root()  # $AVEL_CACHE, or None
    if env_cache is not None and hasattr(pipeline, "store"):  # show (and use) what really applies
        pipeline.store.cache_root = str(env_cache)
    return pipeline


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None,
    help="pipeline.yaml to use (default: $AVEL_PIPELINE, else ./pipeline.yaml, else built-in defaults).",
)
set_option = click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE",
    help="Override any config key, e.g. --set train.lr=0.0005 or --set extract.batch_frames=64 (repeatable).",
)
verbose_option = click.option("-v", "--verbose", count=True, help="More log output (-v for debug).")
