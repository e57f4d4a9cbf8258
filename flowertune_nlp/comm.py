"""Communication accounting: exact bytes of the LoRA tensors in train messages.

The published FlowerTune numbers count, per round, the adapter sent to each sampled client and
each adapter sent back: total = R * 2 * K * (4 P + 128 T) bytes for fp32 tensors, where the 128
bytes are the NumPy header of each serialized tensor. MB means 2**20 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MB = 2**20
NPY_HEADER_BYTES = 128
BUDGET_MB = 200_000.0  # the FlowerTune leaderboard's communication budget


TRANSPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TRANSPORT_BYTES = {name: np.dtype(dtype).itemsize for name, dtype in TRANSPORT_DTYPES.items()}


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


def expected_total_bytes(shapes, rounds: int, clients_per_round: int,
                         bytes_per_param: int = 4) -> int:
    """The published formula: every round, K downloads and K uploads of the adapter whose
    tensors have these shapes. The ServerApp logs it as the run's planned communication; the
    tests check the ledger of real runs against it."""
    params = sum(math.prod(shape) for shape in shapes)
    return rounds * 2 * clients_per_round * adapter_bytes(params, len(shapes), bytes_per_param)


@dataclass
class CommLedger:
    """Bytes sent to and received from clients, per round and in total."""

    downloads: dict[int, int] = field(default_factory=dict)
    uploads: dict[int, int] = field(default_factory=dict)
    evaluation: dict[int, int] = field(default_factory=dict)  # adapters sent to be evaluated

    def record_download(self, server_round: int, record, num_messages: int) -> None:
        self.downloads[server_round] = arrayrecord_tensor_bytes(record) * num_messages

    def record_evaluation(self, server_round: int, record, num_messages: int) -> None:
        self.evaluation[server_round] = arrayrecord_tensor_bytes(record) * num_messages

    def record_uploads(self, server_round: int, records) -> None:
        self.uploads[server_round] = sum(arrayrecord_tensor_bytes(r) for r in records)

    def round_bytes(self, server_round: int) -> int:
        """Bytes of the round's train messages and replies (what the published formula
        counts); evaluation's are `evaluation[round]`."""
        return self.downloads.get(server_round, 0) + self.uploads.get(server_round, 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.downloads.values()) + sum(self.uploads.values())
