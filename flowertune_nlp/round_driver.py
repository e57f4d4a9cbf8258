"""The round driver: the round schedule, sampling sources and assigning them to nodes, reply
screening, the communication ledger, metrics, checkpoints and the per-round resumable state,
around any Flower Message-API strategy (the aggregation rule, aggregation.py) that turns the
accepted replies into the next global adapter."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError

from flowertune_nlp import faults
from flowertune_nlp import messages as wire
from flowertune_nlp.adapter_fit import adapter_mismatch
from flowertune_nlp.aggregation import accountant_of, load_rule_state, rule_state
from flowertune_nlp.comm import CommLedger, cast_record
from flowertune_nlp.config import AppConfig, clients_per_round, planned_clients_per_round
from flowertune_nlp.heldout import HeldOutScore
from flowertune_nlp.nodes import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    NodeDirectory,
    NodeInfo,
    Source,
    sample_sources,
)
from flowertune_nlp.outputs import RunOutputs, round_row
from flowertune_nlp.privacy import PrivacyPolicy
from flowertune_nlp.run_state import RoundState, save_round_state

log = logging.getLogger(__name__)
QUERY_TIMEOUT = 120.0  # a deployment node answers a query in about 5 s (a fresh process)


class RoundSaveError(RuntimeError):
    """A round's checkpoint or state could not be written (disk full, I/O error)."""


class RunStopped(RuntimeError):
    """The run cannot go on now (no usable replies for too long, no nodes, the privacy budget
    spent); the state of the last completed round is saved and resumable."""


def round_learning_rate(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Cosine annealing across rounds, as in the FlowerTune baseline; constant inside a round."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


def screen_update(update: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why a client's adapter must not be averaged in (wrong keys, shapes or dtype, non-finite
    values), or None when it is sound."""
    return adapter_mismatch(update, reference, dtype_of=lambda array: array.dtype,
                            is_finite=lambda array: bool(np.isfinite(array.numpy()).all()))


def short_reason(reason: str, limit: int = 300) -> str:
    """The client's own error message out of what Flower wraps it in: a Ray traceback
    (simulation) or "<class 'T'>:<'message'>" (a deployment's flwr-clientapp)."""
    marker = "Message: "
    if marker in reason:
        text = reason[reason.rindex(marker) + len(marker):]
    elif reason.startswith("<class '") and "'>:<'" in reason:
        text = reason.split("'>:<'", 1)[1]
    else:
        text = reason
    text = text.strip().rstrip("'>").strip()
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Assignment:
    """One train message of a round: which source it trains on which node."""

    source: Source
    node: NodeInfo


class _RuleGrid:
    """What the rule sees of the grid in `configure_train`: exactly the messages the driver
    will send, so the rule adds its settings (FedProx's mu, a DP clipping norm) and takes its
    per-round state (FedOpt's current arrays, the accountant's pending release) for them."""

    def __init__(self, num_messages: int) -> None:
        self.num_messages = num_messages

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_messages + 1))


