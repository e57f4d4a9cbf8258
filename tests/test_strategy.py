import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from flowertune_nlp import messages as wire
from flowertune_nlp.strategy import round_learning_rate


def test_learning_rate_schedule_cosine_from_max_to_min():
    rates = [round_learning_rate(r, 10, 5e-5, 1e-6) for r in range(1, 11)]
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(1e-6)
    assert rates[0] == pytest.approx(1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi / 10)))
    assert round_learning_rate(5, 10, 5e-5, 1e-6) == pytest.approx((5e-5 + 1e-6) / 2)


def _reply(arrays: dict, examples: int, loss: float) -> RecordDict:
    return RecordDict({
        wire.ARRAYS: ArrayRecord({k: torch.tensor(v) for k, v in arrays.items()}),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: examples, wire.TRAIN_LOSS: loss}),
    })


def test_fedavg_weights_replies_by_examples():
    """The aggregation FedAvg.aggregate_train applies to the replies' LoRA tensors."""
    from flwr.serverapp.strategy.strategy_utils import (
        aggregate_arrayrecords,
        aggregate_metricrecords,
    )

    a = {"w.lora_A": np.array([[1.0, 2.0]], dtype=np.float32)}
    b = {"w.lora_A": np.array([[4.0, 8.0]], dtype=np.float32)}
    replies = [_reply(a, 10, 1.0), _reply(b, 30, 3.0)]
    arrays = aggregate_arrayrecords(replies, wire.NUM_EXAMPLES)
    result = arrays.to_torch_state_dict()["w.lora_A"].numpy()
    np.testing.assert_allclose(result, [[3.25, 6.5]])
    metrics = aggregate_metricrecords(replies, wire.NUM_EXAMPLES)
    assert metrics[wire.TRAIN_LOSS] == pytest.approx(2.5)
