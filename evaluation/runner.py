"""Score a base model, optionally with a saved PEFT adapter, on MMLU: `evaluate(...)`."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.mmlu import (
    CATEGORIES,
    CATEGORY_TITLES,
    HUB_DATASET,
    LEADERBOARD_CATEGORIES,
    LETTERS,
    load_questions,
    load_subject,
    parse_categories,
)
from evaluation.protocols import Prediction, run_flowertune, run_logprob
from flowertune_nlp.adapter_fit import adapter_mismatch
from flowertune_nlp.io import atomic_write_json, atomic_write_text
from flowertune_nlp.models import (
    Precision,
    choose_precision,
    load_base_model,
    load_tokenizer,
    release_memory,
    resolve_model_path,
)

log = logging.getLogger(__name__)
PROTOCOLS = ("flowertune", "logprob")
CHANCE = 0.25


class AdapterError(RuntimeError):
    """The adapter is missing, unreadable, or does not belong to this base model."""


@dataclass
class EvalRequest:
    base_model: str
    peft_path: str | None = None
    run_name: str = "eval"
    categories: tuple[str, ...] = LEADERBOARD_CATEGORIES
    protocols: tuple[str, ...] = PROTOCOLS
    batch_size: int = 16
    quantization: int | None = None  # None: 4-bit on CUDA, none on CPU
    precision: str = "auto"
    mmlu_path: str = HUB_DATASET
    shots: int = 0
    limit_per_subject: int | None = None
    output: str | None = None
    allow_base_mismatch: bool = False
    progress: bool = True


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy (sound at small n and near 0 or 1)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _score(predictions: list[Prediction]) -> dict:
    correct = sum(p.correct for p in predictions)
    total = len(predictions)
    low, high = wilson_interval(correct, total)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "ci95": [low, high]}


def summarize(protocol: str, predictions: list[Prediction], seconds: float) -> dict:
    """Per-subject and per-category accuracy, the leaderboard average, and failure signals."""
    by_subject: dict[str, list[Prediction]] = {}
    by_category: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_subject.setdefault(p.question.subject, []).append(p)
        by_category.setdefault(p.question.category, []).append(p)
    categories = {}
    for name, preds in by_category.items():
        score = _score(preds)
        score["below_chance"] = score["accuracy"] < CHANCE
        score["subjects"] = len({p.question.subject for p in preds})
        categories[name] = score
    scored = [c for c in LEADERBOARD_CATEGORIES if c in categories]
    letters = Counter(p.prediction or "none" for p in predictions)
    summary = {
        "categories": categories,
        "subjects": {s: _score(preds) for s, preds in sorted(by_subject.items())},
        "average": (sum(categories[c]["accuracy"] for c in scored) / len(scored)
                    if len(scored) == len(LEADERBOARD_CATEGORIES) else None),
        "overall": _score(predictions),
        "letter_distribution": {k: letters.get(k, 0) for k in (*LETTERS, "none")},
        "questions": len(predictions),
        "seconds": seconds,
        "questions_per_second": len(predictions) / seconds if seconds > 0 else None,
    }
    if protocol == "flowertune":
        summary["parse_failure_rate"] = letters.get("none", 0) / max(1, len(predictions))
    return summary


def _read_adapter_config(peft_path: Path) -> dict:
    config_file = peft_path / "adapter_config.json"
    if not peft_path.is_dir() or not config_file.is_file():
        raise AdapterError(
            f"--peft-path {peft_path} is not a PEFT adapter folder (no adapter_config.json); "
            "pass a peft_<round> folder written by training"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file} is not valid JSON: {err}") from err


def _same_base(adapter_base: str | None, base_model: str) -> bool:
    if not adapter_base or adapter_base == base_model:
        return True
    try:
        return resolve_model_path(adapter_base) == resolve_model_path(base_model)
    except (OSError, ValueError):
        return False


def attach_adapter(model, peft_path: str, base_model: str, allow_base_mismatch: bool):
    """Load the adapter and prove every tensor in its file reached the model; anything else is
    an AdapterError, never a silent evaluation of the base model."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(peft_path).expanduser()
    adapter_config = _read_adapter_config(path)
    adapter_base = adapter_config.get("base_model_name_or_path")
    if not allow_base_mismatch and not _same_base(adapter_base, base_model):
        raise AdapterError(
            f"adapter {path} was trained on base model {adapter_base!r}, not {base_model!r}; "
            "pass the matching --base-model-name-path (or --allow-base-mismatch if the two "
            "names are the same model)"
        )
    weights = path / "adapter_model.safetensors"
    try:
        saved = load_file(str(weights))
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except Exception as err:  # any load failure must stop the evaluation
        raise AdapterError(f"adapter {path} failed to load: {type(err).__name__}: {err}") from err
    loaded = get_peft_model_state_dict(model)
    reason = adapter_mismatch(saved, loaded,
                              is_finite=lambda t: bool(torch.isfinite(t).all()))
    if reason:
        raise AdapterError(f"adapter {path} does not fit base model {base_model!r}: {reason}")
    for key, tensor in saved.items():
        value = loaded[key].detach().cpu().float()
        if not torch.allclose(value, tensor.float(), rtol=1e-2, atol=1e-3):  # bf16 rounding
            raise AdapterError(f"adapter tensor {key} did not load into the model")
    model.eval()
    return model


