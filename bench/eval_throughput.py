"""Evaluation throughput: questions/second of each MMLU protocol, batched and one at a time,
against the one-question-at-a-time reference implementations (evaluation/reference.py), on the
same fixed subset, side by side in one process; also counts identical predictions.

    .venv/bin/python bench/eval_throughput.py --limit-per-subject 2 --batch-size 16

Each implementation runs once untimed first (oneDNN builds its kernels on first use).
Prints one line per measurement, a summary line, and the figures as JSON last.
"""

from __future__ import annotations

import argparse
import time

from common import MMLU, SMOLLM2, offline, report

from evaluation.mmlu import LEADERBOARD_CATEGORIES, load_questions
from evaluation.protocols import run_flowertune, run_logprob
from evaluation.reference import reference_flowertune, reference_logprob
from evaluation.runner import EvalRequest, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default=SMOLLM2)
    parser.add_argument("--mmlu-path", default=str(MMLU))
    parser.add_argument("--limit-per-subject", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    offline()
    model, tokenizer, precision = load_model(
        EvalRequest(base_model=args.base_model, precision=args.precision))
    questions = load_questions(args.mmlu_path, LEADERBOARD_CATEGORIES, args.limit_per_subject)
    warm_up = questions[:4]
    figures: dict = {"benchmark": "eval_throughput", "questions": len(questions),
                     "precision": precision.describe(), "batch_size": args.batch_size}
    protocols = (("flowertune", run_flowertune, reference_flowertune),
                 ("logprob", run_logprob, reference_logprob))
    for name, run, reference in protocols:
        variants = {
            "reference": lambda qs, ref=reference: ref(model, tokenizer, qs),
            "unbatched": lambda qs, run=run: run(model, tokenizer, qs, 1),
            "batched": lambda qs, run=run: run(model, tokenizer, qs, args.batch_size),
        }
        predictions = {}
        for label, variant in variants.items():
            variant(warm_up)
            start = time.perf_counter()
            predictions[label] = [p.prediction for p in variant(questions)]
            qps = len(questions) / (time.perf_counter() - start)
            figures[f"{name}_{label}_qps"] = round(qps, 2)
            print(f"{name} {label}: {qps:.2f} questions/s")
        for label in ("unbatched", "batched"):
            figures[f"{name}_{label}_speedup"] = round(
                figures[f"{name}_{label}_qps"] / figures[f"{name}_reference_qps"], 2)
            figures[f"{name}_{label}_identical"] = sum(
                a == b for a, b in zip(predictions[label], predictions["reference"], strict=True))
    report(f"batched vs one-at-a-time reference on {len(questions)} questions: flowertune "
          f"{figures['flowertune_batched_speedup']}x ({figures['flowertune_batched_identical']} "
          f"identical; target 5x), logprob {figures['logprob_batched_speedup']}x "
           f"({figures['logprob_batched_identical']} identical; target 10x)", figures)


if __name__ == "__main__":
    main()
