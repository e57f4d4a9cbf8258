"""The CUDA path's defects, shown on CPU wherever the mechanism exists there: the adapter kept
fp32 under 4-bit, the lean trainer's fused loss, no wrappers or hooks stacked per round, native
bf16 only, GPU detection without torch, loud failure of a client hidden from the GPUs, and the
dtype a GGUF is dequantized to."""

import gc
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import bitsandbytes as bnb
import gguf
import numpy as np
import pytest
import torch
from conftest import SMOLLM2

from flowertune_nlp import hardware, launch, training
from flowertune_nlp.config import build_config
from flowertune_nlp.models import choose_precision, gguf_dequantized_dtype
from flowertune_nlp.names import resolve_package_file
from flowertune_nlp.nodes import Source


def tiny_config(model_dir, alpaca_sample, **overrides):
    return build_config({
        "model.name": str(model_dir), "static.dataset.name": str(alpaca_sample),
        "train.seq-length": 128, "train.training-arguments.max-steps": 2,
        "train.training-arguments.per-device-train-batch-size": 2, **overrides,
    })


def test_4bit_adapter_stays_fp32_and_learns_at_the_smallest_learning_rate(tiny_model_dir,
                                                                          alpaca_sample):
    """TRL casts the adapter of a 4-bit model to bf16, where AdamW's updates at 1e-6 vanish
    (and the global fp32 adapter comes back rounded to bf16). Trained in fp32, every entry
    moves, by about the learning rate per step."""
    config = tiny_config(tiny_model_dir, alpaca_sample, **{"model.quantization": 4})
    client = training.get_client_model(config)
    torch.manual_seed(0)  # lora_B = 0 would leave lora_A without gradient
    initial = {k: torch.randn_like(v) * 0.1 if "lora_B" in k else v
               for k, v in training.lora_state_dict(client.model).items()}
    result = training.train_round(config, Source(0), 1, 1e-6, initial)
    trainable = {p.dtype for p in client.model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}
    for key, before in initial.items():
        step = result.state[key] - before
        assert (step != 0).float().mean() > 0.9, key
        assert step.abs().max() < 1e-5, key  # the updates, not a rounding to bf16


@pytest.mark.parametrize("quantization", [0, 4])
def test_fused_loss_equals_the_model_loss_without_the_full_logits(quantization, tiny_model_dir,
                                                                  alpaca_sample):
    """The CUDA path (TRL's chunked LM head) and the CPU path (the model's own loss) give the
    same loss and adapter gradients; only the latter runs the LM head over every position."""
    config = tiny_config(tiny_model_dir, alpaca_sample, **{
        "model.quantization": quantization, "model.precision": "fp32",
        "model.lora.peft-lora-dropout": 0.0})
    client = training.get_client_model(config)
    examples = training.get_partition(config, Source(0), client.tokenizer).dataset.select(range(4))
    lm_head_calls = []
    hook = client.model.get_output_embeddings().register_forward_hook(
        lambda *_: lm_head_calls.append(1))
    outcome = {}
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = training.make_trainer(config, client, examples, 1e-4, 0, out)
        assert trainer.fused_loss is False  # the faster path on CPU
        batch = next(iter(trainer.get_train_dataloader()))
        tokens = (batch["labels"][:, 1:] != -100).sum() * 2  # as with 2 accumulation steps
        for fused in (False, True):
            trainer.fused_loss = fused
            lm_head_calls.clear()
            client.model.zero_grad()
            loss = trainer.compute_loss(client.model, dict(batch), num_items_in_batch=tokens)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in client.model.named_parameters()
                     if p.requires_grad}
            outcome[fused] = (loss.detach(), grads, len(lm_head_calls))
    finally:
        hook.remove()
        client.model.zero_grad()
    (loss, grads, calls), (fused_loss, fused_grads, fused_calls) = outcome[False], outcome[True]
    assert (calls, fused_calls) == (1, 0)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7)


def fused_head_depth(model) -> int:
    """How many of TRL's fused-LM-head wrappers (closures over `original_forward`)
    `model.forward` runs through."""
    depth, forward = 0, vars(model).get("forward")
    while forward is not None:
        function = forward.__func__
        cells = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=True))
        if "original_forward" not in cells:
            break
        depth += 1
        forward = cells["original_forward"].cell_contents
    return depth


def test_a_trainer_per_round_stacks_no_wrapper_or_hook(tiny_model_dir, alpaca_sample):
    config = tiny_config(tiny_model_dir, alpaca_sample, **{
        "model.quantization": 4, "train.training-arguments.max-steps": 1})
    client = training.get_client_model(config)
    state = training.lora_state_dict(client.model)
    counts = []
    for server_round in (1, 2, 3):
        state = training.train_round(config, Source(0), server_round, 1e-4, state).state
        counts.append((fused_head_depth(client.model.get_base_model()),
                       len(client.model.get_input_embeddings()._forward_hooks)))
    assert counts[0][0] == 1
    assert counts == [counts[0]] * 3


