"""Crashes and faults through real `flwr run` simulations on a tiny model: exact resume after a
SIGKILL, failing and poisoned clients, rounds with no usable reply, a full disk mid-save."""

import json
import os
import shutil
import signal
import stat
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from flower_runs import flower_processes, tiny_run_config
from safetensors.torch import load_file

from flowertune_nlp.launch import run_app
from flowertune_nlp.run_state import load_round_state

pytestmark = pytest.mark.slow
# 3 partitions, 2 of them sampled per round, 2 clients training at once on 2 cores
FEDERATION = "static.dataset.num-partitions=3 strategy.fraction-train=0.67"
STATEFUL_RULE = 'strategy.name="fedadam" strategy.eta=0.01'
DP = 'privacy.mode="server-fixed" privacy.noise-multiplier=1.0'


def launch(model, data, out, name, rounds, extra=""):
    return run_app(tiny_run_config(model, data, out, name, rounds, f"{FEDERATION} {extra}"),
                   num_supernodes=3, cpus_per_client=1)


def adapter(run_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"peft_{server_round}" / "adapter_model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def saved_round(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "state" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return None


def wait_for_round(run_dir: Path, server_round: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (saved_round(run_dir) or 0) < server_round:
        assert time.monotonic() < deadline, f"round {server_round} was never saved"
        time.sleep(0.05)


def kill_server_app_after(run_dir: Path, server_round: int, timeout: float = 300) -> int:
    """SIGKILL the process running the ServerApp once `server_round` is saved."""
    wait_for_round(run_dir, server_round, timeout)
    for proc in psutil.process_iter(["cmdline"]):
        if "flwr-simulation" in " ".join(proc.info["cmdline"] or []):
            os.kill(proc.pid, signal.SIGKILL)
            return proc.pid
    raise AssertionError("no flwr-simulation process to kill")


def test_killed_run_resumes_exactly(tiny_model_dir, alpaca_sample, tmp_path):
    """With a stateful rule: FedAdam's moments must survive the kill for the result to match."""
    reference = launch(tiny_model_dir, alpaca_sample, tmp_path, "reference", 3, STATEFUL_RULE)
    assert reference.status == "completed"

    # Clients stall in round 2, so the kill lands after round 1 is saved and before round 2.
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(run=launch(
        tiny_model_dir, alpaca_sample, tmp_path, "killed", 3,
        f'{STATEFUL_RULE} faults.inject="stall:*:2"')))
    runner.start()
    kill_server_app_after(tmp_path / "killed", 1)
    runner.join(timeout=300)
    killed = outcome["run"]
    assert (killed.exit_code, killed.status) == (1, "interrupted")
    assert 'run.resume="' in killed.error
    assert saved_round(tmp_path / "killed") == 1
    assert flower_processes() == []

    resumed = launch(tiny_model_dir, alpaca_sample, tmp_path, "ignored", 3,
                     f'{STATEFUL_RULE} run.resume="{tmp_path / "killed"}"')
    assert (resumed.exit_code, resumed.status) == (0, "completed")
    assert resumed.run_dir == tmp_path / "killed"
    assert not (tmp_path / "ignored").exists()

    expected, got = adapter(tmp_path / "reference", 3), adapter(tmp_path / "killed", 3)
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bit for bit
    ref_rows, rows = metrics(tmp_path / "reference"), metrics(tmp_path / "killed")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["partitions"] for r in rows] == [r["partitions"] for r in ref_rows]
    assert rows[-1]["comm_bytes_total"] == ref_rows[-1]["comm_bytes_total"]
    record = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert record["comm_bytes_total"] == ref_rows[-1]["comm_bytes_total"]
    assert [r["from_round"] for r in record["resumes"]] == [1]
    assert record["resumes"][0]["previous_status"] == "running"
    assert record["resumes"][0]["changed_keys"] == []
    assert flower_processes() == []


