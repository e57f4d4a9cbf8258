"""`python -m evaluation`: score a base model (+ optional PEFT adapter) on MMLU."""

from __future__ import annotations

import argparse
import logging
import sys

from evaluation.mmlu import HUB_DATASET
from evaluation.runner import PROTOCOLS, AdapterError, EvalRequest, evaluate, format_table
from flowertune_nlp.config import PRECISION_CHOICES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="Score a base model plus a saved PEFT adapter on MMLU with the FlowerTune "
        "leaderboard protocol and/or lm-evaluation-harness's log-likelihood protocol.",
    )
    parser.add_argument("--base-model-name-path", required=True,
                        help="hub id, local model folder, GGUF file or package:<pkg>/<file>")
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
    parser.add_argument("--protocol", default="flowertune,logprob",
                        help=f"comma-separated subset of {', '.join(PROTOCOLS)}")
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
    request = EvalRequest(
        base_model=args.base_model_name_path,
        peft_path=args.peft_path,
        run_name=args.run_name,
        categories=tuple(args.category.split(",")),
        protocols=tuple(p.strip() for p in args.protocol.split(",") if p.strip()),
        batch_size=args.batch_size,
        quantization=args.quantization,
        precision=args.precision,
        mmlu_path=args.mmlu_path,
        shots=args.shots,
        limit_per_subject=args.limit_per_subject,
        output=args.output,
        allow_base_mismatch=args.allow_base_mismatch,
        progress=not args.no_progress,
    )
    try:
        result = evaluate(request)
    except (AdapterError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"results: {result['output_file']}\npredictions: {result['predictions_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
