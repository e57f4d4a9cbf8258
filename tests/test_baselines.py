"""The centralized and local-only baselines: the same schedule and examples per round as the
federated run they are compared with, scored on the same held-out rows."""

import json

import pytest

from flowertune_nlp.baselines import baseline_config, main
from flowertune_nlp.config import build_config
from flowertune_nlp.data import load_validation_rows


def _settings(tiny_model_dir, alpaca_sample, tmp_path):
    return [f'model.name="{tiny_model_dir}" model.quantization=0 '
            f'static.dataset.name="{alpaca_sample}" static.dataset.num-partitions=4 '
            "strategy.fraction-train=0.5 static.dataset.validation-size=16 train.seq-length=128 "
            "train.training-arguments.max-steps=1 "
            "train.training-arguments.per-device-train-batch-size=2 num-server-rounds=2"]


@pytest.mark.slow  # trains both baselines end to end
def test_baselines_process_the_federated_runs_examples_on_the_same_held_out_rows(
        tiny_model_dir, alpaca_sample, tmp_path):
    run_config = _settings(tiny_model_dir, alpaca_sample, tmp_path)
    federated = build_config({"static.dataset.name": str(alpaca_sample),
                              "static.dataset.num-partitions": 4,
                              "static.dataset.validation-size": 16,
                              "strategy.fraction-train": 0.5})
    central = baseline_config(federated, "centralized", tmp_path / "c")
    assert central.train.max_steps == 2 * federated.train.max_steps  # K = 2 clients per round
    assert central.dataset.num_partitions == 1
    same = [r["instruction"] for r in load_validation_rows(federated.dataset, 42)]
    assert [r["instruction"] for r in load_validation_rows(central.dataset, 42)] == same

    for kind, extra in (("centralized", []), ("local", ["--local-partitions", "1,3"])):
        assert main(["--kind", kind, "--run-config", run_config[0],
                     "--output", str(tmp_path / kind), *extra]) == 0
        record = json.loads((tmp_path / kind / "run.json").read_text())
        assert record["status"] == "completed" and "heldout_loss" in record["heldout_base"]
        rows = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").open()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["examples"] == 2 * 1 * 2 for r in rows)  # K x steps x batch
        assert len(rows[-1]["heldout_loss_per_source"]) == (1 if kind == "centralized" else 2)
        if kind == "local":  # the mean of the holders' losses, with their range
            low, high = rows[-1]["heldout_loss_min"], rows[-1]["heldout_loss_max"]
            assert low <= rows[-1]["heldout_loss"] <= high
        else:
            assert "heldout_loss_ci_low" in rows[-1]
        assert (tmp_path / kind / "peft_2" / "adapter_model.safetensors").is_file()


def test_a_baseline_without_held_out_rows_or_with_a_bad_partition_is_refused(
        tiny_model_dir, alpaca_sample, tmp_path, capsys):
    run_config = _settings(tiny_model_dir, alpaca_sample, tmp_path)[0]
    assert main(["--kind", "local", "--run-config", run_config, "--local-partitions", "7",
                 "--output", str(tmp_path / "x")]) == 2
    assert "--local-partitions [7]" in capsys.readouterr().err
    assert main(["--kind", "centralized", "--run-config",
                 run_config.replace("validation-size=16", "validation-size=0"),
                 "--output", str(tmp_path / "y")]) == 2
    assert "static.dataset.validation-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
