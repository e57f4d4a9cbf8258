"""A real `flwr run` of the app (local simulation SuperLink, Ray) on a tiny model."""

import hashlib
import json

import pytest
import torch
from flower_runs import flower_processes, tiny_run_config
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evaluation import curve
from flowertune_nlp.comm import expected_total_bytes
from flowertune_nlp.launch import APP_DIR, run_app

pytestmark = pytest.mark.slow


def test_two_round_simulation_saves_reloadable_adapter(tiny_model_dir, alpaca_sample, tmp_path,
                                                       mmlu_dir):
    pyproject = hashlib.sha256((APP_DIR / "pyproject.toml").read_bytes()).hexdigest()
    outcome = run_app(tiny_run_config(tiny_model_dir, alpaca_sample, tmp_path, "tiny"))
    assert (outcome.exit_code, outcome.status) == (0, "completed")
    run_dir = tmp_path / "tiny"
    assert outcome.run_dir == run_dir
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["final_adapter"] == str(run_dir / "peft_2")
    assert record["config"]["model"]["name"] == str(tiny_model_dir)
    assert record["versions"]["flwr"] == "1.42.0"

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients"] == 2 and row["failures"] == 0
        assert row["examples"] == 2 * 2 * 2  # clients x steps x batch
        assert row["train_loss"] > 0 and row["wall_seconds"] > 0
    assert rows[0]["learning_rate"] > rows[1]["learning_rate"]

    saved = load_file(str(run_dir / "peft_2" / "adapter_model.safetensors"))
    shapes = [tuple(t.shape) for t in saved.values()]
    assert rows[-1]["comm_bytes_total"] == expected_total_bytes(shapes, 2, 2)
    assert record["comm_bytes_total"] == rows[-1]["comm_bytes_total"]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(run_dir / "peft_2"))
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k), "B never trained"
    assert (run_dir / "peft_1").is_dir()

    assert flower_processes() == []
    assert hashlib.sha256((APP_DIR / "pyproject.toml").read_bytes()).hexdigest() == pyproject

    # The rounds-vs-score curve over the base model and both checkpoints.
    assert curve.main(["--run-dir", str(run_dir), "--mmlu-path", str(mmlu_dir),
                       "--limit-per-subject", "1", "--protocol", "logprob"]) == 0
    table = json.loads((run_dir / "evaluation" / "curve.json").read_text())["rows"]
    assert [r["round"] for r in table] == [0, 1, 2]
    assert [r["comm_mb"] for r in table] == [0.0] + [round(r["comm_mb_total"], 2) for r in rows]
    for row in table:  # the average is the unweighted mean of the three categories
        mean = sum(row[f"logprob_{c}"] for c in ("stem", "social_sciences", "humanities")) / 3
        assert row["logprob_average"] == pytest.approx(mean, abs=0.01)
    assert (run_dir / "evaluation" / "curve.png").stat().st_size > 10_000
    record["status"] = "running"
    (run_dir / "run.json").write_text(json.dumps(record))
    assert curve.main(["--run-dir", str(run_dir), "--mmlu-path", str(mmlu_dir)]) == 2


def test_bad_config_is_rejected_before_any_process_starts(tiny_model_dir, alpaca_sample,
                                                           tmp_path):
    config = tiny_run_config(tiny_model_dir, alpaca_sample, tmp_path, "bad")
    outcome = run_app([*config, "model.lora.peft-lora-r=0"])
    assert (outcome.exit_code, outcome.status) == (2, "rejected")
    assert "model.lora.peft-lora-r" in outcome.error and "> 0" in outcome.error
    assert not (tmp_path / "bad").exists()
    assert flower_processes() == []


def test_failing_run_is_reported_failed(tmp_path, alpaca_sample):
    """A model folder without weights passes validation but fails in the ServerApp."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    config = tiny_run_config(broken, alpaca_sample, tmp_path, "broken")
    outcome = run_app(config)
    assert (outcome.exit_code, outcome.status) == (1, "failed")
    assert json.loads((tmp_path / "broken" / "run.json").read_text())["status"] == "failed"
    assert flower_processes() == []


@pytest.mark.parametrize("run_config", ["num-server-rounds=4 num-server-rounds=2",
                                        "seed=", "configs/no-such-preset.toml"])
def test_malformed_run_config_is_rejected(run_config):
    outcome = run_app([run_config])
    assert (outcome.exit_code, outcome.status) == (2, "rejected")
    assert outcome.error.startswith(f"--run-config {run_config!r}: ")
    assert flower_processes() == []


def test_a_gpu_request_without_a_gpu_is_rejected_before_anything_starts(
        tiny_model_dir, alpaca_sample, tmp_path):
    config = tiny_run_config(tiny_model_dir, alpaca_sample, tmp_path, "gpu")
    outcome = run_app(config, gpus_per_client=0.5)
    assert (outcome.exit_code, outcome.status) == (2, "rejected")
    assert "no GPU is visible" in outcome.error
    assert not (tmp_path / "gpu").exists()
