"""FedProx's proximal term in the client's training: once per optimiser step across gradient
accumulation, and the same under fp16 loss scaling as in fp32.

accelerate builds fp16's autocast and GradScaler only off CPU; `cuda_like_fp16` gives the
Trainer on CPU what it builds on CUDA (the same classes, for device "cpu"), so the loss
scaling that made FedProx vanish runs here."""

import tempfile

import pytest
import torch

from flowertune_nlp import training
from flowertune_nlp.config import AppConfig, build_config
from flowertune_nlp.models import (
    Precision,
    add_lora,
    load_base_model,
    load_tokenizer,
    prepare_for_training,
)
from flowertune_nlp.nodes import Source

ACCUMULATION = 3


def fedprox_config(model_dir, alpaca_sample, steps: int = 1) -> AppConfig:
    return build_config({
        "model.name": str(model_dir), "model.quantization": 0, "model.precision": "fp32",
        "static.dataset.name": str(alpaca_sample), "train.seq-length": 128,
        "model.lora.peft-lora-dropout": 0.0, "strategy.name": "fedprox",
        "train.training-arguments.max-steps": steps,
        "train.training-arguments.per-device-train-batch-size": 2,
        "train.training-arguments.gradient-accumulation-steps": ACCUMULATION})


def client_model(config: AppConfig, compute: str) -> training.ClientModel:
    """The client's model as `get_client_model` builds it for `compute` ("fp16": an fp16 base
    and an fp32 adapter, as on a pre-Ampere GPU), outside its per-process cache."""
    precision = Precision("cpu", compute, 0)
    model = add_lora(prepare_for_training(load_base_model(config.model.name, precision),
                                          precision, False), config.model.lora)
    return training.ClientModel(training.model_key(config), model,
                                load_tokenizer(config.model.name), precision,
                                frozenset(model.get_input_embeddings()._forward_hooks))


def cuda_like_fp16(trainer) -> torch.amp.GradScaler:
    """What accelerate's Accelerator sets up for fp16 on CUDA: native autocast (wrapped around
    the model's forward when `train()` prepares it) and a GradScaler for the backward pass and
    the optimizer step."""
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    return trainer.accelerator.scaler


def examples(config: AppConfig, client: training.ClientModel, count: int):
    return training.get_partition(config, Source(0), client.tokenizer).dataset.select(range(count))


@pytest.mark.parametrize("compute, loss_over_step", [
    ("fp16", True), ("fp16", False), ("fp32", True)])
def test_fedprox_adds_the_proximal_gradient_once_per_optimiser_step(
        compute, loss_over_step, tiny_model_dir, alpaca_sample):
    """Over the micro-batches of one optimiser step, run by the Trainer's own training_step
    (under fp16 autocast with loss scaling, or in fp32), FedProx adds mu (w - w_global) to the
    unscaled gradient exactly once, whether the model normalises the loss over the whole step
    (`num_items_in_batch`) or the Trainer divides each micro-batch's mean; the reported loss
    stays the task's."""
    config = fedprox_config(tiny_model_dir, alpaca_sample)
    client = client_model(config, compute)
    rows = examples(config, client, 2 * ACCUMULATION)
    trainable = [p for p in client.model.parameters() if p.requires_grad]
    mu, shift = 2.0, 0.01

    def step(proximal_mu: float) -> tuple[list[torch.Tensor], list[float]]:
        with tempfile.TemporaryDirectory() as out:
            trainer = training.make_trainer(config, client, rows, 1e-4, 0, out,
                                            proximal_mu=proximal_mu)
        trainer.model_accepts_loss_kwargs = loss_over_step
        scaler = cuda_like_fp16(trainer) if compute == "fp16" else None
        batches, items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()),
                                                   ACCUMULATION, torch.device("cpu"))
        assert len(batches) == ACCUMULATION and (items is not None) == loss_over_step
        trainer.current_gradient_accumulation_steps = len(batches)
        client.model.zero_grad()
        with torch.no_grad():
            for param in trainable:
                param.add_(shift)  # `shift` away from the adapter the round started from
        with torch.autocast("cpu", torch.float16, enabled=compute == "fp16"):
            losses = [float(trainer.training_step(client.model, batch, items))
                      for batch in batches]
        with torch.no_grad():
            for param in trainable:
                param.sub_(shift)
        scale = scaler.get_scale() if scaler else 1.0
        assert scale == (2.0**16 if scaler else 1.0)
        return [p.grad / scale for p in trainable], losses

    (plain, task_losses), (proximal, losses) = step(0.0), step(mu)
    assert losses == task_losses
    for without, with_term in zip(plain, proximal, strict=True):
        torch.testing.assert_close(with_term - without, torch.full_like(without, mu * shift),
                                   rtol=0, atol=2e-5)


def test_fedprox_under_fp16_trains_as_in_fp32_and_unlike_fedavg(tiny_model_dir, alpaca_sample):
    """Three optimiser steps of three accumulated micro-batches with the Trainer's fp16 path
    (autocast, GradScaler): the adapter's update with FedProx is the fp32 update with FedProx,
    to within fp16's difference, and far from the update without the term (FedAvg)."""
    config = fedprox_config(tiny_model_dir, alpaca_sample, steps=3)
    generator = torch.Generator().manual_seed(0)
    start = None
    updates = {}
    for compute, mu in (("fp32", 0.0), ("fp32", 5.0), ("fp16", 0.0), ("fp16", 5.0)):
        client = client_model(config, compute)
        if start is None:  # lora_B = 0 would leave lora_A without a gradient at first
            start = {k: torch.randn(v.shape, generator=generator) * 0.1
                     for k, v in training.lora_state_dict(client.model).items()}
        training.set_lora_state_dict(client.model, start)
        rows = examples(config, client, 2 * ACCUMULATION * 3)
        with tempfile.TemporaryDirectory() as out:
            trainer = training.make_trainer(config, client, rows, 1e-2, 0, out, proximal_mu=mu)
            scaler = cuda_like_fp16(trainer) if compute == "fp16" else None
            trainer.train()
        assert scaler is None or scaler.get_scale() >= 2.0**15  # scaled, no overflow to speak of
        state = training.lora_state_dict(client.model)
        updates[compute, mu] = torch.cat([(state[k] - start[k]).flatten() for k in start])
    fedprox_effect = (updates["fp32", 5.0] - updates["fp32", 0.0]).norm()
    fp16_difference = (updates["fp16", 0.0] - updates["fp32", 0.0]).norm()
    assert fp16_difference > 0  # fp16 did compute differently
    assert fedprox_effect > 0.2 * updates["fp32", 0.0].norm()
    assert (updates["fp16", 5.0] - updates["fp32", 5.0]).norm() < 0.1 * fedprox_effect
    assert (updates["fp16", 5.0] - updates["fp16", 0.0]).norm() > 0.9 * fedprox_effect
