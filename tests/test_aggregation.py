"""Aggregation rules and privacy, hook by hook, with replies built in the test (as Flower's own
strategy tests do): FlexLoRA's projection, the DP wrappers' and mods' clipping, the rules' state
across a resume, the driver's screening and fp16 upcast with any rule, and the refusals."""

import importlib.util

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from mock_replies import FakeGrid, adapter_reply, push, task_identity  # noqa: F401 (fixture)

from flowertune_nlp import messages as wire
from flowertune_nlp.aggregation import build_rule, load_rule_state, rule_state
from flowertune_nlp.config import ConfigError, build_config, planned_clients_per_round
from flowertune_nlp.faults import parse_faults, reply_state
from flowertune_nlp.flexlora import flexlora_aggregate, project_average
from flowertune_nlp.nodes import NodeDirectory
from flowertune_nlp.outputs import RunOutputs
from flowertune_nlp.privacy import client_clipping_mod
from flowertune_nlp.round_driver import RoundDriver, RunStopped

A, B, M = ("q.lora_A.weight", "q.lora_B.weight", "q.lora_magnitude_vector")


def _config(tmp_path, **settings):
    return build_config({"static.dataset.num-partitions": 3, "strategy.fraction-train": 1.0,
                         "output-dir": str(tmp_path), "run-name": "r", **settings})


def _driver(tmp_path, **settings) -> RoundDriver:
    config = _config(tmp_path, **settings)
    nodes = NodeDirectory(FakeGrid({21: {"partition-id": 0, "num-partitions": 3}}), True, 3, 1, 5)
    rule = build_rule(config, planned_clients_per_round(config), population=3)
    return RoundDriver(config, RunOutputs.create(config), nodes, rule)


def _state(rng, scale=1.0) -> dict[str, torch.Tensor]:
    return {A: torch.tensor(rng.normal(size=(2, 5)) * scale, dtype=torch.float32),
            B: torch.tensor(rng.normal(size=(4, 2)) * scale, dtype=torch.float32)}


def _round(driver, server_round, states, examples=(10, 30, 20)):
    arrays = driver.global_arrays or ArrayRecord({k: torch.zeros_like(v)
                                                  for k, v in states[0].items()})
    messages = push(list(driver.configure_train(server_round, arrays, ConfigRecord(), None)))
    replies = [adapter_reply(m, s, n) for m, s, n in zip(messages, states, examples, strict=True)]
    arrays, metrics = driver.aggregate_train(server_round, replies)
    driver.end_of_round(server_round, arrays)
    return messages, (arrays, metrics)


