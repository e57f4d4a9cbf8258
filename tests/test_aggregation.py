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
from flowertune_nlp.outputs import ADAPTER_WEIGHTS, RunOutputs
from flowertune_nlp.privacy import client_clipping_mod, new_noise_secret, noise_seed, round_noise
from flowertune_nlp.round_driver import RoundDriver, RunStopped

A, B, M = ("q.lora_A.weight", "q.lora_B.weight", "q.lora_magnitude_vector")


def _config(tmp_path, **settings):
    return build_config({"static.dataset.num-partitions": 3, "strategy.fraction-train": 1.0,
                         "output-dir": str(tmp_path), "run-name": "r", **settings})


def _driver(tmp_path, **settings) -> RoundDriver:
    config = _config(tmp_path, **settings)
    nodes = NodeDirectory(FakeGrid({21: {"partition-id": 0, "num-partitions": 3}}), True,
                          config.dataset.num_partitions, 1, 5)
    rule = build_rule(config, planned_clients_per_round(config), population=3)
    return RoundDriver(config, RunOutputs.create(config), nodes, rule)


def _state(rng, scale=1.0) -> dict[str, torch.Tensor]:
    return {A: torch.tensor(rng.normal(size=(2, 5)) * scale, dtype=torch.float32),
            B: torch.tensor(rng.normal(size=(4, 2)) * scale, dtype=torch.float32)}


def _norm(state: dict[str, torch.Tensor]) -> float:
    """The L2 norm over all of an adapter's tensors, as Flower's clipping measures it."""
    return float(torch.cat([v.ravel() for v in state.values()]).norm())


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

    def rounds_2_and_3(folder, load_state: bool) -> list[dict[str, torch.Tensor]]:
        resumed = _driver(folder, **{"strategy.name": name})
        if load_state:
            load_rule_state(resumed.rule, arrays, values)
        resumed.round_offset, resumed.global_arrays = 1, first.global_arrays
        return [_round(resumed, r - 1, rounds[r - 1])[1][0].to_torch_state_dict()
                for r in (2, 3)]

    for r, got in zip((2, 3), rounds_2_and_3(tmp_path / "c", True), strict=True):
        expected = results[r - 1].to_torch_state_dict()
        for key, value in got.items():
            assert torch.equal(value, expected[key]), (name, r, key)
    # The saved state is what makes it exact: the same rule without it continues elsewhere.
    assert not torch.allclose(rounds_2_and_3(tmp_path / "d", False)[-1][A],
                              results[-1].to_torch_state_dict()[A], atol=1e-6)
    # And the rule is not FedAvg, whose round 3 is the example-weighted mean of the replies.
    weights = torch.tensor([10.0, 30.0, 20.0]) / 60
    fedavg = sum(w * s[A] for w, s in zip(weights, rounds[-1], strict=True))
    assert not torch.allclose(results[-1].to_torch_state_dict()[A], fedavg, atol=1e-4)


def _krum_scores(updates: np.ndarray, malicious: int) -> np.ndarray:
    """Krum's score of each update, from direct fp64 differences: the summed squared distances
    to its n - f - 2 nearest others."""
    distances = ((updates[:, None, :] - updates[None, :, :]) ** 2).sum(-1)
    return np.sort(distances, axis=1)[:, 1:len(updates) - malicious - 1].sum(1)


