"""The aggregation rule chosen by `strategy.name` (Flower 1.42's Message-API strategies, and
FlexLoRA), wrapped in Flower's differential-privacy strategy when `privacy.mode` asks for it;
and the rule's state (optimiser moments, momentum, adaptive clipping norm, privacy accountant)
as plain arrays and values, so a resumed run continues exactly.

The round driver (round_driver.py) samples, screens and books; the rule only turns accepted
replies into the next global adapter. It is built to sample every message the driver hands it
(`fraction_train` 1.0): sampling sources by (seed, round) is the driver's job.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase

from flowertune_nlp import messages as wire
from flowertune_nlp.config import AppConfig
from flowertune_nlp.flexlora import flexlora_aggregate
from flowertune_nlp.privacy import private

# Attributes of Flower's strategies that carry state from one round to the next; everything
# else they hold is set from the config or from the round's own arrays. (The clipping norm is
# state only where adaptive clipping moves it; a fixed one comes from the config.)
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")
ADAPTIVE_ATTRIBUTES = ("clipping_norm",)


class FlexLoRA(FedAvg):
    """FedAvg's sampling and metrics, FlexLoRA's arrays (see flexlora.py)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # FedAvg's own reply check (a private method of the pinned flwr 1.42), as its
        # subclasses in Flower use it.
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [reply.content for reply in valid]
        states = [{k: v.numpy() for k, v in c.array_records[self.arrayrecord_key].items()}
                  for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key])
                   for c in contents]
        merged = flexlora_aggregate(states, weights)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in merged.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class OnUpdates(Strategy):
    """For rules that compare whole replies (Krum, Multi-Krum, Bulyan): hand them the updates
    (reply - global) in fp64, then add the global back.

    Flower's `compute_distances` takes squared distances as |x|^2 + |y|^2 - 2 x.y on what it is
    given; on fp32 LoRA weights the updates are small next to the weights (lora_A starts at
    Kaiming scale) and the cancellation costs the distances their precision, enough to change
    which clients are picked (measured on SmolLM2 adapters, see the README). Krum's selection
    is translation-invariant and Bulyan's median and trimming act per coordinate, so on exact
    arithmetic nothing else changes."""

    _global: ArrayRecord

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reference = {k: v.numpy().astype(np.float64) for k, v in self._global.items()}
        replies = list(replies)
        for reply in replies:
            record = reply.content.array_records[self.arrayrecord_key]
            reply.content[self.arrayrecord_key] = ArrayRecord(
                {k: Array(v.numpy().astype(np.float64) - reference[k]) for k, v in record.items()})
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({k: Array((v.numpy() + reference[k]).astype(
                self._global[k].numpy().dtype)) for k, v in arrays.items()})
        return arrays, metrics


class KrumOnUpdates(OnUpdates, Krum):
    """Flower's Krum on fp64 updates."""


class MultiKrumOnUpdates(OnUpdates, MultiKrum):
    """Flower's Multi-Krum on fp64 updates."""


class BulyanOnUpdates(OnUpdates, Bulyan):
    """Flower's Bulyan on fp64 updates."""


def build_rule(config: AppConfig, clients_per_round: int, population: int) -> Strategy:
    """Flower's strategy for `strategy.name` with the rule's keys, in the DP wrapper of
    `privacy.mode` (config.py has already refused combinations Flower cannot run)."""
    s = config.strategy
    # The driver samples the sources that train and evaluate; the rule sees only its messages.
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=1,
                  weighted_by_key=wire.AGGREGATION_WEIGHT, arrayrecord_key=wire.ARRAYS,
                  configrecord_key=wire.CONFIG)
    fedopt = dict(eta=s.eta, tau=s.tau)
    rules = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=s.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **fedopt, beta_1=s.beta_1, beta_2=s.beta_2),
        "fedyogi": lambda: FedYogi(**common, **fedopt, beta_1=s.beta_1, beta_2=s.beta_2),
        "fedadagrad": lambda: FedAdagrad(**common, **fedopt),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=s.server_learning_rate,
                                   server_momentum=s.server_momentum),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=s.trim_fraction),
        "krum": lambda: KrumOnUpdates(**common, num_malicious_nodes=s.num_malicious_nodes),
        "multikrum": lambda: MultiKrumOnUpdates(
            **common, num_malicious_nodes=s.num_malicious_nodes,
            num_nodes_to_select=s.multikrum_select),
        "bulyan": lambda: BulyanOnUpdates(**common, num_malicious_nodes=s.num_malicious_nodes),
        "flexlora": lambda: FlexLoRA(**common),
    }
    rule = rules[s.name]()
    return private(rule, config, clients_per_round, population)


def _layers(rule: Strategy) -> list[Strategy]:
    """The rule and the strategies it wraps (a DP wrapper holds the rule as `.strategy`)."""
    layers = [rule]
    while isinstance(getattr(layers[-1], "strategy", None), Strategy):
        layers.append(layers[-1].strategy)
    return layers


def accountant_of(rule: Strategy):
    return next((layer.accountant for layer in _layers(rule)
                 if getattr(layer, "accountant", None) is not None), None)


def rule_state(rule: Strategy) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The rule's carried state: arrays (`layer/attribute/key`) and JSON values."""
    arrays: dict[str, np.ndarray] = {}
    values: dict[str, Any] = {}
    for depth, layer in enumerate(_layers(rule)):
        adaptive = isinstance(layer, DifferentialPrivacyAdaptiveBase)
        for attribute in STATEFUL_ATTRIBUTES + (ADAPTIVE_ATTRIBUTES if adaptive else ()):
            value = getattr(layer, attribute, None)
            prefix = f"{depth}/{attribute}"
            if isinstance(value, dict):
                arrays.update({f"{prefix}/{k}": np.asarray(v) for k, v in value.items()})
                values[prefix] = "dict"
            elif isinstance(value, list):
                arrays.update({f"{prefix}/{i}": np.asarray(v) for i, v in enumerate(value)})
                values[prefix] = "list"
            elif isinstance(value, float):
                values[prefix] = value
    accountant = accountant_of(rule)
    if accountant is not None:
        values["accountant"] = accountant.state_dict()
    return arrays, values


def load_rule_state(rule: Strategy, arrays: dict[str, np.ndarray], values: dict[str, Any]
                    ) -> None:
    """Put state saved by `rule_state` back into a freshly built rule of the same config."""
    layers = _layers(rule)
    for prefix, value in values.items():
        if prefix == "accountant":
            accountant_of(rule).load_state_dict(value)
            continue
        depth, attribute = prefix.split("/")
        if value == "dict":
            restored: Any = {name[len(prefix) + 1:]: array for name, array in arrays.items()
                             if name.startswith(prefix + "/")}
        elif value == "list":
            items = {int(name[len(prefix) + 1:]): array for name, array in arrays.items()
                     if name.startswith(prefix + "/")}
            restored = [items[i] for i in range(len(items))]
        else:
            restored = value
        setattr(layers[int(depth)], attribute, restored)
