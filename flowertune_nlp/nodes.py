"""Who trains what: data sources, the nodes that serve them, and each round's sample.

The unit of work is a *data source*, not a node:

- in **simulation** the sources are the `static.dataset.num-partitions` partitions of the shared
  dataset, and every simulated node is an interchangeable worker that can train any of them
  (the data source is shared), so 20 partitions run on Flower's default 2-node federation, on
  20 nodes, or on one, with the same result;
- in a **deployment** every SuperNode serves exactly the data its operator configured with
  `--node-config`: its own file or folder (`data-path`), or one partition of
  `static.dataset.name` (`partition-id`/`num-partitions`, a benchmark federation). The server
  learns this with one query per node and never names a path.

Flower's own sampling draws node ids, which a SuperLink assigns at random at every start, so
the same seed would train different data after a restart. The round's sources are instead a
function of (seed, round) over the sources sorted by a stable key (partitions by id, own-data
nodes by name), and a resumed run trains exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flowertune_nlp.messages import DATA_FAILURE

log = logging.getLogger(__name__)

NODE_RECORD = "node"
# node-config keys an operator sets on `flower-supernode --node-config`
NAME_KEY = "name"
DATA_PATH_KEY = "data-path"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
WAIT_LOG_SECONDS = 10.0
# A node whose train replies fail on its own data this many rounds in a row is left out of the
# run: a file that broke (or was never fully readable) rarely mends itself between rounds, and
# each round sent to it spends a download and a sampled slot.
MAX_DATA_FAILURES = 2


@dataclass(frozen=True)
class Source:
    """One unit of training data: a partition of the shared dataset, or a node's own data."""

    partition: int | None  # None: the own data of the node called `name`
    name: str = ""

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (0, self.partition, "") if self.partition is not None else (1, 0, self.name)

    @property
    def label(self) -> str:
        return f"partition {self.partition}" if self.partition is not None else self.name

    @property
    def seed_key(self) -> int:
        """An integer that keeps per-source data orders apart (the partition id, or a stable
        hash of the node's name)."""
        return self.partition if self.partition is not None else zlib.crc32(self.name.encode())


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server about itself."""

    node_id: int
    name: str
    source: Source | None  # None for a simulated worker, which serves any partition


def node_name(context: Context) -> str:
    """The operator's name for this node, or one derived from what it serves."""
    config = context.node_config
    if NAME_KEY in config:
        return str(config[NAME_KEY])
    if PARTITION_ID_KEY in config:
        return f"node-{config[PARTITION_ID_KEY]}"
    return f"node-{context.node_id}"


class NodeDataUnusable(RuntimeError):
    """What a node tells the server when its own data cannot be used: DATA_FAILURE and the
    classified reason, no path (Flower sends the server the text of a ClientApp's exception)."""


@contextlib.contextmanager
def data_errors_without_paths() -> Iterator[None]:
    """Keep a node's file paths on the node: a NodeDataError's full text, which names the file,
    goes to this node's log; it leaves as NodeDataUnusable with the classified reason."""
    from flowertune_nlp.data import NodeDataError  # datasets: on nodes, when they read data

    try:
        yield
    except NodeDataError as err:
        log.error("%s", err)
        raise NodeDataUnusable(f"{DATA_FAILURE}: {err.reason}") from None


def describe_node(context: Context) -> RecordDict:
    """A ClientApp's answer to the server's query: its name and the data it serves. A node with
    its own data checks it first (cheaply: it opens, has rows, the first has the columns), so
    the server leaves a node with a broken path out before round 1."""
    from flowertune_nlp.data import check_node_data

    config = context.node_config
    info: dict = {NAME_KEY: node_name(context)}
    if DATA_PATH_KEY in config:
        info[DATA_PATH_KEY] = True  # the path itself stays on the node
        try:
            with data_errors_without_paths():
                check_node_data(str(config[DATA_PATH_KEY]))
        except NodeDataUnusable as err:
            info["error"] = f"node {info[NAME_KEY]}: {err}"
    elif PARTITION_ID_KEY in config and NUM_PARTITIONS_KEY in config:
        info[PARTITION_ID_KEY] = int(config[PARTITION_ID_KEY])
        info[NUM_PARTITIONS_KEY] = int(config[NUM_PARTITIONS_KEY])
    else:
        info["error"] = (f"node {info[NAME_KEY]} has neither {DATA_PATH_KEY} nor "
                         f"{PARTITION_ID_KEY}+{NUM_PARTITIONS_KEY} in its --node-config")
    return RecordDict({NODE_RECORD: ConfigRecord(info)})


