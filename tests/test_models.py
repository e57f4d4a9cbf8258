import math

import bitsandbytes as bnb
import pytest
import torch

from flowertune_nlp import training
from flowertune_nlp.config import build_config
from flowertune_nlp.faults import corrupt_reply
from flowertune_nlp.models import (
    adapter_shapes,
    fresh_adapter,
    load_tokenizer,
)
from flowertune_nlp.nodes import Source


def test_pad_token_differs_from_eos(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("quantization", [0, 4])
def test_client_round_trains_dense_and_4bit_on_cpu(quantization, tiny_model_dir, alpaca_sample):
    config = build_config({
        "model.name": str(tiny_model_dir), "model.quantization": quantization,
        "static.dataset.name": str(alpaca_sample), "train.seq-length": 128,
        "train.training-arguments.max-steps": 2,
        "train.training-arguments.per-device-train-batch-size": 2,
    })
    client = training.get_client_model(config)
    q_proj = client.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) == (quantization == 4)
    initial = training.lora_state_dict(client.model)
    result = training.train_round(config, Source(1), 1, 1e-3, initial)
    assert math.isfinite(result.train_loss)
    assert result.precision == client.precision.describe()
    assert any((result.state[k] - initial[k]).abs().max() > 0 for k in initial)


@pytest.mark.parametrize("defect, message", [
    ("shape", "wrong shape for"), ("keys", "unexpected"), ("nan", "non-finite values")])
def test_defective_global_adapter_is_refused(defect, message, tiny_model_dir, alpaca_sample):
    config = build_config({"model.name": str(tiny_model_dir), "model.quantization": 0,
                           "static.dataset.name": str(alpaca_sample)})
    client = training.get_client_model(config)
    good = training.lora_state_dict(client.model)
    with pytest.raises(ValueError, match=message):
        training.set_lora_state_dict(client.model, corrupt_reply(defect, good))
    training.set_lora_state_dict(client.model, good)  # the sound adapter still loads


def test_adapter_from_config_alone_fits_the_loaded_model(tiny_model_dir, alpaca_sample):
    """The server's adapter (meta device, no weights read) has the loaded model's tensors,
    initialised as PEFT does: Kaiming-uniform A, zero B, reproducible from the seed."""
    config = build_config({"model.name": str(tiny_model_dir), "model.quantization": 0,
                           "static.dataset.name": str(alpaca_sample)})
    loaded = training.lora_state_dict(training.get_client_model(config).model)
    shapes = {k: tuple(v.shape) for k, v in loaded.items()}
    assert adapter_shapes(str(tiny_model_dir), config.model.lora) == shapes
    fresh = fresh_adapter(str(tiny_model_dir), config.model.lora, seed=3)
    assert {k: tuple(v.shape) for k, v in fresh.items()} == shapes
    assert all(v.dtype == torch.float32 for v in fresh.values())
    assert all(not v.any() for k, v in fresh.items() if "lora_B" in k)
    a = next(v for k, v in fresh.items() if "lora_A" in k)
    bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) on fan_in
    assert a.abs().max() <= bound and a.std() > bound / 3
    again = fresh_adapter(str(tiny_model_dir), config.model.lora, seed=3)
    assert all(torch.equal(v, again[k]) for k, v in fresh.items())
    training.set_lora_state_dict(training.get_client_model(config).model, fresh)


def test_a_hub_base_model_is_fetched_once_by_the_server(monkeypatch, tiny_model_dir):
    """The hub is unreachable here: record what would be downloaded instead."""
    import huggingface_hub

    from flowertune_nlp.models import fetch_base_model

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw))
    assert fetch_base_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert calls[0]["repo_id"] == "Qwen/Qwen2.5-7B-Instruct"
    assert "*.safetensors" in calls[0]["allow_patterns"]
    assert fetch_base_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert len(calls) == 1  # local folders are never downloaded


def test_lean_trainer_trains_exactly_as_stock_trl(tiny_model_dir, alpaca_sample, tmp_path):
    """The lean trainer drops TRL's per-step entropy/accuracy metrics only: the same steps on
    the same batches give the same loss and the same adapter as TRL's own SFTTrainer."""
    from flowertune_nlp.data import examples_for_round

    config = build_config({
        "model.name": str(tiny_model_dir), "model.quantization": 0, "model.precision": "fp32",
        "static.dataset.name": str(alpaca_sample), "train.seq-length": 128,
        "train.training-arguments.max-steps": 2,
        "train.training-arguments.per-device-train-batch-size": 2,
    })
    client = training.get_client_model(config)
    start = training.lora_state_dict(client.model)
    examples = examples_for_round(training.get_partition(config, Source(0), client.tokenizer),
                                  4, config.seed, 1, 0)
    losses, adapters = [], []
    for token_metrics in (True, False):
        training.set_lora_state_dict(client.model, start)
        trainer = training.make_trainer(config, client, examples, 1e-3, 7,
                                        str(tmp_path / str(token_metrics)), token_metrics)
        losses.append(trainer.train().training_loss)
        adapters.append(training.lora_state_dict(client.model))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert all(torch.allclose(adapters[1][k], adapters[0][k], atol=1e-6) for k in start)
    assert any(not torch.equal(adapters[1][k], start[k]) for k in start)  # it did train
