"""Route this package's log records through Flower's handler so they show in `flwr run --stream`."""

import logging


def use_flower_log_handlers() -> None:
    package = logging.getLogger("flowertune_nlp")
    package.setLevel(logging.INFO)
    package.handlers = list(logging.getLogger("flwr").handlers)
    package.propagate = not package.handlers