def assigned_source(context: Context, settings: ConfigRecord, num_partitions: int) -> Source:
    """The source a train message asks this node to train, checked against what the node
    serves: a node with its own data trains only that; otherwise the partition the server
    names, of `static.dataset.name` split into `static.dataset.num-partitions`."""
    if DATA_PATH_KEY in context.node_config:
        if PARTITION_ID_KEY in settings:
            raise ValueError(f"node {node_name(context)} trains its own data ({DATA_PATH_KEY}), "
                             f"but was asked for partition {settings[PARTITION_ID_KEY]}")
        return Source(None, node_name(context))
    if PARTITION_ID_KEY not in settings:
        raise ValueError(f"node {node_name(context)} has no {DATA_PATH_KEY} and the server "
                         "named no partition to train")
    partition, total = int(settings[PARTITION_ID_KEY]), int(settings[NUM_PARTITIONS_KEY])
    if total != num_partitions or not 0 <= partition < total:
        raise ValueError(f"partition {partition} of {total} does not fit "
                         f"static.dataset.num-partitions = {num_partitions}")
    return Source(partition)


def parse_node_reply(reply: Message, num_partitions: int) -> NodeInfo:
    """The node's self-description; ValueError when it serves nothing this run can use."""
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        raise ValueError(f"node {node_id} did not describe itself: {reply.error.reason}")
    info = reply.content.config_records[NODE_RECORD]
    name = str(info[NAME_KEY])
    if "error" in info:
        raise ValueError(str(info["error"]))
    if DATA_PATH_KEY in info:
        return NodeInfo(node_id, name, Source(None, name))
    if int(info[NUM_PARTITIONS_KEY]) != num_partitions:
        raise ValueError(f"node {name} serves partition {info[PARTITION_ID_KEY]} of "
                         f"{info[NUM_PARTITIONS_KEY]}, but static.dataset.num-partitions = "
                         f"{num_partitions}; start it with num-partitions={num_partitions}")
    partition = int(info[PARTITION_ID_KEY])
    if not 0 <= partition < num_partitions:
        raise ValueError(f"node {name} serves partition {partition}, outside 0.."
                         f"{num_partitions - 1}")
    return NodeInfo(node_id, name, Source(partition))


