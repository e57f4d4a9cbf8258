"""FedAvg over LoRA state dicts, plus the round schedule, communication ledger, metrics and
checkpoints. Aggregation itself is Flower's FedAvg."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flowertune_nlp.comm import BUDGET_MB, MB, CommLedger
from flowertune_nlp.config import AppConfig
from flowertune_nlp.outputs import RunOutputs

log = logging.getLogger(__name__)


def round_learning_rate(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Cosine annealing across rounds, as in the FlowerTune baseline; constant inside a round."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


class FlowerTuneFedAvg(FedAvg):
    """FedAvg that also keeps the ledger, writes metrics.jsonl and saves PEFT checkpoints."""

    def __init__(self, config: AppConfig, outputs: RunOutputs) -> None:
        super().__init__(
            fraction_train=config.strategy.fraction_train,
            fraction_evaluate=config.strategy.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=config.dataset.num_partitions,
        )
        self.config = config
        self.outputs = outputs
        self.ledger = CommLedger()
        self.global_arrays: ArrayRecord | None = None
        self._round_started = 0.0
        self._round_lr = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        t = self.config.train
        self._round_lr = round_learning_rate(
            server_round, self.config.num_server_rounds, t.learning_rate_max, t.learning_rate_min
        )
        config["lr"] = self._round_lr
        self._round_started = time.perf_counter()
        self.global_arrays = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.ledger.record_download(server_round, arrays, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        succeeded = [m for m in replies if not m.has_error()]
        failures = [m.error.reason for m in replies if m.has_error()]
        self.ledger.record_uploads(
            server_round, [m.content.array_records["arrays"] for m in succeeded]
        )
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            log.warning("round %d: no successful reply; keeping the previous global adapter",
                        server_round)
            arrays = self.global_arrays
        self.global_arrays = arrays
        self._log_round(server_round, succeeded, failures, metrics)
        last = server_round == self.config.num_server_rounds
        if server_round % self.config.train.save_every_round == 0 or last:
            path = self.outputs.save_checkpoint(server_round, arrays.to_torch_state_dict())
            log.info("round %d: saved global adapter to %s", server_round, path)
        return arrays, metrics

    def _log_round(self, server_round, succeeded, failures, metrics) -> None:
        client_metrics = [m.content.metric_records["metrics"] for m in succeeded]
        round_mb = self.ledger.round_bytes(server_round) / MB
        total_mb = self.ledger.total_bytes / MB
        row = {
            "round": server_round,
            "train_loss": None if metrics is None else float(metrics["train_loss"]),
            "clients": len(succeeded),
            "failures": len(failures),
            "failure_reasons": failures,
            "examples": int(sum(m["num-examples"] for m in client_metrics)),
            "examples_dropped": int(sum(m["examples-dropped"] for m in client_metrics)),
            "client_seconds_max": max((float(m["seconds"]) for m in client_metrics), default=0.0),
            "precision": sorted({m.content.config_records["info"]["precision"]
                                 for m in succeeded}),
            "learning_rate": self._round_lr,
            "comm_bytes_round": self.ledger.round_bytes(server_round),
            "comm_bytes_total": self.ledger.total_bytes,
            "comm_mb_round": round_mb,
            "comm_mb_total": total_mb,
            "wall_seconds": time.perf_counter() - self._round_started,
        }
        self.outputs.append_metrics(row)
        log.info(
            "round %d: loss %s, %d clients (%d failed), comm %.2f MB this round, %.2f MB total "
            "(%.4f%% of the %.0f MB budget)", server_round, row["train_loss"], row["clients"],
            row["failures"], round_mb, total_mb, 100 * total_mb / BUDGET_MB, BUDGET_MB,
        )
