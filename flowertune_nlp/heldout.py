"""Held-out evaluation: the mean token loss of a global adapter on the response tokens of rows
no client trains on (`static.dataset.validation-size`), its perplexity, and a bootstrap 95 %
interval over examples. It answers the question training loss cannot: does the global model
get better on data it has not seen?

The ServerApp scores every round with it (round 0 is the base model); benchmarks score saved
adapters with the same code. The evaluator keeps one copy of the base model + LoRA for the whole
run (loaded at the first evaluation): re-loading it every round would cost more time than the
evaluation itself, and on the `cpu-smoke` shape it adds the model's size once to the server.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from flowertune_nlp.config import AppConfig
from flowertune_nlp.data import load_validation, masked_labels
from flowertune_nlp.models import (
    add_lora,
    choose_precision,
    load_base_model,
    load_tokenizer,
    release_memory,
    resolve_model_path,
    set_lora_state_dict,
)

log = logging.getLogger(__name__)
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class HeldOutScore:
    loss: float  # mean negative log-likelihood per response token
    perplexity: float
    loss_ci_low: float  # bootstrap 95 % interval of `loss` over examples
    loss_ci_high: float
    examples: int
    tokens: int
    seconds: float

    def as_row(self) -> dict:
        return {f"heldout_{k}": v for k, v in asdict(self).items()}


def score(nll: np.ndarray, tokens: np.ndarray, seconds: float, seed: int = 0) -> HeldOutScore:
    """Token-weighted mean loss over examples, with a percentile bootstrap interval obtained by
    resampling whole examples (tokens of one example are not independent)."""
    loss = float(nll.sum() / tokens.sum())
    picks = np.random.default_rng(seed).integers(0, len(nll), (BOOTSTRAP_RESAMPLES, len(nll)))
    resampled = nll[picks].sum(axis=1) / tokens[picks].sum(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return HeldOutScore(loss, math.exp(loss), float(low), float(high), len(nll),
                        int(tokens.sum()), seconds)


@dataclass(frozen=True)
class PairedDifference:
    difference: float  # mean token loss of b minus that of a, on the same rows
    ci_low: float  # bootstrap 95 % interval, both losses on each resample of whole examples
    ci_high: float

    def as_text(self) -> str:
        return f"{self.difference:+.4f} [{self.ci_low:+.4f}, {self.ci_high:+.4f}]"


def paired_difference(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray,
                      seed: int = 0) -> PairedDifference:
    """Loss of b minus loss of a on the same held-out rows. Resampling the rows once for both
    removes the row-to-row spread that makes each loss's own interval wide, so this interval
    says whether two adapters really differ when their separate intervals overlap."""
    def loss(nll: np.ndarray, picks) -> np.ndarray:
        return nll[picks].sum(axis=-1) / tokens[picks].sum(axis=-1)

    everything = np.arange(len(tokens))
    picks = np.random.default_rng(seed).integers(0, len(tokens),
                                                 (BOOTSTRAP_RESAMPLES, len(tokens)))
    resampled = loss(nll_b, picks) - loss(nll_a, picks)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return PairedDifference(float(loss(nll_b, everything) - loss(nll_a, everything)),
                            float(low), float(high))


@torch.no_grad()
def example_losses(model, examples, pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the summed negative log-likelihood of its scored tokens and their count.
    Batches are formed longest first, so padding stays small."""
    model.eval()
    rows = sorted(examples, key=lambda row: -len(row["input_ids"]))
    device = next(model.parameters()).device
    nll, counts = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = len(batch[0]["input_ids"])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(masked_labels(row))
            mask[i, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        targets = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=-100, reduction="none").view(targets.shape)
        nll += losses.sum(dim=1).double().cpu().tolist()
        counts += (targets != -100).sum(dim=1).cpu().tolist()
    return np.asarray(nll), np.asarray(counts, dtype=np.float64)


class HeldOutEvaluator:
    """Scores LoRA adapters (state dicts or ArrayRecords) of one run on its held-out rows."""

    def __init__(self, config: AppConfig, batch_size: int = 4) -> None:
        self.config = config
        self.batch_size = batch_size
        self.model = None
        self.tokenizer = None
        self.examples = None

    def load(self) -> None:
        """Read the held-out rows and load the base model + LoRA (done by the first call)."""
        path = resolve_model_path(self.config.model.name)
        precision = choose_precision(self.config.model.precision, self.config.model.quantization)
        self.tokenizer = load_tokenizer(path)
        held_out = load_validation(self.config, self.tokenizer)
        if held_out is None:
            raise ValueError("held-out evaluation needs static.dataset.validation-size > 0")
        self.examples = list(held_out.dataset)
        if not self.examples:
            raise ValueError("no held-out row fits train.seq-length; raise it or "
                             "static.dataset.validation-size")
        self.model = add_lora(load_base_model(path, precision), self.config.model.lora)

    def __call__(self, adapter: dict[str, torch.Tensor]) -> HeldOutScore:
        import time

        start = time.perf_counter()
        nll, tokens = self.example_losses(adapter)
        return score(nll, tokens, time.perf_counter() - start, seed=self.config.seed)

    def example_losses(self, adapter: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Per held-out row (always in the same order): summed loss and scored tokens."""

        if self.model is None:
            self.load()
        set_lora_state_dict(self.model, adapter)
        return example_losses(self.model, self.examples, self.tokenizer.pad_token_id,
                              self.batch_size)

    def close(self) -> None:
        """Free the model now (a 4-bit model is a reference cycle)."""

        self.model = None
        release_memory()
