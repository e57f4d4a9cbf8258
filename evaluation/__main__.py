"""`python -m evaluation`: score a base model (+ optional PEFT adapter) on a task's benchmarks
(general NLP: MMLU; finance: FPB/FiQA/TFNS; medical: PubMedQA/MedMCQA/MedQA/CareQA; code:
HumanEval/MBPP/MultiPL-E), or check the code benchmarks' reference solutions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from evaluation.mmlu import HUB_DATASET
from evaluation.runner import PROTOCOLS, AdapterError, EvalRequest, evaluate, format_table
from evaluation.tasks_runner import (
    MMLU_PROTOCOLS,
    TaskEvalRequest,
    check_task_request,
    evaluate_task,
    format_task_table,
)
from flowertune_nlp.cli import ArgumentParser
from flowertune_nlp.config import PRECISION_CHOICES
from flowertune_nlp.tasks import DEFAULT_TASK, TASKS, UnknownTask, canonical_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m evaluation",
        description="Score a base model plus a saved PEFT adapter on a task's benchmarks with "
        "the FlowerTune leaderboard protocol and/or a robust protocol (log-likelihood for "
        "multiple choice, greedy pass@1 for code).",
    )
    parser.add_argument("--task", default=DEFAULT_TASK,
                        help=f"one of {', '.join(TASKS)} (general-nlp is accepted)")
    parser.add_argument("--base-model-name-path", default=None,
                        help="hub id, local model folder, GGUF file or package:<pkg>/<file> "
                        "(required unless --check-references)")
    parser.add_argument("--peft-path", default=None,
                        help="PEFT adapter folder (peft_<round>); without it the base is scored")
    parser.add_argument("--run-name", default="eval", help="name stored in the result")
    parser.add_argument("--category", default="stem,social_sciences,humanities",
                        help="comma-separated: stem, social_sciences, humanities, other, or all")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantization", type=int, choices=(0, 4, 8), default=None,
                        help="4 (nf4), 8 or 0; default 4 on CUDA, 0 on CPU")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="auto: bf16 where native, else fp16 on CUDA and fp32 on CPU")
    parser.add_argument("--protocol", default="leaderboard,robust",
                        help="comma-separated: leaderboard, robust (MMLU also takes its own "
                        f"names {', '.join(PROTOCOLS)})")
    parser.add_argument("--benchmarks", default=None,
                        help="comma-separated subset of the task's sets (general_nlp: the MMLU "
                        "categories); default all")
    parser.add_argument("--data-dir", default=None,
                        help="offline copies laid out like ../shared/data (finance/, medical/, "
                        "code/, mmlu/); default: the hub")
    parser.add_argument("--limit", type=_positive, default=None,
                        help="score only the first N (>= 1) items of each set (general_nlp: "
                        "of each subject)")
    parser.add_argument("--samples", type=_positive, default=1,
                        help="code, robust protocol: samples per problem; > 1 reports pass@k "
                        "with the unbiased estimator")
    parser.add_argument("--check-references", action="store_true",
                        help="code: run every benchmark's reference solutions through the "
                        "sandbox (all must pass, a wrong one must fail); no model needed")
    parser.add_argument("--workers", type=_positive, default=None,
                        help="code: sandbox processes in parallel (default: the cores)")
    parser.add_argument("--mmlu-path", default=HUB_DATASET,
                        help="local folder with test/ (and dev/) CSVs, or a hub dataset id")
    parser.add_argument("--shots", type=int, default=0,
                        help="k-shot examples from the dev split (logprob protocol)")
    parser.add_argument("--limit-per-subject", type=_positive, default=None,
                        help="score only the first N (>= 1) questions of each subject; omit it "
                        "to score all of them")
    parser.add_argument("--output", default=None,
                        help="result JSON (default evaluation_results/<run-name>.json); the "
                        "per-question predictions go next to it as .predictions.jsonl")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="accept an adapter whose recorded base model name differs")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    """An integer >= 1 (0 would otherwise read as "no limit" and score all 10,935 questions)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1; omit the flag to score every "
                                         "question")
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        args.task = canonical_name(args.task)
        if args.check_references:
            return check_references(args)
        if args.base_model_name_path is None:
            raise ValueError("--base-model-name-path is required (the model to score)")
        if args.task != "general_nlp":
            return evaluate_suite(args)
        return evaluate_mmlu(args)
    except (AdapterError, UnknownTask, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # datasets and the hub client: no network, or offline mode
        if args.debug:
            raise
        print(f"error: cannot reach the Hugging Face hub ({err}); offline, give the local "
              "copies with --data-dir (MMLU: or --mmlu-path) and a local --base-model-name-path",
              file=sys.stderr)
        return 2
    except OSError as err:  # transformers' hub model load: "couldn't connect", missing files
        if args.debug:
            raise
        print(f"error: {err}".splitlines()[0] + " (check --base-model-name-path / --peft-path; "
              "offline, a local folder or package:<pkg>/<file>)", file=sys.stderr)
        return 2


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(p.strip() for p in text.split(",") if p.strip())


def check_references(args: argparse.Namespace) -> int:
    """Every reference solution of the code sets through the sandbox; exit 1 unless every set's
    status is "ok" (a failure, or a set not run for want of its toolchain)."""
    if args.task != "code":
        raise ValueError(f"--check-references is for --task code, not {args.task}")
    from evaluation.code.suite import BENCHMARKS
    from evaluation.code.suite import check_references as run_check

    names = list(_names(args.benchmarks) or BENCHMARKS)
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        raise ValueError(f"unknown benchmark(s) {', '.join(bad)}; known: {', '.join(BENCHMARKS)}")
    if args.data_dir is None:
        raise ValueError("--check-references reads the offline copies: give --data-dir")
    report = run_check(args.data_dir, names, args.workers)
    print(json.dumps(report, indent=2))
    return 0 if all(r["status"] == "ok" for r in report.values()) else 1


def evaluate_suite(args: argparse.Namespace) -> int:
    request = TaskEvalRequest(
        task=args.task, base_model=args.base_model_name_path, peft_path=args.peft_path,
        run_name=args.run_name, benchmarks=_names(args.benchmarks),
        protocols=_names(args.protocol) or (), data_dir=args.data_dir, limit=args.limit,
        batch_size=args.batch_size, quantization=args.quantization, precision=args.precision,
        samples=args.samples, output=args.output,
        allow_base_mismatch=args.allow_base_mismatch, progress=not args.no_progress)
    check_task_request(request)
    result = evaluate_task(request)
    print(format_task_table(result))
    print(f"results: {result['output_file']}\npredictions: {result['predictions_file']}")
    return 0


def evaluate_mmlu(args: argparse.Namespace) -> int:
    mmlu_path = args.mmlu_path
    if args.data_dir is not None and mmlu_path == HUB_DATASET:
        mmlu_path = str(Path(args.data_dir).expanduser() / "mmlu")
    categories = _names(args.benchmarks) or tuple(args.category.split(","))
    request = EvalRequest(
        base_model=args.base_model_name_path,
        peft_path=args.peft_path,
        run_name=args.run_name,
        categories=categories,
        protocols=tuple(MMLU_PROTOCOLS.get(p, p) for p in _names(args.protocol) or ()),
        batch_size=args.batch_size,
        quantization=args.quantization,
        precision=args.precision,
        mmlu_path=mmlu_path,
        shots=args.shots,
        limit_per_subject=args.limit_per_subject or args.limit,
        output=args.output,
        allow_base_mismatch=args.allow_base_mismatch,
        progress=not args.no_progress,
    )
    result = evaluate(request)
    print(format_table(result))
    print(f"results: {result['output_file']}\npredictions: {result['predictions_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