def test_flexlora_keeps_the_best_rank_r_approximation_of_the_averaged_products():
    rng = np.random.default_rng(0)
    bs = [rng.normal(size=(6, 2)) for _ in range(3)]
    as_ = [rng.normal(size=(2, 5)) for _ in range(3)]
    weights = np.array([1.0, 2.0, 5.0])
    # By hand: the weighted mean of the products, its SVD, the top-2 part split evenly.
    mean = sum(w * b @ a for w, b, a in zip(weights / weights.sum(), bs, as_, strict=True))
    u, sigma, vt = np.linalg.svd(mean)
    best = (u[:, :2] * sigma[:2]) @ vt[:2]
    new_b, new_a = project_average(bs, as_, weights)
    assert new_b.shape == (6, 2) and new_a.shape == (2, 5) and new_b.dtype == np.float32
    np.testing.assert_allclose(new_b @ new_a, best, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(new_b, axis=0), np.sqrt(sigma[:2]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(new_a, axis=1), np.sqrt(sigma[:2]), rtol=1e-5)
    # FedAvg of the factors is not that approximation: the point of FlexLoRA.
    fedavg = (sum(w * b for w, b in zip(weights / weights.sum(), bs, strict=True))
              @ sum(w * a for w, a in zip(weights / weights.sum(), as_, strict=True)))
    assert np.linalg.norm(fedavg - mean) > 2 * np.linalg.norm(best - mean)


def test_flexlora_keeps_the_rank_of_a_layer_narrower_than_r():
    rng = np.random.default_rng(5)
    bs = [rng.normal(size=(3, 4)) for _ in range(2)]  # out 3 < r 4 (a small GQA v_proj)
    as_ = [rng.normal(size=(4, 6)) for _ in range(2)]
    new_b, new_a = project_average(bs, as_, np.array([1.0, 1.0]))
    assert new_b.shape == (3, 4) and new_a.shape == (4, 6)
    mean = (bs[0] @ as_[0] + bs[1] @ as_[1]) / 2  # rank 3 <= r: kept exactly
    np.testing.assert_allclose(new_b @ new_a, mean, atol=1e-5)


def test_flexlora_averages_dora_magnitudes_and_keeps_peft_key_order():
    states = [{A: np.ones((2, 3)), B: np.zeros((4, 2)), M: np.full(4, v)} for v in (1.0, 4.0)]
    merged = flexlora_aggregate(states, [3, 1])
    assert list(merged) == [A, B, M]
    np.testing.assert_allclose(merged[M], np.full(4, 1.75))
    np.testing.assert_allclose(merged[B] @ merged[A], np.zeros((4, 3)), atol=1e-12)


def test_the_driver_runs_flexlora_in_source_order_with_fp16_uploads_upcast(tmp_path):
    rng = np.random.default_rng(1)
    states = [_state(rng) for _ in range(3)]
    driver = _driver(tmp_path, **{"strategy.name": "flexlora", "comm.transport": "fp16"})
    _, (arrays, _) = _round(driver, 1, [{k: v.half() for k, v in s.items()} for s in states])
    new = arrays.to_torch_state_dict()
    assert all(v.dtype == torch.float32 for v in new.values())
    half = [{k: v.half().float().numpy() for k, v in s.items()} for s in states]
    expected = flexlora_aggregate(half, [10, 30, 20])
    np.testing.assert_allclose((new[B] @ new[A]).numpy(), expected[B] @ expected[A], atol=1e-5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_a_stateful_rule_resumed_from_its_saved_state_continues_exactly(tmp_path, name):
    rng = np.random.default_rng(2)
    rounds = [[_state(rng, 0.1) for _ in range(3)] for _ in range(3)]
    straight = _driver(tmp_path / "a", **{"strategy.name": name})
    results = [_round(straight, r + 1, states)[1][0] for r, states in enumerate(rounds)]

    first = _driver(tmp_path / "b", **{"strategy.name": name})
    _round(first, 1, rounds[0])
    arrays, values = rule_state(first.rule)
    assert arrays, f"{name} carries no state to save"
    resumed = _driver(tmp_path / "c", **{"strategy.name": name})
    load_rule_state(resumed.rule, arrays, values)
    resumed.round_offset, resumed.global_arrays = 1, first.global_arrays
    for r in (2, 3):
        arrays_r, _ = _round(resumed, r - 1, rounds[r - 1])[1]
        expected = results[r - 1].to_torch_state_dict()
        for key, value in arrays_r.to_torch_state_dict().items():
            assert torch.equal(value, expected[key]), (name, r, key)
    assert not torch.equal(results[-1].to_torch_state_dict()[A],
                           torch.stack([s[A] for s in rounds[-1]]).mean(0))  # not plain FedAvg


def test_server_side_dp_clips_every_update_to_the_bound_and_accounts_epsilon(tmp_path):
    driver = _driver(tmp_path, **{"privacy.mode": "server-fixed", "privacy.clipping-norm": 0.5,
                                  "privacy.noise-multiplier": 0.0})
    rng = np.random.default_rng(3)
    messages, (arrays, _) = _round(driver, 1, [_state(rng, 3.0) for _ in range(3)])
    wrapper = driver.rule
    assert wrapper.clipping_norm == 0.5
    # Without noise the global is the mean of the clipped updates: each has norm <= 0.5.
    flat = np.concatenate([v.numpy().ravel() for v in arrays.to_torch_state_dict().values()])
    assert np.linalg.norm(flat) <= 0.5 + 1e-6
    assert driver.outputs.metrics[-1]["privacy_epsilon"] is None  # no noise: nothing accounted

    noisy = _driver(tmp_path / "n", **{"privacy.mode": "server-fixed",
                                       "privacy.noise-multiplier": 1.0})
    _round(noisy, 1, [_state(rng) for _ in range(3)])
    first = noisy.outputs.metrics[-1]["privacy_epsilon"]
    _round(noisy, 2, [_state(rng) for _ in range(3)])
    assert 0 < first < noisy.outputs.metrics[-1]["privacy_epsilon"]
    assert noisy.outputs.metrics[-1]["privacy_delta"] == 1e-5


def test_dp_weighs_replies_equally_and_a_round_with_a_failure_releases_nothing(tmp_path):
    driver = _driver(tmp_path, **{"privacy.mode": "server-fixed", "privacy.clipping-norm": 10.0,
                                  "privacy.noise-multiplier": 0.0})
    states = [{A: torch.full((2, 5), v), B: torch.zeros(4, 2)} for v in (0.1, 0.2, 0.6)]
    _, (arrays, _) = _round(driver, 1, states, examples=(1, 1, 100))
    np.testing.assert_allclose(arrays.to_torch_state_dict()[A].numpy(), 0.3, rtol=1e-6)

    accounted = _driver(tmp_path / "a", **{"privacy.mode": "server-fixed",
                                           "privacy.noise-multiplier": 1.0})
    _, (arrays, _) = _round(accounted, 1, states)
    spent = accounted.outputs.metrics[-1]["privacy_epsilon"]
    messages = push(list(accounted.configure_train(2, arrays, ConfigRecord(), None)))
    replies = [adapter_reply(m, s, 1) for m, s in zip(messages[:2], states, strict=False)]
    kept, _ = accounted.aggregate_train(2, replies)  # one client never answered
    accounted.end_of_round(2, kept)
    row = accounted.outputs.metrics[-1]
    assert (row["clients"], row["kept_previous_global"]) == (2, True)
    assert row["privacy_epsilon"] == spent  # no release, no privacy spent
    assert torch.equal(kept.to_torch_state_dict()[A], arrays.to_torch_state_dict()[A])


def test_the_privacy_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path):
    driver = _driver(tmp_path, **{"privacy.mode": "server-fixed",
                                  "privacy.noise-multiplier": 1.0, "privacy.max-epsilon": 6.0})
    rng = np.random.default_rng(4)
    _round(driver, 1, [_state(rng) for _ in range(3)])
    assert driver.outputs.metrics[-1]["privacy_epsilon"] < 6.0
    with pytest.raises(RunStopped, match=r"spent epsilon \(4.729 .* past privacy.max-epsilon = 6"):
        _round(driver, 2, [_state(rng) for _ in range(3)])


def _train_message(mode: str, arrays: dict, clipping_norm: float | None) -> Message:
    settings = ConfigRecord({wire.PRIVACY_MODE: mode})
    if clipping_norm is not None:
        settings[KEY_CLIPPING_NORM] = clipping_norm
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.CONFIG: settings}),
                   dst_node_id=1, message_type=MessageType.TRAIN)


