"""Nodes as workers: sources, what nodes say they serve, the bounded wait for nodes, nodes
whose own data does not load (left out, their paths kept from the server), and the round
driver's hooks with replies built in the test (as Flower's own strategy tests do)."""

import json
import logging
import random
import time

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    RecordDict,
)
from mock_replies import FakeGrid, push, task_identity, train_reply  # noqa: F401 (fixture)

from flowertune_nlp import messages as wire
from flowertune_nlp.aggregation import build_rule
from flowertune_nlp.config import build_config, clients_per_round
from flowertune_nlp.data import NodeDataError, check_node_data, load_node_data
from flowertune_nlp.nodes import (
    MAX_DATA_FAILURES,
    NodeDataUnusable,
    NodeDirectory,
    Source,
    assigned_source,
    data_errors_without_paths,
    sample_sources,
)
from flowertune_nlp.outputs import RunOutputs
from flowertune_nlp.round_driver import RoundDriver

ROWS = [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 3


def write_rows(path, rows=ROWS) -> str:
    """An alpaca JSON-lines file (its folder created), as a node's operator keeps one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_source_sampling_equals_sampling_partition_ids():
    """Runs (and resumes) keep training exactly the partitions the previous version did."""
    partitions = [Source(p) for p in range(20)]
    for seed in (42, 7):
        for server_round in range(1, 11):
            picked = sample_sources(seed, server_round, partitions, 2)
            expected = sorted(random.Random(f"{seed}:{server_round}").sample(range(20), 2))
            assert [s.partition for s in picked] == expected
    rounds = [tuple(sample_sources(42, r, partitions, 2)) for r in range(1, 11)]
    assert len(set(rounds)) > 5
    assert (clients_per_round(20, 0.1), clients_per_round(3, 0.67), clients_per_round(2, 0.1),
            clients_per_round(3, 1.0)) == (2, 2, 1, 3)


def test_simulated_nodes_are_workers_for_every_partition():
    grid = FakeGrid({11: {"partition-id": 0, "num-partitions": 2},
                     4: {"partition-id": 1, "num-partitions": 2}})
    nodes = NodeDirectory(grid, simulated=True, num_partitions=20, min_nodes=1, wait_seconds=5)
    nodes.update(nodes.connected(1), timeout=5)
    assert grid.queries == 0  # simulated nodes are not asked anything
    assert nodes.sources() == [Source(p) for p in range(20)]
    sampled = [Source(3), Source(8), Source(15)]
    assignment = nodes.assign(sampled)
    assert [(s.partition, n.node_id) for s, n in assignment] == [(3, 4), (8, 11), (15, 4)]


def test_deployment_nodes_serve_what_their_operators_configured(caplog, tmp_path):
    grid = FakeGrid({
        5: {"name": "site-2", "data-path": write_rows(tmp_path / "b.jsonl")},
        9: {"name": "site-1", "data-path": write_rows(tmp_path / "a.jsonl")},
        7: {"partition-id": 1, "num-partitions": 3},
        8: {"name": "wrong-split", "partition-id": 1, "num-partitions": 4},
        6: {"name": "twin", "partition-id": 1, "num-partitions": 3},
        3: {"name": "empty"},
    })
    nodes = NodeDirectory(grid, simulated=False, num_partitions=3, min_nodes=1, wait_seconds=5)
    with caplog.at_level(logging.WARNING, logger="flowertune_nlp"):
        nodes.update(nodes.connected(1), timeout=5)
    assert [s.label for s in nodes.sources()] == ["partition 1", "site-1", "site-2"]
    # of two nodes that serve the same partition, the one with the lower node id is used
    assert {nodes.known[n].name for n in nodes.known} == {"twin", "site-1", "site-2"}
    assert set(nodes.refused) == {3, 7, 8}
    assert "num-partitions=3" in nodes.refused[8]
    assert "node node-1 serves partition 1, which node twin already serves" in nodes.refused[7]
    assert "neither data-path nor partition-id" in nodes.refused[3]
    queries = grid.queries
    nodes.update(nodes.connected(2), timeout=5)
    assert grid.queries == queries  # known and refused nodes are asked once
    picked = nodes.assign([Source(None, "site-1"), Source(1)])
    assert [(s.label, n.node_id) for s, n in picked] == [("site-1", 9), ("partition 1", 6)]


def test_round_waits_a_bounded_time_for_nodes_and_says_so(caplog):
    nodes = NodeDirectory(FakeGrid({1: {}}), simulated=True, num_partitions=2, min_nodes=3,
                          wait_seconds=1.5)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="flowertune_nlp"):
        assert nodes.connected(4) == [1]
    assert 1.5 <= time.monotonic() - start < 4
    assert "1 of federation.min-nodes = 3 nodes connected" in caplog.text
    assert "federation.wait-seconds" in caplog.text


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=3, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_a_node_trains_only_what_it_serves():
    data_node = _context({"name": "clinic", "data-path": "/data/x.jsonl"})
    assert assigned_source(data_node, ConfigRecord({}), 20) == Source(None, "clinic")
    with pytest.raises(ValueError, match="trains its own data"):
        assigned_source(data_node, ConfigRecord({"partition-id": 2, "num-partitions": 20}), 20)
    worker = _context({"partition-id": 0, "num-partitions": 2})
    assert assigned_source(worker, ConfigRecord({"partition-id": 7, "num-partitions": 20}),
                           20) == Source(7)
    for settings in ({"partition-id": 20, "num-partitions": 20},
                     {"partition-id": 1, "num-partitions": 10}):
        with pytest.raises(ValueError, match="static.dataset.num-partitions = 20"):
            assigned_source(worker, ConfigRecord(settings), 20)
    with pytest.raises(ValueError, match="named no partition"):
        assigned_source(worker, ConfigRecord({}), 20)


def _driver(tmp_path, simulated: bool, node_configs: dict, extra: dict | None = None):
    config = build_config({"static.dataset.num-partitions": 3, "strategy.fraction-train": 1.0,
                           "output-dir": str(tmp_path), "run-name": "r", **(extra or {})})
    nodes = NodeDirectory(FakeGrid(node_configs), simulated, 3, 1, 5)
    rule = build_rule(config, clients_per_round(3, 1.0), population=3)
    return RoundDriver(config, RunOutputs.create(config), nodes, rule)


def test_driver_sends_each_sampled_partition_and_averages_in_source_order(tmp_path):
    arrays = ArrayRecord({"a.lora_A.weight": torch.zeros(2, 3),
                          "a.lora_B.weight": torch.zeros(3, 2)})
    results = []
    for order in (slice(None), slice(None, None, -1)):
        driver = _driver(tmp_path / str(len(results)), True,
                         {21: {"partition-id": 0, "num-partitions": 2},
                          22: {"partition-id": 1, "num-partitions": 2}})
        messages = push(list(driver.configure_train(1, arrays, ConfigRecord(), None)))
        sent = [(m.metadata.dst_node_id, m.content.config_records["config"]["partition-id"])
                for m in messages]
        assert sent == [(21, 0), (22, 1), (21, 2)]  # 3 partitions on 2 workers
        replies = [train_reply(messages[0], 0.1, 10), train_reply(messages[1], 0.7, 30),
                   Message(Error(code=0, reason="Message: out of memory'>"),
                           reply_to=messages[2])]
        aggregated, _ = driver.aggregate_train(1, replies[order])
        driver.end_of_round(1, aggregated)
        results.append(aggregated.to_torch_state_dict()["a.lora_A.weight"])
        row = driver.outputs.metrics[-1]
        assert row["sources"] == ["partition 0", "partition 1", "partition 2"]
        assert row["nodes"] == ["simulated-node-0", "simulated-node-1", "simulated-node-0"]
        assert row["partitions"] == [0, 1, 2]
        assert (row["clients"], row["failures"]) == (2, 1)
        assert row["failure_reasons"] == ["partition 2: out of memory"]
    assert torch.equal(results[0], results[1])
    np.testing.assert_allclose(results[0].numpy(), (0.1 * 10 + 0.7 * 30) / 40, rtol=1e-6)


def test_driver_counts_a_node_that_never_answers(tmp_path):
    driver = _driver(tmp_path, False, {
        1: {"name": "site-a", "data-path": write_rows(tmp_path / "a.jsonl")},
        2: {"name": "site-b", "data-path": write_rows(tmp_path / "b.jsonl")}})
    arrays = ArrayRecord({"a.lora_A.weight": torch.zeros(2, 3),
                          "a.lora_B.weight": torch.zeros(3, 2)})
    messages = push(list(driver.configure_train(1, arrays, ConfigRecord(), None)))
    assert [m.content.config_records["config"].get("partition-id") for m in messages] == [
        None, None]  # own-data nodes are never told what to read
    driver.end_of_round(1, driver.aggregate_train(1, [train_reply(messages[0], 0.5, 8)])[0])
    row = driver.outputs.metrics[-1]
    assert row["nodes"] == ["site-a", "site-b"] and row["partitions"] == []
    assert row["failure_reasons"] == ["site-b: no reply from node site-b"]


def test_node_data_problems_are_classified_without_the_path(tmp_path, caplog):
    """The message (for the node's own log) names the file; the reason (for the server) names
    the problem only. The query's check reads a first row; training's load reads everything."""
    folder = tmp_path / "private-layout"
    write_rows(folder / "other.jsonl", [{"question": "q", "answer": "a"}])
    (folder / "broken.jsonl").write_text('{"instruction": "x", "output": \n')
    (folder / "empty.jsonl").write_text("")
    (folder / "notes.txt").write_text("hello")
    write_rows(folder / "late" / "a.jsonl")  # a folder whose second file is broken
    (folder / "late" / "b.jsonl").write_text('{"instruction": "x", "output": \n')
    cases = {"missing.jsonl": "data file missing", "broken.jsonl": "data file unreadable as json",
             "empty.jsonl": "data file has no rows", "other.jsonl": "no `instruction`, `output` "
             "column", "notes.txt": "data path holds no single-format .json, .jsonl or "
             ".parquet data"}
    for name, reason in cases.items():
        for read in (check_node_data, load_node_data):
            with pytest.raises(NodeDataError) as err:
                read(str(folder / name))
            assert err.value.reason == reason
            assert str(folder / name) in str(err.value) and "private-layout" not in reason
    check_node_data(str(folder / "late"))  # the first row of the first file is sound
    with pytest.raises(NodeDataError, match="cannot be read as json") as err:
        load_node_data(str(folder / "late"))
    assert err.value.reason == "data file unreadable as json"

    with caplog.at_level(logging.ERROR, logger="flowertune_nlp"), \
            pytest.raises(NodeDataUnusable) as unusable, data_errors_without_paths():
        load_node_data(str(folder / "missing.jsonl"))
    assert str(unusable.value) == f"{wire.DATA_FAILURE}: data file missing"
    assert unusable.value.__suppress_context__ and unusable.value.__cause__ is None
    assert str(folder / "missing.jsonl") in caplog.text  # the full text, in the node's log


def _server_log(caplog) -> str:
    """What the server logs (the FakeGrid's nodes log in the same process, from data.py's and
    nodes.py's node-side code)."""
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.funcName not in ("data_errors_without_paths",))


def test_a_node_whose_data_does_not_load_is_left_out_at_the_query(tmp_path, caplog):
    private = tmp_path / "private-layout"
    grid = FakeGrid({
        4: {"name": "site-ok", "data-path": write_rows(private / "ok.jsonl")},
        6: {"name": "site-moved", "data-path": str(private / "moved.jsonl")},
        8: {"name": "site-wrong", "data-path": write_rows(private / "qa.jsonl", [{"q": "a"}])},
    })
    nodes = NodeDirectory(grid, simulated=False, num_partitions=3, min_nodes=1, wait_seconds=5)
    with caplog.at_level(logging.INFO, logger="flowertune_nlp"):
        nodes.update(nodes.connected(1), timeout=5)
    assert [s.label for s in nodes.sources()] == ["site-ok"]
    assert nodes.refused == {
        6: f"node site-moved: {wire.DATA_FAILURE}: data file missing",
        8: f"node site-wrong: {wire.DATA_FAILURE}: no `instruction`, `output` column"}
    server = _server_log(caplog)
    assert f"node 6 is not used in this run: node site-moved: {wire.DATA_FAILURE}: data file " \
           "missing" in server
    assert "node 8 is not used in this run" in server
    assert "private-layout" not in server
    assert str(private / "moved.jsonl") in caplog.text  # the node's own log has it


def _data_failure(message: Message, reason: str) -> Message:
    """A train reply as a deployment's flwr-clientapp sends it when the handler raised
    NodeDataUnusable: Flower's reason format, `str(type(ex)) + ":<'" + str(ex) + "'>"`."""
    error = NodeDataUnusable(f"{wire.DATA_FAILURE}: {reason}")
    return Message(Error(code=2, reason=str(type(error)) + ":<'" + str(error) + "'>"),
                   reply_to=message)


def test_a_node_failing_on_its_data_rounds_in_a_row_is_left_out(tmp_path, caplog):
    private = tmp_path / "private-layout"
    driver = _driver(tmp_path / "run", False, {
        1: {"name": "site-a", "data-path": write_rows(private / "a.jsonl")},
        2: {"name": "site-b", "data-path": write_rows(private / "b.jsonl")}},
        {"train.save-every-round": 10})  # no checkpoint: the test needs no PEFT
    arrays = ArrayRecord({"a.lora_A.weight": torch.zeros(2, 3),
                          "a.lora_B.weight": torch.zeros(3, 2)})
    outcomes = ["data", "oom", "data", "data", None]  # site-b's reply in rounds 1..5
    sent_to = []
    with caplog.at_level(logging.INFO, logger="flowertune_nlp"):
        for server_round, outcome in enumerate(outcomes, start=1):
            messages = push(list(driver.configure_train(server_round, arrays, ConfigRecord(),
                                                        None)))
            sent_to.append([m.metadata.dst_node_id for m in messages])
            replies = [train_reply(messages[0], 0.5, 8)]
            if outcome == "data":
                replies.append(_data_failure(messages[1], "data file unreadable as json"))
            elif outcome == "oom":
                replies.append(Message(Error(code=2, reason="<class 'RuntimeError'>:<'CUDA out "
                                             "of memory'>"), reply_to=messages[1]))
            driver.end_of_round(server_round,
                                driver.aggregate_train(server_round, replies)[0])
    # an out-of-memory round ends the count; two data failures in a row leave site-b out
    assert MAX_DATA_FAILURES == 2
    assert sent_to == [[1, 2], [1, 2], [1, 2], [1, 2], [1]]
    assert 2 not in driver.nodes.known and "site-b: 2 rounds in a row" in driver.nodes.refused[2]
    assert "node site-b (node id 2) is left out of this run: 2 rounds in a row failed on its " \
           f"data ({wire.DATA_FAILURE}: data file unreadable as json)" in _server_log(caplog)
    rows = driver.outputs.metrics
    assert rows[0]["failure_reasons"] == [
        f"site-b: {wire.DATA_FAILURE}: data file unreadable as json"]
    assert rows[1]["failure_reasons"] == ["site-b: CUDA out of memory"]
    assert rows[4]["nodes"] == ["site-a"]
    metrics_file = (driver.outputs.directory / "metrics.jsonl").read_text()
    assert "private-layout" not in metrics_file and "private-layout" not in _server_log(caplog)
