"""Warm nodes on Flower's Deployment Engine (a secured loopback federation, tiny model): the same
adapter as cold nodes, bit for bit (and so as simulation: test_deployment.py runs warm nodes); a
worker replaced when the run's base model changes; a worker killed mid-round costs that round's
reply and the next round starts a new one; nothing left behind."""

import subprocess
from pathlib import Path

import psutil
import pytest
import tomli_w
import torch
from flower_runs import tiny_settings
from test_deployment import final_adapter, metrics, wait_for

from flowertune_nlp.federation import LocalFederation, marked_processes
from flowertune_nlp.launch import APP_DIR

pytestmark = pytest.mark.slow
SHAPE = {"static.dataset.num-partitions": 2, "strategy.fraction-train": 1.0,
         "federation.min-nodes": 2, "federation.wait-seconds": 60.0}
NODES = [{"partition-id": p, "num-partitions": 2} for p in range(2)]


def workers(federation: Path, owner_pid: int | None = None) -> list[psutil.Process]:
    """Running warm workers of the federation in `federation` (of its SuperNode `owner_pid`)."""
    found = []
    for proc in marked_processes(federation):
        try:
            words = proc.cmdline()
        except psutil.Error:
            continue
        if ("flowertune_nlp.warm_worker" in words
                and (owner_pid is None or str(owner_pid) in words)):
            found.append(proc)
    return found


def run(fed: LocalFederation, path: Path, settings: dict) -> subprocess.Popen:
    path.write_text(tomli_w.dumps(settings))
    return subprocess.Popen(fed.run_command(APP_DIR, str(path)), env=fed.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(runner: subprocess.Popen, timeout: float = 600) -> None:
    output, _ = runner.communicate(timeout=timeout)
    assert runner.returncode == 0, output[-3000:]


def test_warm_equals_cold_replaces_and_recovers(tiny_model_dir, alpaca_sample, tmp_path):
    def settings(name: str, **extra) -> dict:
        return tiny_settings(tiny_model_dir, alpaca_sample, tmp_path, name, **SHAPE, **extra)

    cold_nodes = [{**node, "warm": False} for node in NODES]
    with LocalFederation(tmp_path / "cold-federation", cold_nodes) as fed:
        finish(run(fed, tmp_path / "cold.toml", settings("cold")))
        assert workers(fed.directory) == []  # warm=false: every message ran in Flower's own process

    with LocalFederation(tmp_path / "federation", NODES) as fed:
        finish(run(fed, tmp_path / "warm.toml", settings("warm")))
        first = {node.name: workers(fed.directory, node.pid) for node in fed.nodes}
        assert all(len(found) == 1 for found in first.values()), first

        # Another base model setting (LoRA rank): each node's worker is replaced at the run's
        # first message. Round 2 stalls on partition 1, whose worker is killed meanwhile.
        killed_dir = tmp_path / "killed"
        runner = run(fed, tmp_path / "killed.toml", settings(
            "killed", rounds=3, **{"model.lora.peft-lora-r": 8, "faults.inject": "stall:1:2"}))
        try:
            wait_for(lambda: (killed_dir / "metrics.jsonl").exists(), 300, "round 1")
            replaced = {node.name: workers(fed.directory, node.pid) for node in fed.nodes}
            assert all(len(found) == 1 for found in replaced.values()), replaced
            assert not any(old.is_running() for found in first.values() for old in found)
            victim = replaced["site-2"][0]
            # the stalled message is in the worker: the listening socket and the connection
            wait_for(lambda: len(victim.net_connections("unix")) >= 2, 120, "round 2's message")
            victim.kill()
            finish(runner)
        finally:
            if runner.poll() is None:
                runner.kill()
        site2 = workers(fed.directory, fed.nodes[1].pid)
        assert len(site2) == 1 and site2[0].pid != victim.pid  # round 3 started a new one
    assert marked_processes(tmp_path / "federation") == []  # warm workers included

    killed = metrics(killed_dir)
    assert [(r["round"], r["clients"], r["failures"]) for r in killed] == [
        (1, 2, 0), (2, 1, 1), (3, 2, 0)]
    reason = killed[1]["failure_reasons"][0]
    assert reason.startswith("partition 1: ") and "warm worker" in reason  # site-2's source

    # Warm nodes equal simulation in test_deployment.py; here they equal cold ones.
    expected, got = final_adapter(tmp_path / "cold"), final_adapter(tmp_path / "warm")
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
