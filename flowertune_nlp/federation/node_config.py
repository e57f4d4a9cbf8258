"""What `flower-supernode --node-config` takes: parsed and written the way Flower reads it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def parse_node_config(text: str) -> dict[str, Any]:
    """'k="v" n=3' -> {"k": "v", "n": 3}, with Flower's own parser; text Flower would skip
    silently (a token that is not key=value) is refused instead."""
    import click
    from flwr.common.config import parse_config_args

    tokens = re.sub(r"'[^']*'|\"[^\"]*\"", '""', text).split()
    stray = [t for t in tokens if not re.fullmatch(r"[^=\s]+=\S+", t)]
    if stray:
        raise ValueError(f"--node-config {text!r}: {stray[0]!r} is not key=value; write e.g. "
                         'data-path="/data/local.jsonl" or partition-id=0 num-partitions=3')
    try:
        return parse_config_args([text]) if text.strip() else {}
    except click.ClickException as err:
        raise ValueError(f"--node-config {text!r}: {err.format_message()}") from None


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # Flower splits the option with a regex that ends a quoted value at the next quote.
        if '"' in value:
            raise ValueError(f"node-config {key}: a value may not contain a double quote")
        return '"' + value.replace("\\", "\\\\") + '"'
    raise ValueError(f"node-config {key}: {type(value).__name__} values are not supported "
                     "(use str, int, float or bool)")


def format_node_config(config: Mapping[str, Any]) -> str:
    """{"name": "site-1", "partition-id": 0} -> 'name="site-1" partition-id=0'."""
    parts = []
    for key, value in config.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"node-config key {key!r}: use letters, digits, '-', '_' or '.'")
        parts.append(f"{key}={_toml_value(key, value)}")
    return " ".join(parts)
