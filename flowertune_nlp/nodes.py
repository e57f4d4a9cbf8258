"""Which node holds which data partition, and which partitions train in a given round.

Flower's FedAvg samples with the global `random` module over node ids, and a simulation
SuperLink draws fresh random node ids every time it starts. The same seed would therefore pick
different partitions in a resumed run than in an uninterrupted one. We instead ask every node
for its partition id once, and sample partitions with an RNG seeded by (seed, round).
"""

from __future__ import annotations

import random
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

NODE_RECORD = "node"


def describe_node(context: Context) -> RecordDict:
    """A ClientApp's answer to the partition query."""
    return RecordDict({NODE_RECORD: ConfigRecord({
        "partition-id": int(context.node_config["partition-id"]),
        "num-partitions": int(context.node_config["num-partitions"]),
    })})


def discover_partitions(grid: Grid, num_partitions: int, timeout: float = 600.0
                        ) -> dict[int, int]:
    """Map partition id -> node id by querying every connected node."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < num_partitions:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of static.dataset.num-partitions = "
                               f"{num_partitions} nodes connected within {timeout:.0f} s")
        time.sleep(1)
    queries = [Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
               for node in node_ids]
    partitions: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} did not report its partition:"
                               f" {reply.error.reason}")
        info = reply.content.config_records[NODE_RECORD]
        if int(info["num-partitions"]) != num_partitions:
            raise ValueError(
                f"the federation has {info['num-partitions']} partitions but "
                f"static.dataset.num-partitions = {num_partitions}; set "
                "options.num-supernodes (or --num-supernodes) to match"
            )
        partitions[int(info["partition-id"])] = reply.metadata.src_node_id
    if sorted(partitions) != list(range(num_partitions)):
        raise RuntimeError(f"nodes reported partitions {sorted(partitions)}; expected each of "
                           f"0..{num_partitions - 1} exactly once")
    return partitions


def sample_partitions(seed: int, server_round: int, num_partitions: int, count: int
                      ) -> list[int]:
    """The partitions that train in this round: a function of (seed, round) alone."""
    return sorted(random.Random(f"{seed}:{server_round}").sample(range(num_partitions), count))
