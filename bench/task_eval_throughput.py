"""Evaluation throughput of a task's suite: items/second of each protocol on each set, batched
against one at a time, median and range of three runs, on the same first N items, in one
process (one model load).

    .venv/bin/python bench/task_eval_throughput.py --task finance --limit 64 --batch-size 16

Generation protocols batch with left padding and a KV cache; log-likelihood protocols share the
prompt's forward pass across the choices. Each variant runs once untimed first (oneDNN builds
its kernels on first use). Prints one line per measurement and the figures as JSON last.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import SHARED_DATA, SMOLLM2, offline, report

from evaluation.runner import EvalRequest, load_model
from evaluation.suite import Options
from evaluation.tasks_runner import suite_module
from flowertune_nlp.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--base-model", default=SMOLLM2)
    parser.add_argument("--data-dir", default=str(SHARED_DATA))
    parser.add_argument("--limit", type=int, default=32, help="items per set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--protocols", default="leaderboard,robust")
    parser.add_argument("--benchmarks", default=None, help="default: every set of the task")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    offline()
    task = get_task(args.task)
    suite = suite_module(task)
    model, tokenizer, precision = load_model(EvalRequest(base_model=args.base_model))
    names = args.benchmarks.split(",") if args.benchmarks else list(suite.BENCHMARKS)
    figures: dict = {"benchmark": "task_eval_throughput", "task": task.name,
                     "precision": precision.describe(), "limit": args.limit,
                     "batch_size": args.batch_size}
    summary = []
    for name in names:
        try:
            items = suite.load_items(name, args.data_dir, args.limit)
        except Exception as err:  # e.g. CareQA offline: say so, measure the rest
            print(f"{name}: not run ({err})")
            continue
        for protocol in args.protocols.split(","):
            rates = {}
            for label, batch in (("one_at_a_time", 1), ("batched", args.batch_size)):
                def run(subset, protocol=protocol, name=name, batch=batch):
                    suite.run_protocol(protocol, name, model, tokenizer, subset,
                                       Options(batch_size=batch))

                run(items[:2])
                samples = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run(items)
                    samples.append(len(items) / (time.perf_counter() - start))
                rates[label] = samples
                key = f"{name}_{protocol}_{label}"
                figures[key + "_per_s"] = {"median": round(statistics.median(samples), 3),
                                           "min": round(min(samples), 3),
                                           "max": round(max(samples), 3)}
                print(f"{name} {protocol} {label}: {statistics.median(samples):.2f} items/s "
                      f"(range {min(samples):.2f}-{max(samples):.2f}, {len(items)} items)")
            ratio = statistics.median(rates["batched"]) / statistics.median(
                rates["one_at_a_time"])
            figures[f"{name}_{protocol}_speedup"] = round(ratio, 2)
            summary.append(f"{name} {protocol} {ratio:.2f}x")
    report(f"{task.name}: batched vs one at a time: " + ", ".join(summary), figures)


if __name__ == "__main__":
    main()
