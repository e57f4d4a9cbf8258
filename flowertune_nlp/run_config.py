"""Merging run configs: TOML files, 'key=value' overrides and mappings into one flat mapping."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flowertune_nlp.config import ConfigError


def merge_run_configs(run_configs: list[str | Mapping[str, Any]]) -> dict:
    """Fuse TOML files, 'key=value' overrides and mappings (later wins) into one flat mapping.

    `flwr run` refuses a TOML file alongside key-value pairs; a preset plus a local dataset
    path is exactly what an offline user needs, so the launcher merges them first.
    """
    import click
    from flwr.common.config import parse_config_args

    merged: dict = {}
    for run_config in run_configs:
        if isinstance(run_config, Mapping):  # callers in Python (benchmarks, tests)
            merged.update(run_config)
            continue
        # Flower silently skips text that is not key=value (`seed=` would start a run on the
        # defaults), so every whitespace-separated token, quoted values emptied, must be one.
        tokens = re.sub(r"'[^']*'|\"[^\"]*\"", '""', run_config).split()
        stray = [t for t in tokens if not re.fullmatch(r"[^=\s]+=\S+", t)]
        if not run_config.endswith(".toml") and stray:
            raise ConfigError(f"--run-config {run_config!r}: {stray[0]!r} is not key=value; "
                              'write e.g. seed=7 or model.name="path/to/model"')
        try:
            merged.update(parse_config_args([run_config]))
        except (click.ClickException, ValueError, OSError) as err:
            message = err.format_message() if isinstance(err, click.ClickException) else err
            raise ConfigError(f"--run-config {run_config!r}: {message}") from None
    return merged