def test_a_dp_run_resumes_with_the_noise_of_the_uninterrupted_run(tiny_model_dir, alpaca_sample,
                                                                   tmp_path):
    """The DP noise secret is drawn by the run and kept in its private state only, so the
    uninterrupted run to compare with is the same run: its folder as round 1 is saved (what a
    kill at that moment leaves behind) is resumed. (test_killed_run_resumes_exactly kills a
    real run.)"""
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(run=launch(
        tiny_model_dir, alpaca_sample, tmp_path, "straight", 3, DP)))
    runner.start()
    wait_for_round(tmp_path / "straight", 1)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "straight", cut, symlinks=True)
    runner.join(timeout=300)
    assert outcome["run"].status == "completed"
    assert (saved_round(cut), len(metrics(cut))) == (1, 1)  # the copy caught round 1 only

    resumed = launch(tiny_model_dir, alpaca_sample, tmp_path, "ignored", 3,
                     f'{DP} run.resume="{cut}"')
    assert (resumed.exit_code, resumed.status) == (0, "completed")

    expected, got = adapter(tmp_path / "straight", 3), adapter(cut, 3)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bit for bit
    key = next(iter(got))
    assert not torch.equal(got[key], adapter(cut, 2)[key])  # round 3 did train
    rows, straight_rows = metrics(cut), metrics(tmp_path / "straight")
    assert [r["privacy_epsilon"] for r in rows] == [r["privacy_epsilon"] for r in straight_rows]
    state = cut / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "state.json").stat().st_mode) == 0o600
    assert flower_processes() == []


def test_failing_and_poisoned_clients_are_counted_never_averaged(tiny_model_dir, alpaca_sample,
                                                                  tmp_path):
    # Rounds sample partitions [0, 1], [0, 1], [0, 2] for seed 42 (checked below).
    faults = "raise:0:1,nan:1:2,shape:0:3,keys:2:3"
    outcome = launch(tiny_model_dir, alpaca_sample, tmp_path, "faults", 3,
                     f'faults.inject="{faults}"')
    assert (outcome.exit_code, outcome.status) == (0, "completed")
    rows = metrics(tmp_path / "faults")
    assert [r["partitions"] for r in rows] == [[0, 1], [0, 1], [0, 2]]
    one, two, three = rows
    assert (one["clients"], one["failures"], one["rejected"]) == (1, 1, 0)
    assert one["failure_reasons"] == [
        "partition 0: injected failure (faults.inject) in partition 0, round 1"]
    assert (two["clients"], two["failures"], two["rejected"]) == (1, 0, 1)
    assert two["rejection_reasons"][0].startswith("partition 1: non-finite values in ")
    assert (three["clients"], three["rejected"], three["kept_previous_global"]) == (0, 2, True)
    reasons = " | ".join(three["rejection_reasons"])
    assert "partition 0: wrong shape" in reasons and "partition 2: wrong keys" in reasons
    assert three["train_loss"] is None
    # The empty round kept the global adapter of round 2, bit for bit.
    kept, before = adapter(tmp_path / "faults", 3), adapter(tmp_path / "faults", 2)
    assert all(torch.equal(kept[k], before[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert flower_processes() == []


def test_empty_rounds_stop_resumably_and_a_full_disk_loses_nothing(tiny_model_dir,
                                                                   alpaca_sample, tmp_path):
    run_dir = tmp_path / "empty"
    stopped = launch(tiny_model_dir, alpaca_sample, tmp_path, "empty", 3,
                     'faults.inject="raise:*:1,raise:*:2" run.max-empty-rounds=2')
    assert (stopped.exit_code, stopped.status) == (1, "stopped")
    assert "run.max-empty-rounds = 2" in stopped.error and "run.resume=" in stopped.error
    assert [r["failures"] for r in metrics(run_dir)] == [2, 2]
    assert saved_round(run_dir) == 2

    # Resume, but the disk fills up while round 3 is saved.
    full = launch(tiny_model_dir, alpaca_sample, tmp_path, "x", 3,
                  f'run.resume="{run_dir}" faults.inject="disk-full:*:3"')
    assert (full.exit_code, full.status) == (1, "failed")
    assert "saving round 3" in full.error and "state of round 2 is intact" in full.error
    state = load_round_state(run_dir)  # verifies the checksum of the saved adapter
    assert state.server_round == 2
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "loss.png", "metrics.jsonl", "partitions.json", "peft_1", "peft_2", "run.json",
        "state"]  # no partial peft_3 or temporary file
    assert [r["round"] for r in metrics(run_dir)] == [1, 2]
    assert all(torch.equal(state.global_state[k], v) for k, v in adapter(run_dir, 2).items())

    done = launch(tiny_model_dir, alpaca_sample, tmp_path, "x", 3, f'run.resume="{run_dir}"')
    assert (done.exit_code, done.status) == (0, "completed")
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["clients"] == 2 and rows[2]["failures"] == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert [r["previous_status"] for r in record["resumes"]] == ["stopped", "failed"]
    assert flower_processes() == []
