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
    split_local_eval,
    tokenize_partition,
)
from flowertune_nlp.hardware import check_not_hidden_from_gpus
from flowertune_nlp.heldout import example_losses
from flowertune_nlp.models import (
    Precision,
    add_lora,
    choose_precision,
    load_base_model,
    load_tokenizer,
    lora_state_dict,
    prepare_for_training,
    release_memory,
    resolve_model_path,
    set_lora_state_dict,
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
    embedding_hooks: frozenset[int]  # ids of the input embedding's forward hooks when loaded


_cached_model: ClientModel | None = None
_cached_partitions: dict[tuple, TokenizedPartition] = {}


def model_key(config: AppConfig) -> tuple:
    m = config.model
    return (m.name, m.quantization, m.precision, m.gradient_checkpointing, m.lora)


def free_client_model() -> None:
    """Drop the cached model and free its memory now, not whenever the cyclic GC runs (a 4-bit
    model is a reference cycle)."""
    global _cached_model
    _cached_model = None
    release_memory()


def get_client_model(config: AppConfig) -> ClientModel:
    """Load the base model + LoRA once per process; later rounds only reset the adapter."""
    global _cached_model
    key = model_key(config)
    if _cached_model is None or _cached_model.key != key:
        free_client_model()  # before loading another
        precision = choose_precision(config.model.precision, config.model.quantization)
        if precision.device == "cpu":
            check_not_hidden_from_gpus(torch.version.cuda)
        path = resolve_model_path(config.model.name)
        base = prepare_for_training(load_base_model(path, precision), precision,
                                    config.model.gradient_checkpointing)
        model = add_lora(base, config.model.lora)
        hooks = frozenset(model.get_input_embeddings()._forward_hooks)
        _cached_model = ClientModel(key, model, load_tokenizer(path), precision, hooks)
        log.info("client model %s loaded: %s", config.model.name, precision.describe())
    return _cached_model


def get_partition(config: AppConfig, source: Source, tokenizer,
                  data_path: str | None = None) -> TokenizedPartition:
    """The tokenised rows of a source: a partition of the shared dataset, or this node's own
    data at `data_path`."""
    key = (config.task, config.dataset, config.train.seq_length, config.train.train_eos,
           config.seed, source, data_path)
    if key not in _cached_partitions:
        if len(_cached_partitions) >= 4:  # bound memory: a process serves many partitions
            _cached_partitions.pop(next(iter(_cached_partitions)))
        if source.partition is None:
            rows = load_node_data(data_path)
        else:
            rows = load_partition(config.dataset, source.partition, config.seed)
        _cached_partitions[key] = tokenize_partition(
            rows, tokenizer, config.train.seq_length, config.dataset.keep_input_field,
            config.dataset.prompt_template, train_eos=config.train.train_eos, task=config.task,
        )
    return _cached_partitions[key]


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
        fp16=precision.fp16,
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
    computes each token's entropy and top-1 accuracy, for logging only. Here the loss is the
    same negative log-likelihood over the same labels (TRL builds them from our completion mask)
    with the same normalisation, so the optimisation is unchanged and the metrics' cost goes
    away; bench/step_efficiency.py measures both. Two ways to compute it:

    - `fused_loss`: TRL's chunked LM head, computing log-probabilities only. It never builds
      the [batch, length, vocabulary] logits, which with the model's own loss (fp32 upcast,
      log-softmax kept for backward) cost 7-9 GB at 8 x 512 tokens and a 152k vocabulary. Used
      on CUDA, where memory binds.
    - otherwise: transformers' own causal-LM loss, the faster of the two on CPU.
    """
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    class LeanSFTTrainer(SFTTrainer):
        def __init__(self, *args, fused_loss: bool, **kwargs):
            super().__init__(*args, **kwargs)
            self.fused_loss = fused_loss
            self.proximal: ProximalTerm | None = None  # FedProx's, set by make_trainer
            base = self.model.get_base_model()
            vars(base).pop("forward", None)  # TRL's head, which also computes the metrics
            add_fused_lm_head(base, outputs=("log_probs",))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.fused_loss:
                inputs = {**inputs, "fused_lm_head": True, "use_cache": False}
            loss = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if self.proximal is None or return_outputs:  # outputs: prediction, no gradient
                return loss
            return loss + self.proximal_share(num_items_in_batch) * self.proximal.gradient_only()

        def proximal_share(self, num_items_in_batch) -> float:
            """The share of FedProx's term one micro-batch's loss carries, so that the
            accumulated gradient holds mu (w - w_global) exactly once per optimiser step.
            Trainer.training_step divides a per-micro-batch mean loss by the accumulation
            steps itself, but not a loss the model already normalised over the whole step by
            `num_items_in_batch`; this is its own test (transformers 5)."""
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None
                          ) or self.compute_loss_func is not None
            return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    return LeanSFTTrainer


def remove_trainer_hooks(client: ClientModel) -> None:
    """Undo what the previous round's trainer attached to the cached model. Every SFTTrainer
    wraps the model's `forward` in its fused LM head, and it and Trainer.train each add an
    input-embedding hook; without this each round would stack one more wrapper and two more
    hooks onto the model."""
    base = client.model.get_base_model()
    vars(base).pop("forward", None)
    embedding = client.model.get_input_embeddings()
    for hook_id in set(embedding._forward_hooks) - client.embedding_hooks:
        del embedding._forward_hooks[hook_id]
        embedding._forward_hooks_with_kwargs.pop(hook_id, None)
        embedding._forward_hooks_always_called.pop(hook_id, None)


def fp32_adapter(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters' fp32 tensors, to give back with `restore_adapter`."""
    return {name: param.data for name, param in model.named_parameters() if param.requires_grad}