class RoundDriver(Strategy):
    """Samples data sources reproducibly and hands them to nodes, screens replies, lets the
    rule aggregate the accepted ones, keeps the ledger, writes metrics.jsonl, saves PEFT
    checkpoints and the resumable state (the rule's included) after every round.

    Flower's `Strategy.start` always counts rounds from 1; a resumed run passes the number of
    rounds left and `resumed`, and every round number here is shifted by the resumed round.
    """

    def __init__(self, config: AppConfig, outputs: RunOutputs, nodes: NodeDirectory,
                 rule: Strategy, resumed: RoundState | None = None,
                 heldout: Callable[[dict], HeldOutScore] | None = None) -> None:
        super().__init__()
        self.config = config
        self.heldout = heldout
        self.outputs = outputs
        self.nodes = nodes
        self.rule = rule
        self.round_offset = resumed.server_round if resumed else 0
        self.ledger = resumed.ledger if resumed else CommLedger()
        self.empty_rounds = resumed.empty_rounds if resumed else 0
        values = dict(resumed.rule_values) if resumed else {}
        # The policy takes the noise secret out of `values`; what is left is the rule's state.
        self.privacy = PrivacyPolicy(config, rule, accountant_of(rule), values)
        if resumed:
            load_rule_state(rule, resumed.rule_arrays, values)
        self.global_arrays: ArrayRecord | None = None  # fp32, what the server keeps
        self.sent_arrays: ArrayRecord | None = None  # in the transport dtype
        self._round_started = 0.0
        self._round_lr = 0.0
        self._sent: list[tuple[Message, Assignment]] = []
        self._pending_row: dict = {}
        self._evaluated: list[tuple[Message, Assignment]] = []

    @property
    def rounds_left(self) -> int:
        return self.config.num_server_rounds - self.round_offset

    def summary(self) -> None:
        self.rule.summary()

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
        planned = planned_clients_per_round(self.config)
        refusal = self.privacy.refusal(server_round, len(assignments), planned)
        if refusal:
            raise RunStopped(f'{refusal}; resume with run.resume="{self.outputs.directory}"')
        planned_messages = list(self.rule.configure_train(
            server_round, arrays, ConfigRecord(dict(config)), _RuleGrid(len(assignments))))
        rule_settings = (dict(planned_messages[0].content.config_records[wire.CONFIG])
                         if planned_messages else {})
        log.info("round %d/%d: %s train at lr %.3g", server_round, self.config.num_server_rounds,
                 ", ".join(f"{a.source.label} on {a.node.name}" for a in assignments),
                 self._round_lr)
        self._sent = self._messages(assignments, MessageType.TRAIN, {
            **rule_settings, wire.SERVER_ROUND: server_round, wire.LEARNING_RATE: self._round_lr,
            wire.PRIVACY_MODE: self.config.privacy.mode})
        self.ledger.record_download(server_round, self.sent_arrays, len(self._sent))
        return [message for message, _ in self._sent]

    def _messages(self, assignments: list[Assignment], message_type: str, settings: dict
                  ) -> list[tuple[Message, Assignment]]:
        """One message per assignment: the global adapter in the transport dtype, the round's
        settings and, for a partition, which one."""
        messages = []
        for assignment in assignments:
            config = ConfigRecord(dict(settings))
            if assignment.source.partition is not None:
                config[PARTITION_ID_KEY] = assignment.source.partition
                config[NUM_PARTITIONS_KEY] = self.config.dataset.num_partitions
            content = RecordDict({wire.ARRAYS: self.sent_arrays, wire.CONFIG: config})
            messages.append((Message(content=content, dst_node_id=assignment.node.node_id,
                                     message_type=message_type), assignment))
        return messages

    def _assignment_of(self, reply: Message) -> Assignment:
        """The assignment a reply answers (grids set message ids when they push)."""
        for message, assignment in self._sent:
            if message.metadata.message_id == reply.metadata.reply_to_message_id:
                return assignment
        raise RuntimeError(f"a reply from node {reply.metadata.src_node_id} answers no message "
                           "of this round")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        # Sorted by source, so the rule sees the replies in the same order in every run.
        answered = sorted(((self._assignment_of(m), m) for m in replies),
                          key=lambda pair: pair[0].source.sort_key)
        failures = [f"{a.source.label}: {short_reason(m.error.reason)}"
                    for a, m in answered if m.has_error()]
        for assignment, message in answered:  # a node failing on its data is left out
            self.nodes.record_train_reply(assignment.node, short_reason(message.error.reason)
                                          if message.has_error() else None)
        answered_ids = {m.metadata.reply_to_message_id for _, m in answered}
        failures += [f"{a.source.label}: no reply from node {a.node.name}"
                     for sent, a in self._sent if sent.metadata.message_id not in answered_ids]
        succeeded = [(a, m) for a, m in answered if not m.has_error()]
        received = [m.content.array_records[wire.ARRAYS] for _, m in succeeded]
        self.ledger.record_uploads(server_round, received)
        accepted: list[tuple[Assignment, Message]] = []
        rejections = []
        equal_weights = self.privacy.equal_weights
        for (assignment, message), update in zip(succeeded, received, strict=True):
            reason = screen_update(update, self.sent_arrays)
            if reason is None:
                # Rules combine in the replies' dtype; fp16 uploads are combined in fp32.
                message.content.array_records[wire.ARRAYS] = cast_record(update, "fp32")
                metrics = message.content.metric_records[wire.METRICS]
                metrics[wire.AGGREGATION_WEIGHT] = (
                    1.0 if equal_weights else float(metrics[wire.NUM_EXAMPLES]))
                accepted.append((assignment, message))
            else:
                rejections.append(f"{assignment.source.label}: {reason}")
                log.warning("round %d: rejected an update (%s)", server_round, rejections[-1])
        client_metrics = [m.content.metric_records[wire.METRICS] for _, m in accepted]
        arrays, metrics = self.privacy.aggregate(server_round, [m for _, m in accepted])
        if arrays is None:
            self.empty_rounds += 1
            log.warning("round %d: no usable reply (%d failed, %d rejected); keeping the previous "
                        "global adapter", server_round, len(failures), len(rejections))
            arrays = self.global_arrays
        else:
            self.empty_rounds = 0
            arrays = cast_record(arrays, "fp32")  # FedOpt's arithmetic may widen to fp64
        self.global_arrays = arrays
        self._pending_row = round_row(
            server_round, self.config.strategy.name, [a for _, a in self._sent],
            client_metrics, sorted({m.content.config_records[wire.INFO][wire.PRECISION]
                                    for _, m in accepted}),
            failures, rejections, kept_previous=self.empty_rounds > 0, ledger=self.ledger,
            learning_rate=self._round_lr, privacy=self.privacy.spent())
        return arrays, metrics

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's `evaluate_fn`, called after each round's training and federated evaluation
        (and once before round 1, for the base): score the global adapter on the held-out rows,
        then write the round's checkpoint, metrics row and resumable state."""
        if server_round == 0:  # the base model (a resumed run scored it when it started)
            if self.heldout is None or self.round_offset:
                return None
            base = self.heldout(arrays.to_torch_state_dict()).as_row()
            log.info("round 0 (base model): held-out loss %.4f [%.4f, %.4f]",
                     base["heldout_loss"], base["heldout_loss_ci_low"],
                     base["heldout_loss_ci_high"])
            self.outputs.record["heldout_base"] = base
            self.outputs.write_record()
            return MetricRecord(base)
        server_round += self.round_offset
        row = self._pending_row
        scored = {}
        if self.heldout is not None:
            scored = self.heldout(arrays.to_torch_state_dict()).as_row()
            row.update(scored)
        if self.config.strategy.fraction_evaluate > 0:
            row.update(comm_eval_bytes_round=self.ledger.evaluation.get(server_round, 0),
                       comm_eval_bytes_total=sum(self.ledger.evaluation.values()))
        row["wall_seconds"] = time.perf_counter() - self._round_started
        self._finish_round(server_round, arrays, row)
        if self.empty_rounds >= self.config.run.max_empty_rounds:
            raise RunStopped(
                f"{self.empty_rounds} rounds in a row (up to round {server_round}) had no usable "
                f"client reply (run.max-empty-rounds = {self.config.run.max_empty_rounds}); last "
                f"failures {row['failure_reasons'][:2]}, rejections "
                f"{row['rejection_reasons'][:2]}. The state of round {server_round} is saved: "
                f'fix the clients, then resume with run.resume="{self.outputs.directory}"'
            )
        return MetricRecord(scored) if scored else None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation: sampled sources score the new global adapter on their own
        held-back rows (the clients' `evaluate`)."""
        self._evaluated = []
        fraction = self.config.strategy.fraction_evaluate
        sources = self.nodes.sources()
        if fraction == 0 or not sources:
            return []
        server_round += self.round_offset
        sampled = sample_sources(self.config.seed, server_round, sources,
                                 clients_per_round(len(sources), fraction), purpose="evaluate")
        self.sent_arrays = cast_record(arrays, self.config.comm.transport)
        self._evaluated = self._messages(
            [Assignment(s, n) for s, n in self.nodes.assign(sampled)], MessageType.EVALUATE,
            {**config, wire.SERVER_ROUND: server_round})
        self.ledger.record_evaluation(server_round, self.sent_arrays, len(self._evaluated))
        return [message for message, _ in self._evaluated]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """The clients' losses, weighted by their scored tokens, into the round's row."""
        if not self._evaluated:
            return None
        replies = list(replies)
        by_id = {m.metadata.message_id: a for m, a in self._evaluated}
        scored = [m for m in replies if not m.has_error()]
        failures = [f"{by_id[m.metadata.reply_to_message_id].source.label}: "
                    f"{short_reason(m.error.reason)}" for m in replies if m.has_error()]
        failures += [f"{a.source.label}: no reply from node {a.node.name}"
                     for m, a in self._evaluated
                     if m.metadata.message_id not in {r.metadata.reply_to_message_id
                                                      for r in replies}]
        tokens = [float(m.content.metric_records[wire.METRICS][wire.EVAL_TOKENS]) for m in scored]
        losses = [float(m.content.metric_records[wire.METRICS][wire.EVAL_LOSS]) for m in scored]
        result = {"federated_eval_clients": len(scored),
                  "federated_eval_failures": failures,
                  "federated_eval_examples": int(sum(
                      m.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES] for m in scored)),
                  "federated_eval_loss": (sum(t * v for t, v in zip(tokens, losses, strict=True))
                                          / sum(tokens) if scored else None)}
        self._pending_row.update(result)
        return MetricRecord({k: v for k, v in result.items() if isinstance(v, (int, float))})

    def _finish_round(self, server_round: int, arrays: ArrayRecord, row: dict) -> None:
        """Write checkpoint, metrics row and resumable state, in that order: the state is what a
        resume trusts, so it is written last, once everything else of the round is on disk."""
        last = server_round == self.config.num_server_rounds
        disk_full = faults.server_disk_full(self.config.faults, server_round)
        try:
            with faults.simulated_disk_full() if disk_full else contextlib.nullcontext():
                state = arrays.to_torch_state_dict()
                if server_round % self.config.train.save_every_round == 0 or last:
                    path = self.outputs.save_checkpoint(server_round, state, row)
                    log.info("round %d: saved global adapter to %s", server_round, path)
                self.outputs.append_round(row)
                rule_arrays, rule_values = rule_state(self.rule)
                rule_values.update(self.privacy.state_values())
                save_round_state(self.outputs.directory, RoundState(
                    server_round, state, self.config.to_dict(), self.ledger,
                    self.outputs.metrics, self.empty_rounds, rule_arrays, rule_values))
        except (OSError, SafetensorError) as err:
            kept = (f"the state of round {server_round - 1} is intact: free disk space, then "
                    f'resume with run.resume="{self.outputs.directory}"' if server_round > 1
                    else "no round was saved yet: free disk space and start the run again")
            raise RoundSaveError(f"saving round {server_round} in {self.outputs.directory} "
                                 f"failed ({err}); no complete file was replaced and {kept}"
                                 ) from err
