"""The sweep wrapper end to end: run_all_experiments.sh -> run_experiments.py -> flwr run."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import SHARED_DATA

from flowertune_nlp.sweep_report import heldout_curve

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def sweep(*args: str, output_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "run_all_experiments.sh"), "--output-root", str(output_root), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=900)


TINY_OVERRIDES = ("num-server-rounds=1 model.quantization=0 train.seq-length=128 "
                  "train.training-arguments.max-steps=1 "
                  "train.training-arguments.per-device-train-batch-size=2")


@pytest.mark.shared_data
def test_sweep_records_failure_completes_good_model_and_resumes(tiny_model_dir, tmp_path):
    common = ("--task", "general_nlp", "--data-dir", str(SHARED_DATA), "--run-id", "t1",
              "--run-config", f"{TINY_OVERRIDES} static.dataset.validation-size=16",
              "--baseline", "centralized,local", "--local-partitions", "3",
              "--limit-per-subject", "1",
              "--protocol", "logprob")
    missing = str(tmp_path / "no-such-model")
    first = sweep("--model", f"{tiny_model_dir},{missing}", *common, output_root=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    sweep_dir = tmp_path / "t1"
    pair_dir = sweep_dir / "general_nlp" / tiny_model_dir.name
    table = list(csv.DictReader((sweep_dir / "results.csv").open()))
    rows = {r["Model source"]: r for r in table if r["Setup"] == "federated"}
    good, bad = rows[str(tiny_model_dir)], rows[missing]
    assert good["Status"] == "completed" and bad["Status"] == "failed"
    assert good["Model"] == tiny_model_dir.name  # short names in the table
    assert good["Training data"].startswith("alpaca_en_demo.json, 1,000 rows (LLaMA-Factory's")
    setups = {r["Setup"]: r for r in table if r["Model source"] == str(tiny_model_dir)}
    assert list(setups) == ["base", "local", "federated", "centralized"]
    local = json.loads((pair_dir / "local" / "run.json").read_text())
    assert local["baseline_sources"] == ["partition 3"]  # --local-partitions reached it
    for setup in setups.values():  # scored on the same held-out rows, and on MMLU
        assert setup["Held-out loss [95% CI or range]"] and setup["Robust mean"], setup
    assert "does not exist" in bad["Error"]
    for column in ("Robust", "Robust mean", "Comm. Costs (MB)", "Rounds"):
        assert good[column] not in ("", None), column
    assert [cell.split()[0] for cell in good["Robust"].split(" · ")] == [
        "STEM", "Social", "Humanities"]
    scored = json.loads((pair_dir / "eval.json").read_text())
    assert float(good["Robust mean"]) == pytest.approx(
        100 * scored["protocols"]["logprob"]["average"], abs=0.01)
    assert (sweep_dir / "results-general_nlp.png").stat().st_size > 10_000
    assert (sweep_dir / "results.png").stat().st_size > 10_000
    assert "| Model |" in (sweep_dir / "results.md").read_text()
    pair = json.loads((pair_dir / "pair.json").read_text())
    metrics = [json.loads(x) for x in Path(pair["metrics_file"]).read_text().splitlines()]
    assert float(good["Comm. Costs (MB)"]) == pytest.approx(metrics[-1]["comm_mb_total"], abs=0.01)
    runs = [pair["metrics_file"]] + [pair["setups"][k]["metrics_file"]
                                     for k in ("local", "centralized")]
    curves = [heldout_curve(Path(run)) for run in runs]
    for rounds, losses, low, high in curves:  # the plot's held-out lines, from the base on
        assert rounds == [0, 1]
        assert all(lo <= loss <= hi for lo, loss, hi in zip(low, losses, high, strict=True))
    assert len({round(losses[0], 6) for _, losses, _, _ in curves}) == 1  # the same rows

    second = sweep("--model", str(tiny_model_dir), *common, output_root=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already completed" in second.stdout
    assert len(list(csv.DictReader((sweep_dir / "results.csv").open()))) == 5

    evaluated = sweep("--model", str(tiny_model_dir), *common[:-2], "--protocol", "flowertune",
                      "--eval-only", "--force", output_root=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "training" not in evaluated.stdout
    rows = {r["Model source"]: r for r in csv.DictReader((sweep_dir / "results.csv").open())
            if r["Setup"] == "federated"}
    assert rows[str(tiny_model_dir)]["Leaderboard mean"] not in ("", None)


@pytest.mark.shared_data
def test_sweep_resume_continues_a_stopped_training(tiny_model_dir, tmp_path):
    common = ("--model", str(tiny_model_dir), "--task", "general_nlp", "--data-dir",
              str(SHARED_DATA), "--run-id", "r1", "--limit-per-subject", "1",
              "--protocol", "logprob")
    two_rounds = TINY_OVERRIDES.replace("num-server-rounds=1", "num-server-rounds=2")
    stopped = sweep(*common, "--run-config",
                    f'{two_rounds} faults.inject="raise:*:1" run.max-empty-rounds=1',
                    output_root=tmp_path)
    assert stopped.returncode == 1
    assert "--resume --run-id r1" in stopped.stdout
    train_dir = tmp_path / "r1" / "general_nlp" / tiny_model_dir.name / "train"
    assert json.loads((train_dir / "run.json").read_text())["status"] == "stopped"

    resumed = sweep(*common, "--run-config", two_rounds, "--resume", output_root=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming training" in resumed.stdout
    rows = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rows] == [(1, 0), (2, 2)]
    assert not list(train_dir.parent.parent.glob("*.attempt-*"))  # resumed in place


@pytest.mark.parametrize(("args", "message"), [
    (("--task", "legal"), "unknown task 'legal'; known tasks: general_nlp, finance"),
    (("--task", "finance,legal"), "unknown task 'legal'"),
    (("--protocol", "exact"), "--protocol 'exact': choose leaderboard, robust or both"),
    (("--preset", "gpu-huge"), "unknown preset 'gpu-huge'; known presets:"),
    (("--data-dir", "/no/such/dir"), "has no mmlu/test (task general_nlp)"),
    (("--data-dir", "/no/such/dir", "--task", "code"), "has no code (task code)"),
    (("--resume",), "--resume needs the --run-id"),
    (("--limit-per-subject", "0"), "--eval-limit 0 is not >= 1"),
    (("--baseline", "solo"), "--baseline solo: unknown; choose from centralized, local"),
    (("--baseline", "local"), "--baseline compares held-out losses"),
    (("--local-partitions", "1"), "--local-partitions chooses the local baseline's data "
                                  "holders: add --baseline local"),
    (("--baseline", "local", "--local-partitions", "1,x", "--run-config",
      "static.dataset.validation-size=8"), "--local-partitions '1,x': give partition ids"),
    (("--baseline", "local", "--local-partitions", "20", "--run-config",
      "static.dataset.validation-size=8"),
     "--local-partitions [20] are not partitions of static.dataset.num-partitions = 20"),
])
def test_argument_errors_exit_2_and_write_nothing(args, message, tmp_path):
    result = sweep("--model", "some/model", *args, output_root=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert not any(tmp_path.rglob("results.*"))


def test_a_stopped_sweep_stops_the_command_it_runs(tmp_path):
    """SIGTERM to the sweep reaches its running command (the launcher, which then stops its
    SuperLink and Ray) instead of orphaning it."""
    marker = tmp_path / "child-stopped"
    child = ("import pathlib, signal, sys, time; "
             f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(marker)!r})"
             ".write_text('stopped'), sys.exit(0))); print('ready', flush=True); time.sleep(120)")
    sweep_side = ("import signal, sys; from pathlib import Path; import run_experiments as r; "
                  "signal.signal(signal.SIGTERM, signal.default_int_handler); "
                  f"r.run_logged([sys.executable, '-c', {child!r}], Path({str(tmp_path)!r}) / "
                  "'child.log', {})")
    sweep_process = subprocess.Popen([sys.executable, "-c", sweep_side], cwd=ROOT)
    log = tmp_path / "child.log"
    deadline = time.monotonic() + 60
    while "ready" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and sweep_process.poll() is None
        time.sleep(0.2)
    sweep_process.terminate()
    assert sweep_process.wait(timeout=60) != 0  # the sweep itself stops, with an error status
    assert marker.read_text() == "stopped"  # and its command got SIGTERM, time to clean up