def fake_cuda(monkeypatch, native_bf16: bool) -> None:
    """A CUDA device as torch reports it: with or without native bf16 (pre-Ampere GPUs report
    bf16 support by emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_auto_precision_takes_native_bf16_only(monkeypatch):
    fake_cuda(monkeypatch, native_bf16=False)
    auto = choose_precision("auto", 4)
    assert (auto.device, auto.compute, auto.dtype) == ("cuda", "fp16", torch.float16)
    assert auto.describe() == "cuda, nf4 4-bit base, fp16 compute"
    with pytest.raises(RuntimeError, match="no native bf16; use 'auto', 'fp16' or 'fp32'"):
        choose_precision("bf16", 4)
    fake_cuda(monkeypatch, native_bf16=True)
    assert choose_precision("auto", 4).compute == "bf16"


def test_fp16_is_refused_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    with pytest.raises(RuntimeError, match="'fp16' needs a CUDA GPU"):
        choose_precision("fp16", 0)
    assert build_config({"model.precision": "fp16"}).model.precision == "fp16"


@pytest.fixture
def machine_gpus(tmp_path, monkeypatch):
    """Make this machine look as if it had `count` NVIDIA GPUs (a fake `nvidia-smi -L`)."""
    def install(count: int) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / "nvidia-smi"
        script.write_text("#!/bin/sh\n" + "".join(
            f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'\n" for i in range(count)))
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setattr(hardware, "PROC_GPUS", tmp_path / "no-driver")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv(hardware.ALLOW_CPU_ENV, raising=False)
    return install


def test_gpus_are_counted_as_cuda_will_see_them(machine_gpus, monkeypatch):
    machine_gpus(2)
    assert hardware.machine_gpus() == hardware.visible_gpus() == 2
    for visible, count in (("1", 1), ("", 0), ("-1", 0), ("0,-1,1", 1), ("0,1,2,3", 2)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert hardware.visible_gpus() == count, visible
    assert hardware.machine_gpus() == 2
    machine_gpus(0)
    assert hardware.machine_gpus() == 0


def test_gpus_per_client_defaults_to_a_whole_gpu_where_there_is_one(machine_gpus, monkeypatch):
    machine_gpus(1)
    assert hardware.gpus_per_client(None) == 1.0
    assert hardware.gpus_per_client(0.5) == 0.5
    with pytest.raises(ValueError, match="from 0 to 1"):
        hardware.gpus_per_client(2)
    seen = {}

    def fake_run_app(run_configs, **kwargs):
        seen.update(kwargs)
        return launch.RunOutcome(0, None, "completed")

    monkeypatch.setattr(launch, "run_app", fake_run_app)
    monkeypatch.setattr(launch.signal, "signal", lambda *args: None)  # keep pytest's handlers
    assert launch.main([]) == 0
    assert seen["gpus_per_client"] is None  # run_app resolves it: hardware.gpus_per_client
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.gpus_per_client(None) == 0.0
    with pytest.raises(ValueError, match="no GPU is visible"):
        hardware.gpus_per_client(0.5)


def test_launcher_detects_gpus_without_importing_torch():
    code = ("import sys; from flowertune_nlp import hardware, launch; "
            "hardware.gpus_per_client(None); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_client_hidden_from_the_gpus_fails_loudly(machine_gpus, monkeypatch, tiny_model_dir,
                                                  alpaca_sample):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    machine_gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray sets for a client with no GPU
    monkeypatch.setattr(training, "_cached_model", None)
    config = tiny_config(tiny_model_dir, alpaca_sample, **{"model.quantization": 0})
    with pytest.raises(RuntimeError, match="1 NVIDIA GPU.*hides them.*FLOWERTUNE_ALLOW_CPU=1"):
        training.get_client_model(config)
    monkeypatch.setenv(hardware.ALLOW_CPU_ENV, "1")
    assert training.get_client_model(config).precision.device == "cpu"


def write_gguf(path, tensors: dict) -> None:
    """A GGUF file holding `tensors`: name -> (fp32 array, GGUF type to store it as)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (values, kind) in tensors.items():
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            data = gguf.quants.quantize(values, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_is_dequantized_to_bf16_where_bf16_holds_it(tmp_path):
    kinds = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    norm_bf16 = torch.randn(64).bfloat16().float().numpy()  # a norm of a bf16 release
    cases = {
        "q4": ({"w": (weight, kinds.Q4_1), "n": (norm_bf16, kinds.F32)}, torch.bfloat16),
        "bf16": ({"w": (weight, kinds.BF16)}, torch.bfloat16),
        "q8": ({"w": (weight, kinds.Q8_0), "n": (norm_bf16, kinds.F32)}, torch.float32),
        "fp32": ({"w": (weight, kinds.Q4_1), "n": (weight[0], kinds.F32)}, torch.float32),
    }
    for name, (tensors, expected) in cases.items():
        write_gguf(tmp_path / f"{name}.gguf", tensors)
        assert gguf_dequantized_dtype(tmp_path / f"{name}.gguf") == expected, name
    # The packaged SmolLM2 keeps its token embeddings in Q8_0: fp32, as before.
    assert gguf_dequantized_dtype(resolve_package_file(SMOLLM2)) == torch.float32



def test_a_4bit_client_model_is_freed_when_another_replaces_it(tiny_model_dir, alpaca_sample):
    config = tiny_config(tiny_model_dir, alpaca_sample, **{"model.quantization": 4})
    client = training.get_client_model(config)
    layer = weakref.ref(next(m for m in client.model.modules()
                             if isinstance(m, bnb.nn.Linear4bit)))
    del client
    gc.disable()  # only the explicit collection may free it
    try:
        training.get_client_model(tiny_config(tiny_model_dir, alpaca_sample,
                                               **{"model.quantization": 0}))
        assert layer() is None
    finally:
        gc.enable()


def test_gpu_check_refuses_to_run_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    check = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(check)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "gpu_check needs a CUDA GPU" in run.stderr and run.stdout == ""
