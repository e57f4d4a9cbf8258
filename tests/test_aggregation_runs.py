"""Aggregation rules and privacy through real `flwr run` simulations on the tiny model: a
poisoned client that screening must let through and a robust rule resists, and client-side DP
(Flower's clipping mod on the ClientApp) with the accountant's budget stopping the run."""

import json

import pytest
import torch
from flower_runs import flower_processes, tiny_run_config, tiny_settings
from safetensors.torch import load_file

from flowertune_nlp.config import build_config
from flowertune_nlp.launch import run_app
from flowertune_nlp.models import fresh_adapter

pytestmark = pytest.mark.slow


def launch(model, data, out, name, extra, rounds=2, partitions=3, fraction=1.0):
    federation = f"static.dataset.num-partitions={partitions} strategy.fraction-train={fraction}"
    return run_app(tiny_run_config(model, data, out, name, rounds, f"{federation} {extra}"),
                   num_supernodes=3, cpus_per_client=1)


def final_adapter(run_dir, server_round=2):
    return load_file(str(run_dir / f"peft_{server_round}" / "adapter_model.safetensors"))


def distance(one, other) -> float:
    return sum(float((one[k] - other[k]).pow(2).sum()) for k in one) ** 0.5


def test_a_scaled_attacker_passes_screening_and_the_median_resists_it(tiny_model_dir,
                                                                     alpaca_sample, tmp_path):
    """Also: held-out evaluation every round (base at round 0) and federated evaluation."""
    attack = 'faults.inject="scale=50:0:*"'
    scored = "static.dataset.validation-size=16 strategy.fraction-evaluate=0.67"
    runs = {name: launch(tiny_model_dir, alpaca_sample, tmp_path, name, f"{scored} {extra}")
            for name, extra in (("clean", ""), ("fedavg", attack),
                                ("fedmedian", f'strategy.name="fedmedian" {attack}'))}
    assert {name: run.status for name, run in runs.items()} == dict.fromkeys(runs, "completed")
    for name in ("fedavg", "fedmedian"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        assert [(r["clients"], r["rejected"]) for r in rows] == [(3, 0), (3, 0)]  # looks fine
    rows = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").open()]
    record = json.loads((tmp_path / "clean" / "run.json").read_text())
    assert record["heldout_base"]["heldout_examples"] == rows[-1]["heldout_examples"] > 0
    for row in rows:
        assert row["heldout_loss_ci_low"] <= row["heldout_loss"] <= row["heldout_loss_ci_high"]
        assert (row["federated_eval_clients"], row["federated_eval_failures"]) == (2, [])
        assert row["federated_eval_loss"] > 0
    # 3 train downloads + 3 uploads, and apart from them the 2 evaluate messages, each
    # 4 bytes per parameter + a 128-byte header per tensor.
    adapter = final_adapter(tmp_path / "clean")
    per_message = sum(4 * t.numel() + 128 for t in adapter.values())
    assert rows[0]["comm_bytes_round"] == 6 * per_message
    assert (rows[0]["comm_eval_bytes_round"], rows[1]["comm_eval_bytes_total"]) == (
        2 * per_message, 4 * per_message)
    partitions = json.loads((tmp_path / "clean" / "partitions.json").read_text())
    assert [p["partition"] for p in partitions["partitions"]] == [0, 1, 2]
    assert partitions["validation_rows"] == 16
    assert (tmp_path / "clean" / "loss.png").stat().st_size > 10_000
    clean = adapter
    fedavg, median = (distance(final_adapter(tmp_path / n), clean) for n in ("fedavg",
                                                                             "fedmedian"))
    assert median < fedavg / 5, (median, fedavg)
    assert flower_processes() == []


def test_client_side_dp_clips_on_the_clients_and_the_budget_stops_the_run(tiny_model_dir,
                                                                          alpaca_sample,
                                                                          tmp_path):
    # Noise 1.0 on 2 clients: round 1 spends epsilon 4.73, round 2 would reach 7.08 > 6.
    # The clipping norm is far below the clients' updates (~3e-3 measured), so that what they
    # send shows in the global update: see below.
    clipping = 1e-6
    outcome = launch(tiny_model_dir, alpaca_sample, tmp_path, "dp",
                     f'privacy.mode="client-fixed" privacy.clipping-norm={clipping} '
                     "privacy.noise-multiplier=1.0 privacy.max-epsilon=6", rounds=3,
                     fraction=0.67)
    assert (outcome.exit_code, outcome.status) == (1, "stopped")
    assert "privacy.max-epsilon = 6" in outcome.error
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").open()]
    assert len(rows) == 1 and (rows[0]["clients"], rows[0]["failures"]) == (2, 0)
    assert rows[0]["privacy_epsilon"] == pytest.approx(4.7285, abs=1e-3)
    record = json.loads((tmp_path / "dp" / "run.json").read_text())
    assert record["privacy_epsilon"] == rows[0]["privacy_epsilon"]
    assert all(torch.isfinite(t).all() for t in final_adapter(tmp_path / "dp", 1).values())
    # Round 1's global update is the mean of the 2 clipped updates (norm <= clipping) plus
    # Flower's noise of std noise-multiplier x clipping / 2 in each of d coordinates: its norm
    # is that noise's, sqrt(d) x clipping / 2 (within 5 %; the chi distribution's spread is
    # 0.8 %). Updates sent unclipped (~3e-3) would make it ~70 times larger.
    config = build_config(tiny_settings(tiny_model_dir, alpaca_sample, tmp_path, "dp"))
    initial = fresh_adapter(str(tiny_model_dir), config.model.lora, config.seed)
    update = torch.cat([(final_adapter(tmp_path / "dp", 1)[k] - v).ravel()
                        for k, v in initial.items()])
    noise_norm = update.numel() ** 0.5 * 1.0 * clipping / 2
    assert float(update.norm()) == pytest.approx(noise_norm, rel=0.05)
    assert flower_processes() == []
