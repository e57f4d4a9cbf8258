"""Held-out evaluation: the per-example losses equal the model's own loss, the bootstrap
interval behaves, and the evaluator scores adapters on rows no partition holds."""

import numpy as np
import pytest
import torch

from flowertune_nlp.config import build_config
from flowertune_nlp.data import load_partition, load_validation_rows, masked_labels
from flowertune_nlp.heldout import HeldOutEvaluator, example_losses, paired_difference, score


@pytest.fixture
def config(tiny_model_dir, alpaca_sample):
    return build_config({"model.name": str(tiny_model_dir), "model.quantization": 0,
                         "model.precision": "fp32", "static.dataset.name": str(alpaca_sample),
                         "static.dataset.validation-size": 24, "train.seq-length": 128,
                         "static.dataset.num-partitions": 4})


def test_example_losses_equal_the_models_own_loss_on_response_tokens(config):
    evaluator = HeldOutEvaluator(config, batch_size=3)
    evaluator.load()
    model = evaluator.model
    nll, tokens = example_losses(model, evaluator.examples[:5], evaluator.tokenizer.pad_token_id,
                                 batch_size=3)  # padded batches, longest first
    with torch.no_grad():
        for i, row in enumerate(sorted(evaluator.examples[:5],
                                       key=lambda r: -len(r["input_ids"]))):
            own = model(input_ids=torch.tensor([row["input_ids"]]),
                        labels=torch.tensor([masked_labels(row)])).loss
            assert nll[i] / tokens[i] == pytest.approx(float(own), rel=1e-4)
            # every scored token but the first position (nothing predicts it)
            assert tokens[i] == sum(label != -100 for label in masked_labels(row)[1:])


def test_the_bootstrap_interval_brackets_the_loss_and_collapses_without_spread():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, 200).astype(float)
    nll = tokens * rng.normal(2.0, 0.3, 200)
    result = score(nll, tokens, 1.0)
    assert result.loss_ci_low < result.loss < result.loss_ci_high
    assert result.perplexity == pytest.approx(np.exp(result.loss))
    flat = score(tokens * 2.0, tokens, 1.0)
    assert flat.loss_ci_low == pytest.approx(2.0) and flat.loss_ci_high == pytest.approx(2.0)


def test_a_paired_difference_sees_a_small_shift_that_separate_intervals_hide():
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 200, 100).astype(float)
    nll_a = tokens * rng.uniform(0.5, 3.0, 100)  # rows differ a lot in difficulty
    nll_b = nll_a + 0.02 * tokens  # b is worse by 0.02 per token on every row
    a, b = score(nll_a, tokens, 0.0), score(nll_b, tokens, 0.0)
    assert b.loss_ci_low < a.loss_ci_high  # their own intervals overlap ...
    shift = paired_difference(nll_a, nll_b, tokens)
    assert shift.difference == pytest.approx(0.02)  # ... the paired one is exactly the shift
    assert shift.ci_low == pytest.approx(0.02) and shift.ci_high == pytest.approx(0.02)
    noisy = paired_difference(nll_a, nll_a + tokens * rng.normal(0, 0.1, 100), tokens)
    assert noisy.ci_low < noisy.difference < noisy.ci_high
    assert noisy.ci_low < 0 < noisy.ci_high  # noise alone: no difference claimed
    assert shift.as_text() == "+0.0200 [+0.0200, +0.0200]"


def test_the_evaluator_scores_held_out_rows_that_no_partition_holds(config):
    held_out = {row["instruction"] + row["output"] for row in
                load_validation_rows(config.dataset, config.seed)}
    for partition in range(config.dataset.num_partitions):
        rows = load_partition(config.dataset, partition, config.seed)
        assert not held_out & {r["instruction"] + r["output"] for r in rows}
    evaluator = HeldOutEvaluator(config)
    from flowertune_nlp.training import lora_state_dict

    evaluator.load()
    base = lora_state_dict(evaluator.model)
    first = evaluator(base)
    assert first.examples == len(evaluator.examples) > 0 and first.tokens > first.examples
    moved = {k: v + 0.5 if "lora_B" in k else v for k, v in base.items()}
    assert evaluator(moved).loss != first.loss
    assert evaluator(base).loss == first.loss  # the adapter is replaced, not accumulated
    evaluator.close()