def test_the_client_mod_clips_with_flowers_mod_only_where_the_run_asks(tmp_path):
    received = {A: torch.zeros(2, 5), B: torch.zeros(4, 2)}
    trained = {A: torch.full((2, 5), 1.0), B: torch.full((4, 2), 1.0)}  # norm sqrt(18)

    def train(msg, context):
        return adapter_reply(msg, trained, 8)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for mode in ("client-fixed", "client-adaptive"):
        reply = client_clipping_mod(_train_message(mode, received, 0.5), context, train)
        clipped = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
        norm = torch.cat([v.ravel() for v in clipped.values()]).norm()
        assert norm == pytest.approx(0.5, rel=1e-5), mode
    reply = client_clipping_mod(_train_message("off", received, None), context, train)
    assert torch.equal(reply.content.array_records[wire.ARRAYS].to_torch_state_dict()[A],
                       trained[A])


def test_poisoned_updates_are_well_formed_and_reproducible():
    received = {A: torch.ones(2, 5), B: torch.zeros(4, 2)}
    trained = {A: torch.full((2, 5), 1.5), B: torch.full((4, 2), 0.1)}
    scale, flip, noise = parse_faults("scale=4:0:*,signflip:1:*,noise=0.5:2:*")
    assert (scale.value, flip.value, noise.value) == (4.0, None, 0.5)
    scaled = reply_state(scale, trained, received, seed=1)
    torch.testing.assert_close(scaled[A], torch.full((2, 5), 3.0))
    torch.testing.assert_close(scaled[B], torch.full((4, 2), 0.4))
    flipped = reply_state(flip, trained, received, seed=1)
    torch.testing.assert_close(flipped[A], torch.full((2, 5), 0.5))
    noisy = reply_state(noise, trained, received, seed=7)
    assert torch.equal(noisy[A], reply_state(noise, trained, received, seed=7)[A])
    assert 0.3 < float((noisy[A] - trained[A]).std()) < 0.8
    assert parse_faults("scale:0:*")[0].value == 10.0
    with pytest.raises(ValueError, match="KIND:PARTITION:ROUND"):
        parse_faults("signflip=3:0:*")


