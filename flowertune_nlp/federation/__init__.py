"""Flower 1.42 Deployment Engine tooling: credentials, the Fleet-only proxy, a local federation.

    python -m flowertune_nlp.federation credentials --out DIR --hosts 127.0.0.1,localhost --nodes 3
    python -m flowertune_nlp.federation proxy-config --certificate P --key K --ca C --out FILE
    python -m flowertune_nlp.federation up --dir DIR --nodes 3 [--proxy] [--node-config ...]
    python -m flowertune_nlp.federation status --dir DIR
    python -m flowertune_nlp.federation down --dir DIR

The credentials are for prototyping only; production uses the organisation's PKI.
"""

from flowertune_nlp.federation.credentials import (
    Credentials,
    CredentialsExist,
    ensure_node_keys,
    make_credentials,
    make_node_key,
    subject_alternative_names_of,
)
from flowertune_nlp.federation.local import DEFAULT_NAME, LocalFederation, Node
from flowertune_nlp.federation.node_config import format_node_config, parse_node_config
from flowertune_nlp.federation.processes import (
    MARKER,
    FederationError,
    federation_status,
    marked_processes,
    read_record,
    stop_federation,
)
from flowertune_nlp.federation.proxy import render_site

__all__ = [
    "DEFAULT_NAME", "MARKER", "Credentials", "CredentialsExist", "FederationError",
    "LocalFederation",
    "Node", "ensure_node_keys", "federation_status", "format_node_config", "make_credentials",
    "make_node_key", "marked_processes", "parse_node_config", "read_record", "render_site",
    "stop_federation", "subject_alternative_names_of",
]
