import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from transformers import LlamaConfig, Qwen2Config

from flowertune_nlp.comm import (
    MB,
    adapter_bytes,
    arrayrecord_tensor_bytes,
    cast_record,
    expected_total_bytes,
)


# How the published numbers follow from a model's config alone (no weights): the LoRA A (r x in)
# and B (out x r) tensors of the targeted projections in every layer.
def lora_shapes(
    hidden_size: int,
    num_layers: int,
    module_out_features: dict[str, int],
    rank: int,
    module_in_features: dict[str, int] | None = None,
) -> list[tuple[int, int]]:
    """Shapes of the LoRA A (r x in) and B (out x r) tensors for the targeted linear layers."""
    shapes = []
    for _ in range(num_layers):
        for module, out_features in module_out_features.items():
            in_features = (module_in_features or {}).get(module, hidden_size)
            shapes += [(rank, in_features), (out_features, rank)]
    return shapes


def lora_shapes_from_config(model_config, target_modules: tuple[str, ...], rank: int):
    """LoRA tensor shapes for the attention/MLP projections of a Llama/Qwen/Mistral config."""
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    inter = model_config.intermediate_size
    out = {
        "q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
        "o_proj": hidden, "gate_proj": inter, "up_proj": inter, "down_proj": hidden,
    }
    inputs = {"o_proj": heads * head_dim, "down_proj": inter}
    unknown = [m for m in target_modules if m not in out]
    if unknown:
        raise ValueError(f"cannot derive LoRA shapes for modules {unknown} from a config alone")
    return lora_shapes(
        hidden, model_config.num_hidden_layers, {m: out[m] for m in target_modules}, rank,
        {m: inputs[m] for m in target_modules if m in inputs},
    )


QWEN25_7B = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4)
LLAMA31_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)


@pytest.mark.parametrize(("config", "params", "mb"), [
    (QWEN25_7B, 10_092_544, 1540.55),
    (LLAMA31_8B, 13_631_488, 2080.62),
])
def test_published_comm_costs_from_configs_alone(config, params, mb):
    shapes = lora_shapes_from_config(config, ("q_proj", "v_proj"), rank=32)
    assert sum(a * b for a, b in shapes) == params
    assert len(shapes) == 4 * config.num_hidden_layers
    total = expected_total_bytes(shapes, rounds=10, clients_per_round=2)
    assert round(total / MB, 2) == mb


def test_arrayrecord_bytes_are_tensor_bytes_plus_npy_header():
    state = {"a.lora_A.weight": torch.ones(8, 64), "a.lora_B.weight": torch.zeros(96, 8)}
    record = ArrayRecord(state)
    assert arrayrecord_tensor_bytes(record) == 4 * (8 * 64 + 96 * 8) + 2 * 128


def test_arrayrecord_round_trip_keeps_every_tensor_exactly():
    generator = torch.Generator().manual_seed(0)
    state = {f"layer{i}.lora_{ab}.weight": torch.randn(4, 16, generator=generator)
             for i in range(3) for ab in "AB"}
    restored = ArrayRecord(state).to_torch_state_dict()
    assert list(restored) == list(state)
    for key, tensor in state.items():
        assert restored[key].dtype == torch.float32
        np.testing.assert_array_equal(restored[key].numpy(), tensor.numpy())


def test_fp16_transport_halves_the_bytes_and_round_trips_to_fp32():
    state = {"a.lora_A.weight": torch.randn(8, 64), "a.lora_B.weight": torch.randn(96, 8)}
    fp32 = ArrayRecord(state)
    fp16 = cast_record(fp32, "fp16")
    params, tensors = 8 * 64 + 96 * 8, 2
    assert arrayrecord_tensor_bytes(fp16) == adapter_bytes(params, tensors, bytes_per_param=2)
    assert arrayrecord_tensor_bytes(fp32) == adapter_bytes(params, tensors)
    assert cast_record(fp32, "fp32") is fp32  # no copy when the dtype already matches
    back = cast_record(fp16, "fp32").to_torch_state_dict()
    for key, tensor in state.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key], tensor.half().float())