@pytest.mark.parametrize("settings, key, fragment", [
    ({"strategy.name": "fedsgd"}, "strategy.name", "allowed values are fedavg"),
    ({"strategy.proximal-mu": 0.1}, "strategy.proximal-mu", "a parameter of fedprox"),
    ({"strategy.name": "fedavgm", "strategy.eta": 0.1}, "strategy.eta", "fedadam/fedyogi"),
    ({"strategy.name": "krum", "strategy.fraction-train": 0.1},
     "strategy.num-malicious-nodes", "needs at least 5 clients per round"),
    ({"strategy.name": "bulyan", "strategy.num-malicious-nodes": 1},
     "strategy.num-malicious-nodes", "needs at least 7"),
    ({"privacy.mode": "client-fixed", "comm.transport": "fp16"}, "comm.transport", "fp32"),
    ({"privacy.mode": "server-fixed", "strategy.name": "fedmedian"}, "strategy.name",
     "plain mean of the clipped updates"),
    ({"privacy.mode": "client-adaptive", "strategy.name": "krum",
      "privacy.clipped-count-stddev": 1.0}, "strategy.name", "use fedavg or fedprox"),
    ({"privacy.mode": "server-adaptive", "privacy.target-delta": 1e-6,
      "privacy.clipped-count-stddev": 1.0}, "privacy.target-delta", "accounts no epsilon"),
    ({"static.dataset.dirichlet-alpha": 0.1}, "static.dataset.dirichlet-alpha",
     "a parameter of the dirichlet partitioner"),
    ({"privacy.mode": "server-adaptive", "privacy.max-epsilon": 8.0}, "privacy.max-epsilon",
     "no privacy accountant"),
    ({"privacy.noise-multiplier": 0.5}, "privacy.noise-multiplier", "privacy.mode"),
    ({"privacy.mode": "client-adaptive", "privacy.noise-multiplier": 0.5},
     "privacy.clipped-count-stddev", "must be above 0.25 (it is 0.25, Flower's default"),
])
def test_bad_aggregation_settings_are_refused_naming_key_value_and_fix(settings, key, fragment):
    with pytest.raises(ConfigError, match=f"'{key}'") as refused:
        build_config({"static.dataset.num-partitions": 5, "strategy.fraction-train": 1.0,
                      **settings})
    assert fragment in str(refused.value)


def test_dp_without_the_accountant_installed_is_refused_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dp_accounting" else real(name, *a))
    with pytest.raises(ConfigError, match=r"flwr\[dp\]==1.42.0"):
        build_config({"privacy.mode": "server-fixed"})


def test_fedprox_adds_the_proximal_gradient_once_per_optimiser_step(tiny_model_dir,
                                                                    alpaca_sample):
    import tempfile

    from flowertune_nlp import training
    from flowertune_nlp.nodes import Source

    config = build_config({
        "model.name": str(tiny_model_dir), "model.quantization": 0, "model.precision": "fp32",
        "static.dataset.name": str(alpaca_sample), "train.seq-length": 128,
        "model.lora.peft-lora-dropout": 0.0, "strategy.name": "fedprox"})
    client = training.get_client_model(config)
    examples = training.get_partition(config, Source(0), client.tokenizer).dataset.select(range(2))
    with tempfile.TemporaryDirectory() as out:
        trainer = training.make_trainer(config, client, examples, 1e-4, 0, out)
    batch = next(iter(trainer.get_train_dataloader()))
    trainable = [p for p in client.model.parameters() if p.requires_grad]

    def gradients(mu: float) -> list[torch.Tensor]:
        client.model.zero_grad()
        with training.proximal_term(client.model, mu, accumulation_steps=4):
            with torch.no_grad():
                for param in trainable:
                    param.add_(0.01)  # 0.01 away from the adapter the round started from
            trainer.compute_loss(client.model, batch).backward()
            with torch.no_grad():
                for param in trainable:
                    param.sub_(0.01)
        return [p.grad.clone() for p in trainable]

    plain, proximal = gradients(0.0), gradients(2.0)
    for without, with_term in zip(plain, proximal, strict=True):
        torch.testing.assert_close(with_term - without, torch.full_like(without, 2.0 * 0.01 / 4))
    client.model.zero_grad()
    assert gradients(0.0)[0].equal(plain[0])  # the hooks are gone after the round


