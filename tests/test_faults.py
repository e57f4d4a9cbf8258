"""Fault specs, reply screening, reproducible sampling and saves that fail part-way."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from flowertune_nlp.adapter_fit import adapter_mismatch
from flowertune_nlp.config import ConfigError, build_config
from flowertune_nlp.faults import (
    Fault,
    client_fault,
    corrupt_reply,
    parse_faults,
    server_disk_full,
    simulated_disk_full,
)
from flowertune_nlp.io import atomic_write_dir
from flowertune_nlp.nodes import Source, sample_sources
from flowertune_nlp.round_driver import screen_update, short_reason


def test_fault_spec_parses_wildcards_and_rejects_nonsense():
    faults = parse_faults("raise:0:2, nan:*:3,disk-full:*:*")
    assert faults == (Fault("raise", 0, 2), Fault("nan", None, 3), Fault("disk-full", None, None))
    assert client_fault(faults, 0, 2).kind == "raise"
    assert client_fault(faults, 1, 2) is None and client_fault(faults, 5, 3).kind == "nan"
    assert server_disk_full(faults, 7) and not server_disk_full(parse_faults(""), 7)
    for bad in ("explode:0:1", "raise:0", "raise:x:1", "disk-full:1:2"):
        with pytest.raises(ConfigError, match="faults.inject"):
            build_config({"faults.inject": bad})
    with pytest.raises(ConfigError, match="num-partitions = 20"):
        build_config({"faults.inject": "raise:20:1"})


def test_resume_and_empty_round_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="run.max-empty-rounds"):
        build_config({"run.max-empty-rounds": 0})
    with pytest.raises(ConfigError, match="run.resume"):
        build_config({"run.resume": str(tmp_path / "nowhere")})
    assert build_config({"run.resume": str(tmp_path)}).run.resume == str(tmp_path)


def _record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.clone() for k, v in state.items()})


@pytest.mark.parametrize("defect, reason", [
    ("nan", "non-finite values in a.lora_A.weight"), ("shape", "wrong shape for a.lora_A"),
    ("keys", "wrong keys: missing ['a.lora_A.weight']")])
def test_screen_rejects_broken_updates(defect, reason):
    good = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    assert screen_update(_record(good), _record(good)) is None
    assert reason in screen_update(_record(corrupt_reply(defect, good)), _record(good))
    inf = dict(good, **{"a.lora_B.weight": torch.full((3, 2), np.inf)})
    assert "non-finite" in screen_update(_record(inf), _record(good))


def test_one_adapter_check_for_shapes_arrays_and_tensors():
    """adapter_mismatch takes bare shapes, numpy arrays or torch tensors; the first failing
    check (keys, shapes, dtypes, finiteness) gives the reason."""
    expected = {"a": (2, 3), "b": (3, 2)}
    good = {"a": np.zeros((2, 3)), "b": torch.zeros(3, 2)}
    assert adapter_mismatch(good, expected) is None
    assert adapter_mismatch({"a": (2, 3)}, expected) == "wrong keys: missing ['b'], unexpected []"
    assert adapter_mismatch(dict(good, c=(1,)), expected).endswith("unexpected ['c']")
    assert adapter_mismatch(dict(good, b=(2, 3)), expected) == \
        "wrong shape for b: (2, 3), expected (3, 2)"
    reference = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 2), np.float32)}
    assert adapter_mismatch(dict(reference, b=np.zeros((3, 2), np.float16)), reference,
                            dtype_of=lambda x: x.dtype).startswith("wrong dtype for b: float16")
    nan = dict(good, a=np.full((2, 3), np.nan))
    assert adapter_mismatch(nan, expected) is None  # finiteness only when asked
    assert adapter_mismatch(nan, expected, is_finite=lambda x: bool(np.isfinite(x).all())) == \
        "non-finite values in a"


def test_partition_sampling_is_a_function_of_seed_and_round():
    partitions = [Source(p) for p in range(20)]
    rounds = [sample_sources(42, r, partitions, 2) for r in range(1, 11)]
    assert rounds == [sample_sources(42, r, partitions, 2) for r in range(1, 11)]
    assert all(len(set(p)) == 2 for p in rounds)
    assert len({tuple(p) for p in rounds}) > 5
    assert rounds != [sample_sources(7, r, partitions, 2) for r in range(1, 11)]


def test_client_error_reason_is_cut_out_of_the_ray_traceback():
    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>: long traceback\n"
              "Exception ClientAppException occurred. Message: CUDA out of memory'>")
    assert short_reason(reason) == "CUDA out of memory"
    # a deployment's flwr-clientapp: str(type(ex)) + ":<'" + str(ex) + "'>"
    assert short_reason("<class 'RuntimeError'>:<'CUDA out of memory'>") == "CUDA out of memory"
    assert short_reason("plain") == "plain"
    assert short_reason("x" * 400).endswith("...")


def test_failure_in_the_middle_of_a_save_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "peft_3"

    def write(content: bytes):
        def fill(staging):
            (staging / "adapter_config.json").write_text("{}")
            (staging / "adapter_model.safetensors").write_bytes(content)
        return fill

    atomic_write_dir(target, write(b"old" * 100))
    with simulated_disk_full(), pytest.raises(OSError, match="File too large"):
        atomic_write_dir(target, write(b"new" * 1000))  # fails after 512 bytes
    assert (target / "adapter_model.safetensors").read_bytes() == b"old" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft_3"]  # no staging left
    atomic_write_dir(target, write(b"new" * 1000))  # the limit is lifted again
    assert (target / "adapter_model.safetensors").read_bytes() == b"new" * 1000