def load_base(request: EvalRequest):
    """The base model for inference (no k-bit training preparation), its tokenizer and
    precision."""
    quantization = request.quantization
    if quantization is None:
        quantization = 4 if torch.cuda.is_available() else 0
    precision = choose_precision(request.precision, quantization)
    path = resolve_model_path(request.base_model)
    model = load_base_model(path, precision)
    model.eval()
    return model, load_tokenizer(path), precision


def load_model(request: EvalRequest):
    """The model `request` scores: the base model, with its adapter when it names one."""
    model, tokenizer, precision = load_base(request)
    if request.peft_path:
        model = attach_adapter(model, request.peft_path, request.base_model,
                               request.allow_base_mismatch)
    return model, tokenizer, precision


def _shots(request: EvalRequest, subjects: set[str]) -> dict:
    if request.shots <= 0:
        return {}
    return {s: load_subject(request.mmlu_path, s, "dev")[:request.shots] for s in subjects}


def _prediction_rows(protocol: str, predictions: list[Prediction]):
    for p in predictions:
        row = {"protocol": protocol, "id": p.question.qid, "subject": p.question.subject,
               "category": p.question.category, "gold": p.question.gold_letter,
               "prediction": p.prediction, "correct": p.correct}
        if p.raw_output is not None:
            row["raw_output"] = p.raw_output
        if p.loglikelihoods is not None:  # " A".." D", for per-question parity checks
            row["loglikelihoods"] = list(p.loglikelihoods)
        yield json.dumps(row)


def default_output(request: EvalRequest) -> Path:
    return Path("evaluation_results") / f"{request.run_name}.json"


def check_request(request: EvalRequest) -> None:
    """Reject a bad request before any model is loaded."""
    unknown = [p for p in request.protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown}; valid: {', '.join(PROTOCOLS)}")
    if request.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {request.batch_size}")


def evaluate(request: EvalRequest) -> dict:
    """Run the requested protocols and write `<output>` (JSON) and `<output stem>.predictions.jsonl`
    atomically; returns the result dict written to the JSON. The model is freed on return."""
    check_request(request)
    questions = load_questions(request.mmlu_path, parse_categories(",".join(request.categories)),
                               request.limit_per_subject)
    model, tokenizer, precision = load_model(request)
    try:
        return score(request, model, tokenizer, precision, questions)
    finally:
        del model
        release_memory()


def score(request: EvalRequest, model, tokenizer, precision: Precision, questions) -> dict:
    """`evaluate` on a model already loaded (evaluation.curve swaps adapters on one base)."""
    categories = parse_categories(",".join(request.categories))
    output = Path(request.output) if request.output else default_output(request)
    result = {
        "run_name": request.run_name,
        "base_model": request.base_model,
        "peft_path": str(Path(request.peft_path).resolve()) if request.peft_path else None,
        "scored": "adapter" if request.peft_path else "base model (no adapter)",
        "precision": precision.describe(),
        "mmlu_source": request.mmlu_path,
        "categories": list(categories),
        "limit_per_subject": request.limit_per_subject,
        "shots": request.shots,
        "batch_size": request.batch_size,
        "protocols": {},
    }
    lines: list[str] = []
    for protocol in request.protocols:
        bar = tqdm(total=len(questions), desc=f"MMLU {protocol}", disable=not request.progress)
        start = time.perf_counter()
        if protocol == "flowertune":
            predictions = run_flowertune(model, tokenizer, questions, request.batch_size,
                                         bar.update)
        else:
            shots = _shots(request, {q.subject for q in questions})
            predictions = run_logprob(model, tokenizer, questions, request.batch_size, shots,
                                      bar.update)
        bar.close()
        result["protocols"][protocol] = summarize(protocol, predictions,
                                                  time.perf_counter() - start)
        lines += _prediction_rows(protocol, predictions)
    predictions_file = output.with_name(output.stem + ".predictions.jsonl")
    result["predictions_file"] = str(predictions_file.resolve())
    atomic_write_text(predictions_file, "\n".join(lines) + "\n")
    atomic_write_json(output, result)
    result["output_file"] = str(output.resolve())
    return result


def format_table(result: dict) -> str:
    """The one-screen summary: accuracy per category and protocol, with warnings."""
    cats = [c for c in CATEGORIES if c in result["categories"]]
    header = f"{'protocol':<11}" + "".join(f"{CATEGORY_TITLES[c]:>16}" for c in cats) + \
        f"{'Average':>10}"
    lines = [f"MMLU — {result['scored']}: {result['base_model']}"
             + (f" + {result['peft_path']}" if result["peft_path"] else ""), header]
    for protocol, summary in result["protocols"].items():
        row = f"{protocol:<11}"
        for c in cats:
            score = summary["categories"][c]
            flag = "!" if score["below_chance"] else " "
            row += f"{100 * score['accuracy']:>14.2f}%{flag}"
        average = summary["average"]
        row += f"{100 * average:>9.2f}%" if average is not None else f"{'-':>10}"
        lines.append(row)
    for protocol, summary in result["protocols"].items():
        extra = f"{summary['questions']} questions, {summary['questions_per_second']:.2f} q/s"
        if "parse_failure_rate" in summary:
            extra += f", not a letter A-D: {100 * summary['parse_failure_rate']:.1f}%"
        extra += f", predicted letters {summary['letter_distribution']}"
        lines.append(f"{protocol}: {extra}")
    lines.append("! = below chance (25 %)")
    return "\n".join(lines)