@pytest.mark.parametrize("name, clients", [("krum", 5), ("multikrum", 5), ("bulyan", 7)])
def test_distance_rules_choose_by_fp64_updates_not_by_fp32_weights(tmp_path, name, clients):
    """Updates of ~1e-6 per coordinate on lora_A at PEFT's Kaiming scale: Flower's squared
    distances |x|^2 + |y|^2 - 2 x.y on the fp32 weights lose them to cancellation, exact
    differences of the updates do not. Each client's update has its own scale, so the
    clients' Krum scores are far apart."""
    rng = np.random.default_rng(11)
    start = {A: torch.tensor(rng.uniform(-1, 1, (32, 576)) / 24, dtype=torch.float32),
             B: torch.zeros(576, 32)}
    scales = [1.9, 1.3, 1.0, 2.2, 1.6, 2.5, 2.8][:clients]  # the most central: client 2
    replies = [{k: (v.double() + 1e-6 * s * torch.tensor(rng.normal(size=v.shape))).float()
                for k, v in start.items()} for s in scales]
    updates = np.stack([np.concatenate([(r[k].double() - start[k].double()).numpy().ravel()
                                        for k in start]) for r in replies])
    order = np.argsort(_krum_scores(updates, 1))
    if name == "krum":
        expected = updates[order[0]]
    elif name == "multikrum":  # the 2 best, averaged (equal examples)
        expected = updates[order[:2]].mean(0)
    else:  # Bulyan: the n - 2f best; per coordinate the n - 4f closest to their median
        chosen = updates[order[:clients - 2]]
        nearest = np.argsort(np.abs(chosen - np.median(chosen, axis=0)), axis=0)[:clients - 4]
        expected = np.take_along_axis(chosen, nearest, axis=0).mean(0)
    flat = np.concatenate([v.double().numpy().ravel() for v in start.values()]) + expected

    driver = _driver(tmp_path, **{"strategy.name": name, "strategy.fraction-train": 1.0,
                                  "static.dataset.num-partitions": clients})
    driver.global_arrays = ArrayRecord(start)
    _, (arrays, _) = _round(driver, 1, replies, examples=(10,) * clients)
    got = np.concatenate([v.numpy().ravel() for v in arrays.to_torch_state_dict().values()])
    assert order[0] == 2
    np.testing.assert_allclose(got, flat.astype(np.float32), rtol=0, atol=1e-8)


def test_server_side_dp_clips_every_update_to_the_bound_and_accounts_epsilon(tmp_path):
    driver = _driver(tmp_path, **{"privacy.mode": "server-fixed", "privacy.clipping-norm": 0.5,
                                  "privacy.noise-multiplier": 0.0})
    rng = np.random.default_rng(3)
    # A global far from zero, so that clipping each update (reply - global) and clipping each
    # reply's weights give different results.
    start = _state(rng, 5.0)
    driver.global_arrays = ArrayRecord(start)
    updates = [_state(rng, 3.0) for _ in range(3)]
    assert all(_norm(u) > 0.5 for u in updates)  # every one is clipped
    _, (arrays, _) = _round(driver, 1, [{k: start[k] + u[k] for k in start} for u in updates])
    assert driver.rule.clipping_norm == 0.5
    # Without noise the new global is the old one plus the mean of the updates scaled to 0.5.
    clipped = [{k: v * (0.5 / _norm(u)) for k, v in u.items()} for u in updates]
    new = arrays.to_torch_state_dict()
    for key, value in start.items():
        torch.testing.assert_close(new[key], value + sum(c[key] for c in clipped) / 3)
    assert _norm({k: new[k] - start[k] for k in start}) <= 0.5 + 1e-5
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


def test_dp_refuses_a_round_with_other_than_the_planned_clients(tmp_path):
    """Flower's accountant holds only for the same number of clients every round."""
    driver = _driver(tmp_path, **NOISY)
    assert driver.privacy.refusal(1, 3, 3) is None
    assert "needs the same 3 clients every round" in driver.privacy.refusal(2, 2, 3)
    assert _driver(tmp_path / "off").privacy.refusal(2, 2, 3) is None


def _train_message(mode: str, arrays: dict, clipping_norm: float | None) -> Message:
    settings = ConfigRecord({wire.PRIVACY_MODE: mode})
    if clipping_norm is not None:
        settings[KEY_CLIPPING_NORM] = clipping_norm
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.CONFIG: settings}),
                   dst_node_id=1, message_type=MessageType.TRAIN)


def test_the_client_mod_clips_with_flowers_mod_only_where_the_run_asks(tmp_path):
    # The global adapter as received is far from zero: clipping the update (trained -
    # received) and clipping the trained weights give different replies.
    received = {A: torch.full((2, 5), 3.0), B: torch.full((4, 2), -2.0)}
    update = {A: torch.full((2, 5), 1.0), B: torch.full((4, 2), 1.0)}  # norm sqrt(18)
    trained = {k: received[k] + update[k] for k in received}

    def train(msg, context):
        return adapter_reply(msg, trained, 8)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for mode in ("client-fixed", "client-adaptive"):
        reply = client_clipping_mod(_train_message(mode, received, 0.5), context, train)
        clipped = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
        for key, value in clipped.items():  # the update, scaled to norm 0.5, on the global
            torch.testing.assert_close(value, received[key] + update[key] * 0.5 / 18 ** 0.5,
                                       msg=mode)
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


