"""Communication accounting: exact bytes of the LoRA tensors in train messages.

The published FlowerTune numbers count, per round, the adapter sent to each sampled client and
each adapter sent back: total = R * 2 * K * (4 P + 128 T) bytes for fp32 tensors, where the 128
bytes are the NumPy header of each serialized tensor. MB means 2**20 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MB = 2**20
NPY_HEADER_BYTES = 128
BUDGET_MB = 200_000.0  # the FlowerTune leaderboard's communication budget


TRANSPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def cast_record(record, transport: str):
    """The same ArrayRecord with every tensor in the transport's dtype (no copy if it already
    is). fp16 halves the bytes on the wire; the server keeps and averages fp32."""
    from flwr.app import Array, ArrayRecord

    dtype = TRANSPORT_DTYPES[transport]
    if all(array.dtype == np.dtype(dtype).name for array in record.values()):
        return record
    return ArrayRecord({k: Array(v.numpy().astype(dtype)) for k, v in record.items()})


def arrayrecord_tensor_bytes(record) -> int:
    """Bytes of the serialized tensors in an ArrayRecord (key names are not counted)."""
    return sum(len(array.data) for array in record.values())


def adapter_bytes(num_params: int, num_tensors: int, bytes_per_param: int = 4) -> int:
    """Serialized size of one adapter: raw tensor bytes plus one NumPy header per tensor."""
    return bytes_per_param * num_params + NPY_HEADER_BYTES * num_tensors


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


def expected_total_bytes(shapes, rounds: int, clients_per_round: int,
                         bytes_per_param: int = 4) -> int:
    """The published formula: every round, K downloads and K uploads of the adapter."""
    params = sum(a * b for a, b in shapes)
    return rounds * 2 * clients_per_round * adapter_bytes(params, len(shapes), bytes_per_param)


@dataclass
class CommLedger:
    """Bytes sent to and received from clients, per round and in total."""

    downloads: dict[int, int] = field(default_factory=dict)
    uploads: dict[int, int] = field(default_factory=dict)

    def record_download(self, server_round: int, record, num_messages: int) -> None:
        self.downloads[server_round] = arrayrecord_tensor_bytes(record) * num_messages

    def record_uploads(self, server_round: int, records) -> None:
        self.uploads[server_round] = sum(arrayrecord_tensor_bytes(r) for r in records)

    def round_bytes(self, server_round: int) -> int:
        return self.downloads.get(server_round, 0) + self.uploads.get(server_round, 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.downloads.values()) + sum(self.uploads.values())
