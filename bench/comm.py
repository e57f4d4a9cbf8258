"""Communication: bytes per round against the published formula for two adapter sizes, and what fp16
transport (`comm.transport = "fp16"`) saves and costs.

    .venv/bin/python bench/comm.py

Three short `flwr run` simulations on SmolLM2 (3 rounds x 2 clients): LoRA r=8 and r=32 with
fp32 transport, and r=32 with fp16 transport, same seed and data. For each, every round's
ledger is compared with R=1 of the formula for the saved adapter's shapes. Then the two r=32
final adapters are compared tensor by tensor and both are scored on MMLU (logprob protocol).
Prints one line per run, a summary line, and the figures as JSON last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import ALPACA_SAMPLE, MMLU, SMOLLM2, offline, report
from safetensors.torch import load_file

from flowertune_nlp.comm import expected_total_bytes
from flowertune_nlp.launch import run_app


def train(out: Path, name: str, rank: int, transport: str, args) -> Path:
    settings = {
        "num-server-rounds": args.rounds, "model.name": SMOLLM2, "model.quantization": 0,
        "model.lora.peft-lora-r": rank, "model.lora.peft-lora-alpha": 2 * rank,
        "comm.transport": transport, "static.dataset.name": str(ALPACA_SAMPLE),
        "train.seq-length": 256, "train.training-arguments.max-steps": args.steps,
        "train.training-arguments.per-device-train-batch-size": 4,
        "train.learning-rate-max": 2e-4, "train.save-every-round": args.rounds,
        "output-dir": str(out), "run-name": name,
    }
    outcome = run_app([settings])
    if outcome.exit_code != 0:
        raise SystemExit(f"run {name} {outcome.status}: {outcome.error}")
    return outcome.run_dir


def ledger_check(run_dir: Path, rounds: int, bytes_per_param: int) -> dict:
    adapter = load_file(str(run_dir / f"peft_{rounds}" / "adapter_model.safetensors"))
    shapes = [tuple(t.shape) for t in adapter.values()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    formula = [expected_total_bytes(shapes, 1, r["clients"] + r["failures"], bytes_per_param)
               for r in rows]
    measured = [r["comm_bytes_round"] for r in rows]
    return {"params": sum(a * b for a, b in shapes), "tensors": len(shapes),
            "bytes_per_round": measured, "formula_bytes_per_round": formula,
            "equal": measured == formula, "total_mb": round(rows[-1]["comm_mb_total"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--limit-per-subject", type=int, default=5)
    args = parser.parse_args()
    offline()
    out = Path(tempfile.mkdtemp(prefix="bench-comm-"))
    runs = {"r8_fp32": (8, "fp32", 4), "r32_fp32": (32, "fp32", 4), "r32_fp16": (32, "fp16", 2)}
    result: dict = {"benchmark": "comm", "rounds": args.rounds}
    folders = {}
    for name, (rank, transport, width) in runs.items():
        folders[name] = train(out, name, rank, transport, args)
        result[name] = ledger_check(folders[name], args.rounds, width)
        print(f"{name}: {result[name]['total_mb']} MB, ledger == formula every round: "
              f"{result[name]['equal']}")

    final = {k: load_file(str(folders[k] / f"peft_{args.rounds}" / "adapter_model.safetensors"))
             for k in ("r32_fp32", "r32_fp16")}
    diff = max((final["r32_fp32"][k] - final["r32_fp16"][k]).abs().max().item()
               for k in final["r32_fp32"])
    scale = max(t.abs().max().item() for t in final["r32_fp32"].values())
    result["fp16_max_abs_diff"] = diff
    result["fp16_max_abs_diff_relative"] = diff / scale

    from evaluation.runner import EvalRequest, evaluate

    for name in ("r32_fp32", "r32_fp16"):
        scored = evaluate(EvalRequest(
            base_model=SMOLLM2, peft_path=str(folders[name] / f"peft_{args.rounds}"),
            mmlu_path=str(MMLU), protocols=("logprob",), progress=False,
            limit_per_subject=args.limit_per_subject, output=str(out / f"{name}-eval.json")))
        logprob = scored["protocols"]["logprob"]
        result[f"{name}_logprob_average"] = logprob["average"]
        result[f"{name}_logprob_overall_ci95"] = logprob["overall"]["ci95"]
    predictions = {name: [json.loads(line)["prediction"] for line in
                          (out / f"{name}-eval.predictions.jsonl").open()]
                   for name in ("r32_fp32", "r32_fp16")}
    result["fp16_identical_predictions"] = sum(
        a == b for a, b in zip(predictions["r32_fp32"], predictions["r32_fp16"], strict=True))
    result["questions"] = len(predictions["r32_fp32"])
    report(f"fp16 transport: {result['r32_fp16']['total_mb']} MB vs "
          f"{result['r32_fp32']['total_mb']} MB; final adapter max |diff| {diff:.2e} "
          f"({result['fp16_max_abs_diff_relative']:.2e} of the largest value); MMLU logprob "
          f"{result['r32_fp16_logprob_average']} vs {result['r32_fp32_logprob_average']}, "
           f"{result['fp16_identical_predictions']}/{result['questions']} identical predictions",
           result)


if __name__ == "__main__":
    main()
