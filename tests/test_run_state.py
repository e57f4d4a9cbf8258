"""The saved run state: round trip, and resumes refused (exit 2, nothing written, nothing
started) for corrupt, truncated or mismatched files."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flower_runs import flower_processes
from tiny import build_tiny_model

from flowertune_nlp.comm import CommLedger
from flowertune_nlp.config import build_config
from flowertune_nlp.launch import run_app
from flowertune_nlp.models import add_lora, choose_precision, load_base_model
from flowertune_nlp.outputs import RunOutputs, current_status, read_status, server_process
from flowertune_nlp.run_state import (
    RoundState,
    StateError,
    check_resumable,
    load_round_state,
    open_resumable,
    save_round_state,
)
from flowertune_nlp.training import lora_state_dict


def fresh_adapter(model_dir: Path) -> dict[str, torch.Tensor]:
    config = build_config({"model.name": str(model_dir), "model.quantization": 0})
    model = load_base_model(str(model_dir), choose_precision("fp32", 0))
    return lora_state_dict(add_lora(model, config.model.lora))


def settings(model_dir, data, out) -> dict:
    return {"num-server-rounds": 4, "model.name": str(model_dir), "model.quantization": 0,
            "static.dataset.name": str(data), "output-dir": str(out), "run-name": "saved"}


@pytest.fixture
def saved_run(tiny_model_dir, alpaca_sample, tmp_path):
    """A run folder whose state says round 2 of 4 completed, as the ServerApp leaves it."""
    config = build_config(settings(tiny_model_dir, alpaca_sample, tmp_path))
    outputs = RunOutputs.create(config)
    rows = [{"round": 1, "train_loss": 2.0}, {"round": 2, "train_loss": 1.5}]
    for row in rows:
        outputs.append_metrics(row)
    state = RoundState(2, fresh_adapter(tiny_model_dir), config.to_dict(),
                       CommLedger({1: 10, 2: 10}, {1: 12, 2: 12}), rows, 1)
    save_round_state(outputs.directory, state)
    return outputs.directory, state, config


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_state_round_trips_exactly(saved_run):
    run_dir, state, config = saved_run
    loaded = load_round_state(run_dir)
    assert (loaded.server_round, loaded.empty_rounds, loaded.metrics) == (2, 1, state.metrics)
    assert (loaded.ledger.downloads, loaded.ledger.uploads) == ({1: 10, 2: 10}, {1: 12, 2: 12})
    assert all(torch.equal(loaded.global_state[k], v) for k, v in state.global_state.items())
    assert check_resumable(loaded, config, run_dir) == []
    faster = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                    learning_rate_max=1e-4))
    assert check_resumable(loaded, faster, run_dir) == ["train.learning-rate-max"]


def truncate_adapter(run_dir, tmp_path):
    path = run_dir / "state" / "global_adapter.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def garble_state_json(run_dir, tmp_path):
    (run_dir / "state" / "state.json").write_text('{"round": 2, "adapt')


def foreign_adapter(run_dir, tmp_path):
    """Another base model's adapter (hidden size 48, not 32), with a consistent checksum."""
    state = load_round_state(run_dir)
    other = build_tiny_model(tmp_path / "other-model", hidden=48)
    state.global_state = fresh_adapter(other)
    save_round_state(run_dir, state)


def remove_state(run_dir, tmp_path):
    for path in (run_dir / "state").iterdir():
        path.unlink()
    (run_dir / "state").rmdir()


@pytest.mark.parametrize("damage, extra, message", [
    (truncate_adapter, "", "global_adapter.safetensors does not match the checksum"),
    (garble_state_json, "", "state.json is corrupt or truncated"),
    (foreign_adapter, "", "global_adapter.safetensors does not fit"),
    (remove_state, "", "holds no completed round to resume from"),
    (None, "model.lora.peft-lora-r=8", "was saved with model.lora.peft-lora-r = 32"),
    (None, 'model.lora.target-modules="q_proj,k_proj"', "model.lora.target-modules"),
    (None, "num-server-rounds=2", "already completed round 2 of num-server-rounds = 2"),
])
def test_resume_refuses_bad_state_and_writes_nothing(damage, extra, message, saved_run,
                                                     tiny_model_dir, alpaca_sample, tmp_path):
    run_dir, _, _ = saved_run
    if damage:
        damage(run_dir, tmp_path)
    before = snapshot(run_dir)
    outcome = run_app([settings(tiny_model_dir, alpaca_sample, tmp_path)
                       | {"run.resume": str(run_dir)}, extra])
    assert (outcome.exit_code, outcome.status) == (2, "rejected")
    assert message in outcome.error
    assert str(run_dir) in outcome.error  # the message names the file
    assert snapshot(run_dir) == before
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert flower_processes() == []


def test_fresh_run_into_a_used_folder_points_at_resume(saved_run, tiny_model_dir, alpaca_sample,
                                                       tmp_path):
    run_dir, _, _ = saved_run
    before = snapshot(run_dir)
    outcome = run_app([settings(tiny_model_dir, alpaca_sample, tmp_path)])
    assert outcome.exit_code == 2 and f'run.resume="{run_dir}"' in outcome.error
    assert snapshot(run_dir) == before
    with pytest.raises(StateError, match="run.json does not exist"):
        open_resumable(build_config({"run.resume": str(tmp_path)}))


def test_a_running_run_whose_server_is_gone_reads_as_interrupted(tmp_path):
    record = {"status": "running", "server": server_process()}
    assert current_status(record) == "running"  # this process is alive
    gone = subprocess.run([sys.executable, "-c", "from flowertune_nlp.outputs import "
                           "server_process as s; import json; print(json.dumps(s()))"],
                          capture_output=True, text=True, check=True)
    record["server"] = json.loads(gone.stdout)
    assert current_status(record) == "interrupted"
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert read_status(tmp_path / "run.json") == "interrupted"
    assert current_status({**record, "status": "completed"}) == "completed"
    assert read_status(tmp_path / "missing.json") is None
