"""FedAvg over LoRA state dicts, plus the round schedule, reply screening, communication ledger,
metrics, checkpoints and the per-round resumable state. Aggregation itself is Flower's FedAvg."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from safetensors import SafetensorError

from flowertune_nlp import faults
from flowertune_nlp import messages as wire
from flowertune_nlp.adapter_fit import adapter_mismatch
from flowertune_nlp.comm import BUDGET_MB, MB, CommLedger, cast_record
from flowertune_nlp.config import AppConfig
from flowertune_nlp.nodes import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    NodeDirectory,
    NodeInfo,
    Source,
    clients_per_round,
    sample_sources,
)
from flowertune_nlp.outputs import RunOutputs
from flowertune_nlp.run_state import RoundState, save_round_state

log = logging.getLogger(__name__)
QUERY_TIMEOUT = 120.0  # a deployment node answers a query in about 5 s (a fresh process)


class RoundSaveError(RuntimeError):
    """A round's checkpoint or state could not be written (disk full, I/O error)."""


class RunStopped(RuntimeError):
    """Too many rounds in a row had no usable reply; the state is saved and resumable."""


def round_learning_rate(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Cosine annealing across rounds, as in the FlowerTune baseline; constant inside a round."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


def screen_update(update: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why a client's adapter must not be averaged in (wrong keys, shapes or dtype, non-finite
    values), or None when it is sound."""
    return adapter_mismatch(update, reference, dtype_of=lambda array: array.dtype,
                            is_finite=lambda array: bool(np.isfinite(array.numpy()).all()))


def short_reason(reason: str, limit: int = 300) -> str:
    """The client's own error message out of the Ray traceback Flower wraps it in."""
    marker = "Message: "
    text = reason[reason.rindex(marker) + len(marker):] if marker in reason else reason
    text = text.strip().rstrip("'>").strip()
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Assignment:
    """One train message of a round: which source it trains on which node."""

    source: Source
    node: NodeInfo


class FlowerTuneFedAvg(FedAvg):
    """FedAvg that samples data sources reproducibly and hands them to nodes, screens replies,
    keeps the ledger, writes metrics.jsonl, saves PEFT checkpoints and the resumable state
    after every round.

    Flower's `Strategy.start` always counts rounds from 1; a resumed run passes the number of
    rounds left and `resumed`, and every round number here is shifted by the resumed round.
    """

    def __init__(self, config: AppConfig, outputs: RunOutputs, nodes: NodeDirectory,
                 resumed: RoundState | None = None) -> None:
        super().__init__(
            fraction_train=config.strategy.fraction_train,
            fraction_evaluate=config.strategy.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.ARRAYS,
            configrecord_key=wire.CONFIG,
        )
        self.config = config
        self.outputs = outputs
        self.nodes = nodes
        self.round_offset = resumed.server_round if resumed else 0
        self.ledger = resumed.ledger if resumed else CommLedger()
        self.empty_rounds = resumed.empty_rounds if resumed else 0
        self.global_arrays: ArrayRecord | None = None  # fp32, what the server keeps
        self.sent_arrays: ArrayRecord | None = None  # in the transport dtype
        self._round_started = 0.0
        self._round_lr = 0.0
        self._sent: list[tuple[Message, Assignment]] = []

    @property
    def rounds_left(self) -> int:
        return self.config.num_server_rounds - self.round_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        t = self.config.train
        self._round_started = time.perf_counter()
        self._round_lr = round_learning_rate(
            server_round, self.config.num_server_rounds, t.learning_rate_max, t.learning_rate_min
        )
        self.global_arrays = arrays
        self.sent_arrays = cast_record(arrays, self.config.comm.transport)
        self.nodes.update(self.nodes.connected(server_round), timeout=QUERY_TIMEOUT)
        sources = self.nodes.sources()
        if not sources:
            raise RunStopped(
                f"round {server_round}: no node that can train connected within "
                f"federation.wait-seconds = {self.config.federation.wait_seconds:g} s "
                f"(refused: {list(self.nodes.refused.values())[:2]}). Start the nodes, then "
                f'resume with run.resume="{self.outputs.directory}"')
        sampled = sample_sources(self.config.seed, server_round, sources,
                                 clients_per_round(len(sources), self.config.strategy
                                                   .fraction_train))
        assignments = [Assignment(s, n) for s, n in self.nodes.assign(sampled)]
        log.info("round %d/%d: %s train at lr %.3g", server_round, self.config.num_server_rounds,
                 ", ".join(f"{a.source.label} on {a.node.name}" for a in assignments),
                 self._round_lr)
        self._sent = []
        for assignment in assignments:
            settings = ConfigRecord({**config, wire.SERVER_ROUND: server_round,
                                     wire.LEARNING_RATE: self._round_lr})
            if assignment.source.partition is not None:
                settings[PARTITION_ID_KEY] = assignment.source.partition
                settings[NUM_PARTITIONS_KEY] = self.config.dataset.num_partitions
            content = RecordDict({self.arrayrecord_key: self.sent_arrays,
                                  self.configrecord_key: settings})
            message = Message(content=content, dst_node_id=assignment.node.node_id,
                              message_type=MessageType.TRAIN)
            self._sent.append((message, assignment))
        self.ledger.record_download(server_round, self.sent_arrays, len(self._sent))
        return [message for message, _ in self._sent]

    def _assignment_of(self, reply: Message) -> Assignment:
        """The assignment a reply answers (grids set message ids when they push)."""
        for message, assignment in self._sent:
            if message.metadata.message_id == reply.metadata.reply_to_message_id:
                return assignment
        raise RuntimeError(f"a reply from node {reply.metadata.src_node_id} answers no message "
                           "of this round")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        # Sorted by source, so the average is summed in the same order in every run.
        answered = sorted(((self._assignment_of(m), m) for m in replies),
                          key=lambda pair: pair[0].source.sort_key)
        failures = [f"{a.source.label}: {short_reason(m.error.reason)}"
                    for a, m in answered if m.has_error()]
        answered_ids = {m.metadata.reply_to_message_id for _, m in answered}
        failures += [f"{a.source.label}: no reply from node {a.node.name}"
                     for sent, a in self._sent if sent.metadata.message_id not in answered_ids]
        succeeded = [(a, m) for a, m in answered if not m.has_error()]
        received = [m.content.array_records[self.arrayrecord_key] for _, m in succeeded]
        self.ledger.record_uploads(server_round, received)
        accepted: list[tuple[Assignment, Message]] = []
        rejections = []
        for (assignment, message), update in zip(succeeded, received, strict=True):
            reason = screen_update(update, self.sent_arrays)
            if reason is None:
                # Flower's FedAvg averages in the replies' dtype; average fp16 uploads in fp32.
                message.content.array_records[self.arrayrecord_key] = cast_record(update, "fp32")
                accepted.append((assignment, message))
            else:
                rejections.append(f"{assignment.source.label}: {reason}")
                log.warning("round %d: rejected an update (%s)", server_round, rejections[-1])
        arrays, metrics = super().aggregate_train(server_round, [m for _, m in accepted])
        if arrays is None:
            self.empty_rounds += 1
            log.warning("round %d: no usable reply (%d failed, %d rejected); keeping the previous "
                        "global adapter", server_round, len(failures), len(rejections))
            arrays = self.global_arrays
        else:
            self.empty_rounds = 0
        self.global_arrays = arrays
        self._finish_round(server_round, arrays, accepted, failures, rejections, metrics)
        if self.empty_rounds >= self.config.run.max_empty_rounds:
            raise RunStopped(
                f"{self.empty_rounds} rounds in a row (up to round {server_round}) had no usable "
                f"client reply (run.max-empty-rounds = {self.config.run.max_empty_rounds}); last "
                f"failures {failures[:2]}, rejections {rejections[:2]}. The state of round "
                f"{server_round} is saved: fix the clients, then resume with "
                f"run.resume=\"{self.outputs.directory}\""
            )
        return arrays, metrics

    def _finish_round(self, server_round, arrays, accepted, failures, rejections, metrics) -> None:
        """Write checkpoint, metrics row and resumable state, in that order: the state is what a
        resume trusts, so it is written last, once everything else of the round is on disk."""
        last = server_round == self.config.num_server_rounds
        disk_full = faults.server_disk_full(self.config.faults, server_round)
        try:
            with faults.simulated_disk_full() if disk_full else contextlib.nullcontext():
                state = arrays.to_torch_state_dict()
                if server_round % self.config.train.save_every_round == 0 or last:
                    path = self.outputs.save_checkpoint(server_round, state)
                    log.info("round %d: saved global adapter to %s", server_round, path)
                self._log_round(server_round, accepted, failures, rejections, metrics)
                save_round_state(self.outputs.directory, RoundState(
                    server_round, state, self.config.to_dict(), self.ledger,
                    self.outputs.metrics, self.empty_rounds))
        except (OSError, SafetensorError) as err:
            kept = (f"the state of round {server_round - 1} is intact: free disk space, then "
                    f'resume with run.resume="{self.outputs.directory}"' if server_round > 1
                    else "no round was saved yet: free disk space and start the run again")
            raise RoundSaveError(f"saving round {server_round} in {self.outputs.directory} "
                                 f"failed ({err}); no complete file was replaced and {kept}"
                                 ) from err

    def _log_round(self, server_round, accepted, failures, rejections, metrics) -> None:
        client_metrics = [m.content.metric_records[wire.METRICS] for _, m in accepted]
        round_mb = self.ledger.round_bytes(server_round) / MB
        total_mb = self.ledger.total_bytes / MB
        row = {
            "round": server_round,
            "partitions": [a.source.partition for _, a in self._sent
                           if a.source.partition is not None],
            "sources": [a.source.label for _, a in self._sent],
            "nodes": [a.node.name for _, a in self._sent],
            "train_loss": None if metrics is None else float(metrics[wire.TRAIN_LOSS]),
            "clients": len(accepted),
            "failures": len(failures),
            "failure_reasons": failures,
            "rejected": len(rejections),
            "rejection_reasons": rejections,
            "kept_previous_global": not accepted,
            "examples": int(sum(m[wire.NUM_EXAMPLES] for m in client_metrics)),
            "examples_dropped": int(sum(m[wire.EXAMPLES_DROPPED] for m in client_metrics)),
            "client_seconds_max": max((float(m[wire.SECONDS]) for m in client_metrics),
                                      default=0.0),
            "client_train_seconds_sum": sum(float(m[wire.TRAIN_SECONDS]) for m in client_metrics),
            "precision": sorted({m.content.config_records[wire.INFO][wire.PRECISION]
                                 for _, m in accepted}),
            "learning_rate": self._round_lr,
            "comm_bytes_round": self.ledger.round_bytes(server_round),
            "comm_bytes_total": self.ledger.total_bytes,
            "comm_mb_round": round_mb,
            "comm_mb_total": total_mb,
            "wall_seconds": time.perf_counter() - self._round_started,
        }
        self.outputs.append_metrics(row)
        log.info(
            "round %d: loss %s, %d clients (%d failed, %d rejected), comm %.2f MB this round, "
            "%.2f MB total (%.4f%% of the %.0f MB budget)", server_round, row["train_loss"],
            row["clients"], row["failures"], row["rejected"], round_mb, total_mb,
            100 * total_mb / BUDGET_MB, BUDGET_MB,
        )