def test_an_adaptive_dp_round_without_usable_replies_is_an_empty_round(tmp_path):
    from flwr.app import Error

    driver = _driver(tmp_path, **{"privacy.mode": "server-adaptive",
                                  "privacy.noise-multiplier": 0.5,
                                  "privacy.clipped-count-stddev": 1.0})
    arrays = ArrayRecord({A: torch.zeros(2, 5), B: torch.zeros(4, 2)})
    messages = push(list(driver.configure_train(1, arrays, ConfigRecord(), None)))
    failed = [Message(Error(code=0, reason="out of memory"), reply_to=m) for m in messages]
    kept, _ = driver.aggregate_train(1, failed)  # Flower's wrapper would divide by 0 replies
    driver.end_of_round(1, kept)
    row = driver.outputs.metrics[-1]
    assert (row["failures"], row["kept_previous_global"]) == (3, True)
    assert torch.equal(kept.to_torch_state_dict()[A], torch.zeros(2, 5))


def test_the_dp_noise_seed_is_secret_and_survives_a_resume(tmp_path):
    driver = _driver(tmp_path, **{"privacy.mode": "server-fixed",
                                  "privacy.noise-multiplier": 1.0})
    other = _driver(tmp_path / "o", **{"privacy.mode": "server-fixed",
                                       "privacy.noise-multiplier": 1.0})
    assert driver.noise_seed != other.noise_seed  # not derived from the (public) seed
    rng = np.random.default_rng(6)
    _round(driver, 1, [_state(rng) for _ in range(3)])
    from flowertune_nlp.run_state import load_round_state

    saved = load_round_state(driver.outputs.directory)
    assert saved.rule_values["noise_seed"] == driver.noise_seed
    record = (driver.outputs.directory / "run.json").read_text()
    metrics = (driver.outputs.directory / "metrics.jsonl").read_text()
    assert str(driver.noise_seed) not in record + metrics


def test_a_run_stopped_by_its_budget_resumes_with_a_larger_one(tmp_path):
    from flowertune_nlp.run_state import check_resumable, load_round_state

    settings = {"privacy.mode": "server-fixed", "privacy.noise-multiplier": 1.0,
                "privacy.max-epsilon": 6.0}
    driver = _driver(tmp_path, **settings)
    rng = np.random.default_rng(7)
    _round(driver, 1, [_state(rng) for _ in range(3)])
    with pytest.raises(RunStopped):
        _round(driver, 2, [_state(rng) for _ in range(3)])
    saved = load_round_state(driver.outputs.directory)
    larger = _config(tmp_path, **{**settings, "privacy.max-epsilon": 20.0})
    assert check_resumable(saved, larger, driver.outputs.directory) == ["privacy.max-epsilon"]
    nodes = NodeDirectory(FakeGrid({21: {"partition-id": 0, "num-partitions": 3}}), True, 3, 1, 5)
    resumed = RoundDriver(larger, RunOutputs.create(_config(tmp_path / "r", **settings)), nodes,
                          build_rule(larger, 3, population=3), saved)
    resumed.global_arrays = ArrayRecord(saved.global_state)
    _round(resumed, 1, [_state(rng) for _ in range(3)])  # round 2 of the run
    assert resumed.outputs.metrics[-1]["privacy_epsilon"] > 6.0
    with pytest.raises(Exception, match="privacy.target-delta"):
        check_resumable(saved, _config(tmp_path, **{**settings, "privacy.target-delta": 1e-6}),
                        driver.outputs.directory)