def restore_adapter(model, adapter: dict[str, torch.Tensor]) -> None:
    """Give the trainable parameters back their fp32 tensors. SFTTrainer casts them to bf16
    when the base is 4/8-bit (TRL's QLoRA branch): that rounds the global adapter just
    received, and an AdamW update smaller than half a bf16 ulp of a weight is lost, at our
    learning rates (5e-5 down to 1e-6) most of them. Autocast still computes in bf16; only
    the weights the optimizer updates stay fp32."""
    for name, param in model.named_parameters():
        if name in adapter:
            param.data = adapter[name]


def make_trainer(config: AppConfig, client: ClientModel, examples, learning_rate: float,
                 seed: int, out: str, token_metrics: bool = False, proximal_mu: float = 0.0):
    """The SFTTrainer a client round uses (also what bench/step_efficiency.py times), with
    FedProx's term around the adapter it starts from when `proximal_mu` > 0. Its optimizer is
    built in `train()`, after the adapter has its fp32 tensors back."""
    from trl import SFTTrainer

    remove_trainer_hooks(client)
    adapter = fp32_adapter(client.model)
    kwargs = {"model": client.model, "train_dataset": examples,
              "processing_class": client.tokenizer,
              "args": sft_config(config, client.precision, learning_rate, seed, out)}
    if token_metrics:
        if proximal_mu:
            raise ValueError("FedProx's term is part of the lean trainer's loss only")
        trainer = SFTTrainer(**kwargs)
    else:
        trainer = lean_sft_trainer_class()(**kwargs, fused_loss=client.precision.device == "cuda")
    restore_adapter(client.model, adapter)
    if proximal_mu:
        trainer.proximal = ProximalTerm.around(client.model, proximal_mu)
    return trainer


@dataclass(frozen=True)
class ProximalTerm:
    """FedProx's mu/2 |w - w_global|^2 over the trainable parameters, w_global being the
    adapter the round starts from, added to the loss of every micro-batch (a share each, see
    `proximal_share`).

    In the loss rather than in a gradient hook: under fp16 the accelerator backpropagates the
    loss times the GradScaler's scale (2^16 at first) and divides the gradients by that scale
    before the step, so a hook's unscaled mu (w - w_global) arrived divided by the scale and
    FedProx trained as FedAvg. A term of the loss is scaled, unscaled and checked for overflow
    together with the task's gradient by whatever backward the accelerator runs (GradScaler,
    none, DeepSpeed), with no need to read the scale (a device sync per micro-batch)."""

    mu: float
    anchors: tuple[tuple[torch.nn.Parameter, torch.Tensor], ...]

    @classmethod
    def around(cls, model, mu: float) -> ProximalTerm:
        return cls(mu, tuple((param, param.detach().clone()) for param in model.parameters()
                             if param.requires_grad))

    def value(self) -> torch.Tensor:
        return self.mu / 2 * torch.stack(
            [(param - anchor).pow(2).sum() for param, anchor in self.anchors]).sum()

    def gradient_only(self) -> torch.Tensor:
        """Zero in value, mu (w - w_global) in gradient: the loss the Trainer reports stays
        the task's, comparable across rules."""
        term = self.value()
        return term - term.detach()


def train_round(
    config: AppConfig,
    source: Source,
    server_round: int,
    learning_rate: float,
    global_state: dict[str, torch.Tensor],
    data_path: str | None = None,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """Reset the adapter to the global weights, train locally on `source`, return the new
    adapter."""
    start = time.perf_counter()
    client = get_client_model(config)
    set_lora_state_dict(client.model, global_state)
    partition = get_partition(config, source, client.tokenizer, data_path)
    if config.strategy.fraction_evaluate > 0:  # the held-back rows are for evaluate_round
        partition = split_local_eval(partition, config.dataset.local_eval_share)[0]
    t = config.train
    needed = t.max_steps * t.batch_size * t.gradient_accumulation_steps
    examples = examples_for_round(partition, needed, config.seed, server_round, source.seed_key)
    seed = config.seed + server_round
    with tempfile.TemporaryDirectory(prefix="flowertune-trainer-") as out:
        output = make_trainer(config, client, examples, learning_rate, seed, out,
                              proximal_mu=proximal_mu).train()
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


@dataclass
class EvaluationResult:
    loss: float  # mean token loss on the held-back rows' responses
    tokens: int
    num_examples: int
    seconds: float


def evaluate_round(config: AppConfig, source: Source, global_state: dict[str, torch.Tensor],
                   data_path: str | None = None) -> EvaluationResult:
    """Federated evaluation: the global adapter's mean token loss on this client's held-back
    rows (`split_local_eval`), scored as the server scores its held-out rows."""
    start = time.perf_counter()
    client = get_client_model(config)
    set_lora_state_dict(client.model, global_state)
    _, rows = split_local_eval(get_partition(config, source, client.tokenizer, data_path),
                               config.dataset.local_eval_share)
    nll, tokens = example_losses(client.model, list(rows), client.tokenizer.pad_token_id,
                                 config.train.batch_size)
    client.model.train()
    return EvaluationResult(float(nll.sum() / tokens.sum()), int(tokens.sum()), len(rows),
                            time.perf_counter() - start)
