"""Score a base model (+ optional adapter) on one task's evaluation suite: `evaluate_task`.

Finance, medical and code run through the suite interface (evaluation/suite.py); general NLP is
MMLU (evaluation/runner.py), whose protocols are called `flowertune` (the leaderboard's) and
`logprob` (the robust one). Every set is loaded before the model, so a missing file costs a
second; a set that cannot be had here (CareQA offline, a missing compiler) is reported as not
run and left out of the mean, never scored 0.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from evaluation.suite import PROTOCOLS, NotAvailable, Options, mean_of, summarize_records
from flowertune_nlp.io import atomic_write_json, atomic_write_text
from flowertune_nlp.tasks import Task, get_task

MMLU_PROTOCOLS = {"leaderboard": "flowertune", "robust": "logprob"}


@dataclass
class TaskEvalRequest:
    task: str
    base_model: str
    peft_path: str | None = None
    run_name: str = "eval"
    benchmarks: tuple[str, ...] | None = None  # None: every set of the suite
    protocols: tuple[str, ...] = PROTOCOLS
    data_dir: str | None = None  # offline copies laid out like ../shared/data; None: the hub
    limit: int | None = None  # first N items of each set
    batch_size: int = 16
    quantization: int | None = None
    precision: str = "auto"
    samples: int = 1  # code, robust protocol: samples per problem (pass@k)
    output: str | None = None
    allow_base_mismatch: bool = False
    progress: bool = True


def suite_module(task: Task):
    return importlib.import_module(task.suite)


def check_task_request(request: TaskEvalRequest) -> tuple[Task, list[str]]:
    """The task and the benchmarks to run; ValueError naming the known ones otherwise."""
    task = get_task(request.task)
    unknown = [p for p in request.protocols if p not in PROTOCOLS]
    if unknown or not request.protocols:
        raise ValueError(f"unknown protocol {unknown}; valid: {', '.join(PROTOCOLS)}")
    if request.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {request.batch_size}")
    if request.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {request.samples}")
    known = list(suite_module(task).BENCHMARKS)
    names = list(request.benchmarks or known)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown benchmark(s) {', '.join(bad)} for task {task.name}; known: "
                         f"{', '.join(known)}")
    return task, names


def evaluate_task(request: TaskEvalRequest) -> dict:
    """Run the suite's protocols on its benchmarks; write the result JSON and the per-question
    JSONL (prompt, raw output, parsed answer, gold; code: program and verdict) atomically.
    Returns the result as written. The model is freed on return."""
    from evaluation.runner import EvalRequest, load_model
    from flowertune_nlp.models import release_memory

    task, names = check_task_request(request)
    suite = suite_module(task)
    items: dict[str, list] = {}
    not_run: dict[str, str] = {}
    for name in names:
        try:
            items[name] = suite.load_items(name, request.data_dir, request.limit)
        except NotAvailable as err:
            not_run[name] = str(err)
    model, tokenizer, precision = load_model(EvalRequest(
        base_model=request.base_model, peft_path=request.peft_path,
        quantization=request.quantization, precision=request.precision,
        allow_base_mismatch=request.allow_base_mismatch))
    try:
        return _score(request, task, suite, names, items, not_run, model, tokenizer, precision)
    finally:
        del model
        release_memory()


def _score(request, task, suite, names, items, not_run, model, tokenizer, precision) -> dict:
    output = Path(request.output) if request.output else (
        Path("evaluation_results") / f"{request.run_name}-{task.name}.json")
    result = {
        "task": task.name, "run_name": request.run_name, "base_model": request.base_model,
        "peft_path": str(Path(request.peft_path).resolve()) if request.peft_path else None,
        "scored": "adapter" if request.peft_path else "base model (no adapter)",
        "precision": precision.describe(),
        "data": request.data_dir or "hub", "limit": request.limit,
        "benchmarks": names, "protocols": {},
    }
    lines: list[str] = []
    for protocol in request.protocols:
        summaries: dict[str, dict] = {}
        for name in names:
            if name in not_run:
                summaries[name] = {"status": "not run", "reason": not_run[name]}
                continue
            bar = tqdm(total=len(items[name]), desc=f"{task.name} {name} {protocol}",
                       disable=not request.progress)
            options = Options(batch_size=request.batch_size, progress=bar.update,
                              samples=request.samples)
            start = time.perf_counter()
            try:
                records = suite.run_protocol(protocol, name, model, tokenizer, items[name],
                                             options)
            except NotAvailable as err:
                summaries[name] = {"status": "not run", "reason": str(err)}
                continue
            finally:
                bar.close()
            summaries[name] = summarize_records(records, time.perf_counter() - start)
            extra = getattr(suite, "summarize_extra", None)
            if extra is not None:
                summaries[name].update(extra(protocol, records))
            lines += (json.dumps(r.to_json(protocol)) for r in records)
        mean, over = mean_of(summaries)
        result["protocols"][protocol] = {"benchmarks": summaries, "mean": mean,
                                         "mean_over": over}
    predictions_file = output.with_name(output.stem + ".predictions.jsonl")
    result["predictions_file"] = str(predictions_file.resolve())
    atomic_write_text(predictions_file, "\n".join(lines) + "\n")
    atomic_write_json(output, result)
    result["output_file"] = str(output.resolve())
    return result


def score_table(result: dict) -> dict[str, dict]:
    """Per protocol (leaderboard, robust): sub-scores in % by title, the mean in %, and the
    sets that were not run; for MMLU results (general NLP) and suite results alike."""
    from evaluation.mmlu import CATEGORY_TITLES, LEADERBOARD_CATEGORIES

    table = {}
    if "task" not in result:  # MMLU (evaluation/runner.py)
        for protocol, own in MMLU_PROTOCOLS.items():
            summary = result["protocols"].get(own)
            if summary is None:
                continue
            cats = summary["categories"]
            table[protocol] = {
                "subscores": {CATEGORY_TITLES[c]: round(100 * cats[c]["accuracy"], 2)
                              for c in LEADERBOARD_CATEGORIES if c in cats},
                "mean": None if summary["average"] is None else round(
                    100 * summary["average"], 2),
                "not_run": {}}
        return table
    suite = suite_module(get_task(result["task"]))
    for protocol, summary in result["protocols"].items():
        benches = summary["benchmarks"]
        table[protocol] = {
            "subscores": {suite.BENCHMARKS[n].title: round(100 * s["accuracy"], 2)
                          for n, s in benches.items() if s.get("status") == "ok"},
            "mean": None if summary["mean"] is None else round(100 * summary["mean"], 2),
            "not_run": {suite.BENCHMARKS[n].title: s.get("reason", "")
                        for n, s in benches.items() if s.get("status") != "ok"}}
    return table


def format_task_table(result: dict) -> str:
    """The one-screen summary of a suite result."""
    lines = [f"{result['task']} — {result['scored']}: {result['base_model']}"
             + (f" + {result['peft_path']}" if result["peft_path"] else "")]
    for protocol, row in score_table(result).items():
        cells = " · ".join(f"{title} {value:.2f}" for title, value in row["subscores"].items())
        mean = "-" if row["mean"] is None else f"{row['mean']:.2f}"
        lines.append(f"{protocol:<12} {cells}  | mean {mean}")
        for title, reason in row["not_run"].items():
            lines.append(f"{'':<12} {title}: not run ({reason})")
    return "\n".join(lines)
