import math

import pytest

from flowertune_nlp.round_driver import round_learning_rate


def test_learning_rate_schedule_cosine_from_max_to_min():
    rates = [round_learning_rate(r, 10, 5e-5, 1e-6) for r in range(1, 11)]
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(1e-6)
    assert rates[0] == pytest.approx(1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi / 10)))
    assert round_learning_rate(5, 10, 5e-5, 1e-6) == pytest.approx((5e-5 + 1e-6) / 2)
