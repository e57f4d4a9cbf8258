"""Nodes are workers: plain `flwr run .` on Flower's own default federation (2 simulated
SuperNodes, a fresh Flower home) trains the same partitions, in the same order, to the same
adapter, bit for bit, as the launcher's 20-node federation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch
from flower_runs import flower_processes, tiny_settings
from safetensors.torch import load_file

from flowertune_nlp.flower_home import free_port
from flowertune_nlp.launch import APP_DIR, run_app
from flowertune_nlp.processes import stop_local_superlink

pytestmark = pytest.mark.slow


def plain_flwr_run(run_config: Path, flwr_home: Path, port: str) -> subprocess.CompletedProcess:
    """What a Flower user types, with the two settings the README asks for."""
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=port,
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([str(Path(sys.executable).with_name("flwr")), "run", ".", "--stream",
                           "--run-config", str(run_config)], cwd=APP_DIR, env=env,
                          capture_output=True, text=True, timeout=600)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    record = json.loads((run_dir / "run.json").read_text())
    return load_file(str(Path(record["final_adapter"]) / "adapter_model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_plain_flwr_run_on_the_default_federation_equals_the_launcher_run(
        tiny_model_dir, alpaca_sample, tmp_path):
    launched = run_app([tiny_settings(tiny_model_dir, alpaca_sample, tmp_path, "launcher")],
                       num_supernodes=20)
    assert launched.status == "completed", launched.error

    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(tiny_settings(tiny_model_dir, alpaca_sample, tmp_path,
                                                  "plain")))
    flwr_home, port = tmp_path / "fresh-flower-home", str(free_port())
    try:
        done = plain_flwr_run(preset, flwr_home, port)
    finally:
        stopped = stop_local_superlink(port)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 simulated SuperNodes" in done.stdout + done.stderr  # Flower's own default
    assert len(stopped) == 1 and flower_processes() == []
    plain_record = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert plain_record["status"] == "completed"

    ours, theirs = metrics(tmp_path / "plain"), metrics(tmp_path / "launcher")
    assert [r["partitions"] for r in ours] == [r["partitions"] for r in theirs]
    assert all(len(r["partitions"]) == 2 and r["failures"] == 0 for r in ours)
    assert {name for r in ours for name in r["nodes"]} <= {"simulated-node-0",
                                                          "simulated-node-1"}
    expected, got = adapter(tmp_path / "launcher"), adapter(tmp_path / "plain")
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
