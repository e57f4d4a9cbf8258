"""One client's local training: a cached base model + LoRA, reset from the global adapter,
trained with TRL's SFTTrainer for the configured steps at the round's learning rate."""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass

import torch

from flowertune_nlp.config import AppConfig
from flowertune_nlp.data import (
    TokenizedPartition,
    examples_for_round,
    load_node_data,
    load_partition,
    tokenize_partition,
)
from flowertune_nlp.models import (
    Precision,
    add_lora,
    choose_precision,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)
from flowertune_nlp.nodes import Source

log = logging.getLogger(__name__)


@dataclass
class ClientModel:
    """What a client process keeps across rounds (Ray actors outlive a round)."""

    key: tuple
    model: torch.nn.Module
    tokenizer: object
    precision: Precision


_cached_model: ClientModel | None = None
_cached_partitions: dict[tuple, TokenizedPartition] = {}


def model_key(config: AppConfig) -> tuple:
    m = config.model
    return (m.name, m.quantization, m.precision, m.gradient_checkpointing, m.lora)


def get_client_model(config: AppConfig) -> ClientModel:
    """Load the base model + LoRA once per process; later rounds only reset the adapter."""
    global _cached_model
    key = model_key(config)
    if _cached_model is None or _cached_model.key != key:
        _cached_model = None  # free the old model before loading another
        precision = choose_precision(config.model.precision, config.model.quantization)
        path = resolve_model_path(config.model.name)
        base = load_base_model(path, precision, config.model.gradient_checkpointing)
        model = add_lora(base, config.model.lora)
        _cached_model = ClientModel(key, model, load_tokenizer(path), precision)
        log.info("client model %s loaded: %s", config.model.name, precision.describe())
    return _cached_model


def get_partition(config: AppConfig, source: Source, tokenizer,
                  data_path: str | None = None) -> TokenizedPartition:
    """The tokenised rows of a source: a partition of the shared dataset, or this node's own
    data at `data_path`."""
    key = (config.dataset, config.train.seq_length, config.seed, source, data_path)
    if key not in _cached_partitions:
        if len(_cached_partitions) >= 4:  # bound memory: a process serves many partitions
            _cached_partitions.pop(next(iter(_cached_partitions)))
        if source.partition is None:
            rows = load_node_data(data_path)
        else:
            rows = load_partition(config.dataset.name, config.dataset.num_partitions,
                                  source.partition, config.seed)
        _cached_partitions[key] = tokenize_partition(
            rows, tokenizer, config.train.seq_length, config.dataset.keep_input_field,
            config.dataset.prompt_template,
        )
    return _cached_partitions[key]


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names, as fp32 on CPU (ArrayRecord goes
    through numpy, which has no bf16)."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32, copy=True)
        for k, v in get_peft_model_state_dict(model).items()
    }


def set_lora_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Overwrite every LoRA tensor; refuse a state with missing, extra, misshapen or
    non-finite tensors."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    received = {k: tuple(v.shape) for k, v in state.items()}
    if expected != received:
        missing = sorted(set(expected) - set(received))[:3]
        extra = sorted(set(received) - set(expected))[:3]
        shapes = [k for k in set(expected) & set(received) if expected[k] != received[k]][:3]
        raise ValueError(
            f"adapter does not fit this model: missing {missing}, unexpected {extra}, "
            f"wrong shapes {shapes}"
        )
    non_finite = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if non_finite:
        raise ValueError(f"adapter has non-finite values in {non_finite[:3]}")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter keys not used by the model: {unexpected[:3]}")


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor]
    train_loss: float
    num_examples: int
    dropped: int
    seconds: float  # the whole client round
    train_seconds: float  # the optimizer steps alone (TRL's train_runtime)
    precision: str


def sft_config(config: AppConfig, precision: Precision, learning_rate: float, seed: int, out: str):
    from trl import SFTConfig

    t = config.train
    return SFTConfig(
        output_dir=out,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=0,
        max_length=t.seq_length,
        completion_only_loss=True,
        bf16=precision.bf16,
        use_cpu=precision.device == "cpu",
        gradient_checkpointing=config.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )


@functools.cache
def lean_sft_trainer_class():
    """TRL's SFTTrainer without its per-step token metrics.

    SFTTrainer.compute_loss scores the completion tokens through a fused LM head that also
    computes each token's entropy and top-1 accuracy, for logging only. Here the loss is
    transformers' own causal-LM loss over the same labels (TRL builds them from our completion
    mask, and normalises by the same token count), so the optimisation is unchanged and the
    metrics' cost goes away; bench/step_efficiency.py measures both.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return LeanSFTTrainer


def make_trainer(config: AppConfig, client: ClientModel, examples, learning_rate: float,
                 seed: int, out: str, token_metrics: bool = False):
    """The SFTTrainer a client round uses (also what bench/step_efficiency.py times)."""
    from trl import SFTTrainer

    trainer_class = SFTTrainer if token_metrics else lean_sft_trainer_class()
    return trainer_class(
        model=client.model,
        args=sft_config(config, client.precision, learning_rate, seed, out),
        train_dataset=examples,
        processing_class=client.tokenizer,
    )


def train_round(
    config: AppConfig,
    source: Source,
    server_round: int,
    learning_rate: float,
    global_state: dict[str, torch.Tensor],
    data_path: str | None = None,
) -> RoundResult:
    """Reset the adapter to the global weights, train locally on `source`, return the new
    adapter."""
    start = time.perf_counter()
    client = get_client_model(config)
    set_lora_state_dict(client.model, global_state)
    partition = get_partition(config, source, client.tokenizer, data_path)
    t = config.train
    needed = t.max_steps * t.batch_size * t.gradient_accumulation_steps
    examples = examples_for_round(partition, needed, config.seed, server_round, source.seed_key)
    seed = config.seed + server_round
    with tempfile.TemporaryDirectory(prefix="flowertune-trainer-") as out:
        output = make_trainer(config, client, examples, learning_rate, seed, out).train()
    loss = float(output.training_loss)
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"training loss is {loss} in round {server_round}")
    return RoundResult(
        state=lora_state_dict(client.model),
        train_loss=loss,
        num_examples=len(examples),
        dropped=partition.dropped,
        seconds=time.perf_counter() - start,
        train_seconds=float(output.metrics["train_runtime"]),
        precision=client.precision.describe(),
    )