NOISY = {"privacy.mode": "server-fixed", "privacy.noise-multiplier": 1.0}


def test_the_dp_noise_seed_is_secret_and_survives_a_resume(tmp_path):
    import os
    import stat

    from flowertune_nlp.run_state import load_round_state

    rng = np.random.default_rng(6)
    rounds = [[_state(rng) for _ in range(3)] for _ in range(2)]
    umask = os.umask(0o022)
    try:
        straight = _driver(tmp_path / "straight", **NOISY)
        for r in (1, 2):
            expected = _round(straight, r, rounds[r - 1])[1][0].to_torch_state_dict()
        stopped = _driver(tmp_path / "stopped", **NOISY, **{"train.save-every-round": 1})
        assert stopped.privacy.secret != straight.privacy.secret  # not derived from the config
        stopped.privacy.secret = straight.privacy.secret  # the same run, stopped after round 1
        _round(stopped, 1, rounds[0])
    finally:
        os.umask(umask)
    run = stopped.outputs.directory
    assert len(stopped.privacy.secret) == 64 and int(stopped.privacy.secret, 16) > 0  # 256 bits
    published = "".join(p.read_text() for p in (run / "run.json", run / "metrics.jsonl"))
    assert stopped.privacy.secret not in published
    # The secret is in the state only, and only its owner can read the state.
    state = run / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()} == {
        "state.json": 0o600, "global_adapter.safetensors": 0o600,
        "rule_state.safetensors": 0o600}
    assert stopped.privacy.secret in (state / "state.json").read_text()
    # Outputs meant to be read stay readable.
    for path in (run, run / "peft_1"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in (run / "run.json", run / "metrics.jsonl", run / "peft_1" / ADAPTER_WEIGHTS):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path

    def resumed_round_2(secret: str | None) -> dict[str, torch.Tensor]:
        saved = load_round_state(run)
        if secret is not None:
            saved.rule_values["noise_secret"] = secret
        config = _config(tmp_path / f"resumed-{secret is None}", **NOISY)
        nodes = NodeDirectory(FakeGrid({21: {"partition-id": 0, "num-partitions": 3}}), True,
                              3, 1, 5)
        resumed = RoundDriver(config, RunOutputs.create(config), nodes,
                              build_rule(config, 3, population=3), saved)
        resumed.global_arrays = ArrayRecord(saved.global_state)
        return _round(resumed, 1, rounds[1])[1][0].to_torch_state_dict()  # round 2

    got = resumed_round_2(None)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bit for bit
    # It is the saved secret that makes it so: with another one, round 2's noise differs.
    assert not torch.equal(resumed_round_2("ab" * 32)[A], expected[A])


def test_a_state_saved_with_the_old_32_bit_seeded_secret_resumes_with_a_new_secret(tmp_path,
                                                                                   caplog):
    from flowertune_nlp.run_state import load_round_state

    driver = _driver(tmp_path / "old", **NOISY)
    _round(driver, 1, [_state(np.random.default_rng(12)) for _ in range(3)])
    saved = load_round_state(driver.outputs.directory)
    del saved.rule_values["noise_secret"]
    saved.rule_values["noise_seed"] = 1234567  # what earlier versions saved
    config = _config(tmp_path / "new", **NOISY)
    nodes = NodeDirectory(FakeGrid({21: {"partition-id": 0, "num-partitions": 3}}), True, 3, 1, 5)
    resumed = RoundDriver(config, RunOutputs.create(config), nodes,
                          build_rule(config, 3, population=3), saved)
    assert resumed.privacy.secret not in (driver.privacy.secret, "1234567")
    assert len(resumed.privacy.secret) == 64
    assert "from an older version" in caplog.text


def _noisy_global(tmp_path, secret: str) -> torch.Tensor:
    """Round 1's global lora_A of a server-fixed DP run with this noise secret."""
    driver = _driver(tmp_path / secret, **NOISY)
    driver.privacy.secret = secret
    rng = np.random.default_rng(9)
    return _round(driver, 1, [_state(rng) for _ in range(3)])[1][0].to_torch_state_dict()[A]


def test_secrets_differing_only_above_bit_32_give_different_noise(tmp_path):
    secret = int(new_noise_secret(), 16)
    low = secret & 0xFFFFFFFF
    same_low = [f"{low | (1 << bit):064x}" for bit in (32, 100, 255)] + [f"{low:064x}"]
    noise = [_noisy_global(tmp_path, s) for s in same_low]
    assert torch.equal(_noisy_global(tmp_path / "again", same_low[0]), noise[0])  # determined
    for i, one in enumerate(noise):
        for other in noise[i + 1:]:
            assert not torch.allclose(one, other), (i, same_low)


def _init_genrand_key(key: np.ndarray) -> bool:
    """Whether an MT19937 key is what seeding from one 32-bit value makes (`np.random.seed(x)`,
    MT19937's init_genrand): each word follows from the one before."""
    k = key.astype(np.uint64)
    following = (1812433253 * (k[:-1] ^ (k[:-1] >> 30))
                 + np.arange(1, len(k), dtype=np.uint64)) & 0xFFFFFFFF
    return bool(np.array_equal(following, k[1:]))


def test_the_round_noise_is_keyed_by_the_whole_secret_not_by_a_32_bit_value(tmp_path,
                                                                            monkeypatch):
    """The seeding code path: what the driver sets NumPy's global generator to while Flower's
    DP wrapper draws the noise."""
    driver = _driver(tmp_path, **NOISY)
    inner, seen = driver.rule.aggregate_train, []

    def spy(server_round, replies):
        seen.append((server_round, np.random.get_state(legacy=False)["state"]["key"].copy()))
        return inner(server_round, replies)

    monkeypatch.setattr(driver.rule, "aggregate_train", spy)
    np.random.seed(123)  # whatever else in the process uses the global generator
    before = np.random.get_state(legacy=False)
    rng = np.random.default_rng(10)
    _round(driver, 1, [_state(rng) for _ in range(3)])
    [(server_round, key)] = seen
    after = np.random.get_state(legacy=False)
    assert after["state"]["key"].tolist() == before["state"]["key"].tolist()  # put back
    assert after["state"]["pos"] == before["state"]["pos"]

    # The state is MT19937's from a SeedSequence of all 256 bits of the secret and the round,
    # through a 256-bit pool: no step narrows it to 32 bits.
    secret = driver.privacy.secret
    seed = noise_seed(secret, server_round)
    assert (seed.entropy, seed.spawn_key, seed.pool_size) == (int(secret, 16), (1,), 8)
    assert np.array_equal(key, np.random.MT19937(seed).state["state"]["key"])
    assert _init_genrand_key(np.random.RandomState(2**32 - 7).get_state()[1])  # the check works
    assert not _init_genrand_key(key)  # not seeded from a 32-bit value
    with round_noise(secret, server_round):
        assert np.array_equal(np.random.get_state()[1], key)

    def key_of(value: int, server_round: int = 1) -> list[int]:
        with round_noise(f"{value:064x}", server_round):
            return np.random.get_state()[1].tolist()

    # Every bit of the secret, and the round, changes the generator's whole state.
    value = int(secret, 16)
    keys = {tuple(key_of(value ^ (1 << bit))) for bit in range(256)}
    keys |= {tuple(key.tolist()), tuple(key_of(value, server_round=2))}
    assert len(keys) == 258


def test_a_run_stopped_by_its_budget_resumes_with_a_larger_one(tmp_path):
    from flowertune_nlp.run_state import StateError, check_resumable, load_round_state

    settings = {"privacy.mode": "server-fixed", "privacy.noise-multiplier": 1.0,
                "privacy.max-epsilon": 6.0}
    driver = _driver(tmp_path, **settings)
    rng = np.random.default_rng(7)
    _round(driver, 1, [_state(rng) for _ in range(3)])
    with pytest.raises(RunStopped, match="past privacy.max-epsilon = 6"):
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
    # The accountant's own settings may not change: its saved releases were accounted with them.
    other_delta = _config(tmp_path, **{**settings, "privacy.target-delta": 1e-6})
    with pytest.raises(StateError, match=r"saved with privacy.target-delta = 1e-05, but this "
                                         r"run has 1e-06"):
        check_resumable(saved, other_delta, driver.outputs.directory)