class NodeDirectory:
    """The nodes a run can use and what each serves, kept current round by round."""

    def __init__(self, grid: Grid, simulated: bool, num_partitions: int, min_nodes: int,
                 wait_seconds: float) -> None:
        self.grid = grid
        self.simulated = simulated
        self.num_partitions = num_partitions
        self.min_nodes = min_nodes
        self.wait_seconds = wait_seconds
        self.known: dict[int, NodeInfo] = {}
        self.refused: dict[int, str] = {}  # node id -> why it serves nothing usable
        self.data_failures: dict[int, int] = {}  # node id -> rounds in a row failed on its data

    def connected(self, server_round: int) -> list[int]:
        """Connected node ids, after waiting up to `wait_seconds` for `min_nodes` of them.
        Returns what is there then (possibly fewer); the caller decides what an empty list
        means."""
        started = time.monotonic()
        last_log = started
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            usable = [n for n in node_ids if n not in self.refused]
            waited = time.monotonic() - started
            if len(usable) >= self.min_nodes or waited >= self.wait_seconds:
                if len(usable) < self.min_nodes:
                    log.warning("round %d: %d of federation.min-nodes = %d nodes connected "
                                "after %.0f s (federation.wait-seconds); going on with what "
                                "there is", server_round, len(usable), self.min_nodes, waited)
                elif waited > 1:
                    log.info("round %d: %d nodes connected after waiting %.0f s",
                             server_round, len(usable), waited)
                return usable
            if time.monotonic() - last_log >= WAIT_LOG_SECONDS:
                last_log = time.monotonic()
                log.info("round %d: waiting for nodes: %d of federation.min-nodes = %d "
                         "connected (%.0f of federation.wait-seconds = %.0f s)", server_round,
                         len(usable), self.min_nodes, waited, self.wait_seconds)
            time.sleep(1.0)

    def update(self, node_ids: Iterable[int], timeout: float) -> None:
        """Learn what newly connected nodes serve (simulated nodes need no query), and forget
        nodes that left."""
        node_ids = list(node_ids)
        self.known = {n: info for n, info in self.known.items() if n in node_ids}
        new = [n for n in node_ids if n not in self.known and n not in self.refused]
        if self.simulated:
            # Node ids are random, so a simulated worker's rank names it for this run only.
            ranks = {n: i for i, n in enumerate(sorted(node_ids))}
            self.known.update({n: NodeInfo(n, f"simulated-node-{ranks[n]}", None) for n in new})
            return
        if not new:
            return
        queries = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                   for n in new]
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(
            queries, timeout=timeout)}
        taken = {info.source: info.name for info in self.known.values()}
        for node_id in new:
            reply = replies.get(node_id)
            try:
                if reply is None:
                    raise ValueError(f"node {node_id} did not answer the query in {timeout:.0f} s")
                info = parse_node_reply(reply, self.num_partitions)
                if info.source in taken:
                    raise ValueError(f"node {info.name} serves {info.source.label}, which node "
                                     f"{taken[info.source]} already serves")
            except ValueError as err:
                if reply is None:  # it may answer next round
                    log.warning("%s", err)
                    continue
                self.refused[node_id] = str(err)
                log.warning("node %d is not used in this run: %s", node_id, err)
                continue
            taken[info.source] = info.name
            self.known[node_id] = info
            log.info("node %s joined: %s", info.name, info.source.label)

    def record_train_reply(self, node: NodeInfo, failure: str | None) -> None:
        """Count the rounds in a row in which `node` failed on its own data (`failure`: its
        reply's error reason, None when it trained); leave it out of the run at
        MAX_DATA_FAILURES. Any other outcome ends the count."""
        if failure is None or not failure.startswith(DATA_FAILURE):
            self.data_failures.pop(node.node_id, None)
            return
        count = self.data_failures[node.node_id] = self.data_failures.get(node.node_id, 0) + 1
        if count < MAX_DATA_FAILURES or node.node_id not in self.known:
            return
        self.refused[node.node_id] = (f"node {node.name}: {count} rounds in a row failed on its "
                                      f"data ({failure})")
        del self.known[node.node_id]
        log.warning("node %s (node id %d) is left out of this run: %d rounds in a row failed on "
                    "its data (%s)", node.name, node.node_id, count, failure)

    def sources(self) -> list[Source]:
        """Every source a connected node can train this round, in sampling order."""
        if self.simulated:
            return [Source(p) for p in range(self.num_partitions)] if self.known else []
        return sorted((info.source for info in self.known.values()), key=lambda s: s.sort_key)

    def assign(self, sampled: list[Source]) -> list[tuple[Source, NodeInfo]]:
        """The node that trains each sampled source: its own node in a deployment; in
        simulation the workers in turn (a worker given several trains them one after another).
        """
        if self.simulated:
            workers = [self.known[n] for n in sorted(self.known)]
            return [(source, workers[i % len(workers)]) for i, source in enumerate(sampled)]
        serving = {info.source: info for info in self.known.values()}
        return [(source, serving[source]) for source in sampled]


def sample_sources(seed: int, server_round: int, sources: list[Source], count: int,
                   purpose: str = "train") -> list[Source]:
    """The sources that train (or evaluate) in this round: a function of (seed, round) and the
    sorted sources alone. With the sources 0..N-1 this equals sampling partition ids directly.
    Evaluation draws from its own stream, so it changes nothing of training's draw."""
    stream = f"{seed}:{server_round}" + ("" if purpose == "train" else f":{purpose}")
    positions = random.Random(stream).sample(range(len(sources)), count)
    return [sources[i] for i in sorted(positions)]
