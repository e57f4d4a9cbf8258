"""The app on Flower's Deployment Engine: a SuperLink with TLS and SuperNode authentication and
three SuperNodes on loopback, started and stopped by the tests (flowertune_nlp.federation).
Nodes with their own data, a node killed mid-round, agreement with simulation, and an exact
resume after the ServerApp is killed."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import tomli_w
import torch
from flower_runs import tiny_settings
from safetensors.torch import load_file

from flowertune_nlp.federation import LocalFederation
from flowertune_nlp.federation.local import MARKER
from flowertune_nlp.launch import APP_DIR, run_app
from flowertune_nlp.outputs import read_status

pytestmark = pytest.mark.slow
PARTITIONS = {"static.dataset.num-partitions": 3, "strategy.fraction-train": 0.67,
              "federation.min-nodes": 3, "federation.wait-seconds": 60.0}


def write_run_config(path: Path, settings: dict) -> Path:
    path.write_text(tomli_w.dumps(settings))
    return path


def deployment_run(fed: LocalFederation, run_config: Path, timeout: float = 600
                   ) -> subprocess.CompletedProcess:
    return subprocess.run(fed.run_command(APP_DIR, str(run_config)), env=fed.env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed", record.get("error")
    return load_file(str(Path(record["final_adapter"]) / "adapter_model.safetensors"))


def saved_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def node_files(tmp_path, alpaca_sample) -> list[Path]:
    rows = json.loads(alpaca_sample.read_text())
    files = []
    for index, name in enumerate(("clinic-a", "clinic-b")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[index * 100:index * 100 + 100]))
        files.append(path)
    return files


def test_nodes_with_their_own_data_train_and_a_killed_node_is_a_counted_failure(
        tiny_model_dir, alpaca_sample, tmp_path, node_files):
    nodes = [{"name": "clinic-a", "data-path": str(node_files[0])},
             {"name": "clinic-b", "data-path": str(node_files[1])},
             {"name": "benchmark-0", "partition-id": 0, "num-partitions": 3}]
    settings = tiny_settings(tiny_model_dir, alpaca_sample, tmp_path, "mixed",
                             **{**PARTITIONS, "strategy.fraction-train": 1.0})
    run_dir = tmp_path / "mixed"
    with LocalFederation(tmp_path / "federation", nodes) as fed:
        runner = subprocess.Popen(
            fed.run_command(APP_DIR, str(write_run_config(tmp_path / "run.toml", settings))),
            env=fed.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # Round 2 starts right after round 1 is saved: kill clinic-b while it trains.
            wait_for(lambda: saved_round(run_dir) >= 1, 300, "round 1")
            time.sleep(2)
            fed.kill_node(1)  # clinic-b
            output, _ = runner.communicate(timeout=400)
        finally:
            if runner.poll() is None:
                runner.kill()
    assert runner.returncode == 0, output[-3000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["sources"] == ["partition 0", "clinic-a", "clinic-b"]
    assert rows[0]["nodes"] == ["benchmark-0", "clinic-a", "clinic-b"]
    assert (rows[0]["clients"], rows[0]["failures"]) == (3, 0)
    assert rows[1]["nodes"] == ["benchmark-0", "clinic-a", "clinic-b"]
    assert (rows[1]["clients"], rows[1]["failures"]) == (2, 1)
    assert rows[1]["failure_reasons"][0].startswith("clinic-b: ")
    assert final_adapter(run_dir)  # the run completed
    assert [p for p in psutil.process_iter() if _in_federation(p, tmp_path / "federation")] == []


def test_nodes_whose_data_does_not_load_are_left_out_and_their_paths_stay_on_them(
        tiny_model_dir, alpaca_sample, tmp_path, node_files):
    """clinic-b's path is wrong: its query says so and it is left out before round 1.
    clinic-c's folder passes the query's check (its first file is sound) but fails every round's
    full load (its second file is broken): after MAX_DATA_FAILURES (2) rounds it is left out.
    The server's log and metrics.jsonl get the classified reasons, never a node's path; each
    node's own log has the full text."""
    private = tmp_path / "private-layout"
    broken = private / "clinic-c"
    broken.mkdir(parents=True)
    (broken / "a.jsonl").write_text(node_files[1].read_text())
    (broken / "b.jsonl").write_text('{"instruction": "x", "output": \n')
    nodes = [{"name": "clinic-a", "data-path": str(node_files[0])},
             {"name": "clinic-b", "data-path": str(private / "moved.jsonl")},
             {"name": "clinic-c", "data-path": str(broken)}]
    settings = tiny_settings(tiny_model_dir, alpaca_sample, tmp_path, "broken-data", **{
        **PARTITIONS, "strategy.fraction-train": 1.0, "federation.wait-seconds": 5.0})
    with LocalFederation(tmp_path / "federation", nodes) as fed:
        run = deployment_run(fed, write_run_config(tmp_path / "run.toml", settings))
        node_logs = {n.name: n.log_text() for n in fed.nodes}
        superlink_log = (fed.logs / "superlink.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-3000:]
    server_log = run.stdout + run.stderr  # the ServerApp's log, streamed by `flwr run`
    rows = metrics(tmp_path / "broken-data")
    reason = "node data unusable: data file unreadable as json"
    assert [r["sources"] for r in rows] == [["clinic-a", "clinic-c"]] * 2
    assert [r["failure_reasons"] for r in rows] == [[f"clinic-c: {reason}"]] * 2
    assert "is not used in this run: node clinic-b: node data unusable: data file missing" \
        in server_log
    assert f"node clinic-c (node id {fed.nodes[2].node_id}) is left out of this run: 2 rounds " \
           f"in a row failed on its data ({reason})" in server_log
    metrics_text = (tmp_path / "broken-data" / "metrics.jsonl").read_text()
    for text in (metrics_text, server_log, superlink_log):
        assert "private-layout" not in text
    assert str(private / "moved.jsonl") in node_logs["clinic-b"]
    assert str(broken) in node_logs["clinic-c"]


def _in_federation(process: psutil.Process, directory: Path) -> bool:
    try:
        return process.environ().get(MARKER) == str(directory.resolve())
    except psutil.Error:
        return False


def test_deployment_equals_simulation_and_resumes_exactly_after_the_server_app_is_killed(
        tiny_model_dir, alpaca_sample, tmp_path):
    """Three SuperNodes, each serving one partition of three, against a 3-node simulation of
    the same partitions: the deployment, its ServerApp killed after round 1 and the run
    resumed, trains the same partitions in the same order to the same adapter."""
    simulated = run_app([tiny_settings(tiny_model_dir, alpaca_sample, tmp_path, "simulated",
                                       rounds=3, **PARTITIONS)], num_supernodes=3)
    assert simulated.status == "completed", simulated.error

    nodes = [{"partition-id": p, "num-partitions": 3} for p in range(3)]
    with LocalFederation(tmp_path / "federation", nodes) as fed:
        killed_dir = tmp_path / "killed"
        killed_config = write_run_config(tmp_path / "killed.toml", tiny_settings(
            tiny_model_dir, alpaca_sample, tmp_path, "killed", rounds=3, **PARTITIONS))
        runner = subprocess.Popen(fed.run_command(APP_DIR, str(killed_config)), env=fed.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: saved_round(killed_dir) >= 1, 300, "round 1 of the killed run")
            server_apps = [p for p in psutil.process_iter(["cmdline"])
                           if "flwr-serverapp" in " ".join(p.info["cmdline"] or [])
                           and _in_federation(p, tmp_path / "federation")]
            assert len(server_apps) == 1
            os.kill(server_apps[0].pid, signal.SIGKILL)
            try:
                output, _ = runner.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                runner.terminate()
                output, _ = runner.communicate(timeout=30)
        finally:
            if runner.poll() is None:
                runner.kill()
        run_id = next(line.split()[-1] for line in output.splitlines()
                      if line.startswith("Successfully started run"))
        fed.flwr("stop", run_id, fed.federation_name)  # the SuperLink still lists it running
        assert read_status(killed_dir / "run.json") == "interrupted"
        assert saved_round(killed_dir) == 1

        resumed = deployment_run(fed, write_run_config(tmp_path / "resume.toml", {
            **tiny_settings(tiny_model_dir, alpaca_sample, tmp_path, "ignored", rounds=3,
                            **PARTITIONS), "run.resume": str(killed_dir)}))
        assert resumed.returncode == 0, resumed.stdout[-3000:]

    deployed, sim = metrics(killed_dir), metrics(tmp_path / "simulated")
    assert [r["round"] for r in deployed] == [1, 2, 3]
    assert [r["partitions"] for r in deployed] == [r["partitions"] for r in sim]
    assert all(r["failures"] == 0 and r["clients"] == 2 for r in deployed)
    assert {n for r in deployed for n in r["nodes"]} <= {"site-1", "site-2", "site-3"}
    expected, got = final_adapter(tmp_path / "simulated"), final_adapter(killed_dir)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    record = json.loads((killed_dir / "run.json").read_text())
    assert [r["from_round"] for r in record["resumes"]] == [1]
