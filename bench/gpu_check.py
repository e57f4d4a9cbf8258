"""GPU check: the CUDA path end to end, in a few minutes, on the day a GPU is there.

    .venv/bin/python bench/gpu_check.py                       # the packaged SmolLM2, no hub
    .venv/bin/python bench/gpu_check.py --hub-model Qwen/Qwen2.5-1.5B-Instruct

For each model: one MMLU evaluation of a few questions per subject (4-bit, the default on CUDA)
and one client round in nf4 + native bf16 (fp16 where bf16 is not native); then a 2-round,
2-client launcher run on SmolLM2 with the launcher's default GPUs per client. Prints the device,
the dtypes of base and adapter, whether the LM head built full logits, peak GPU memory, step
time and evaluation throughput, and fails (exit 1) where the CUDA path is not what it should
be. Refuses to run (exit 2) without CUDA.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ALPACA_SAMPLE, MMLU, SMOLLM2, offline, report

GIB = 1024**3


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 2)


def dtype_counts(parameters) -> dict[str, int]:
    """Parameters per dtype (a 4-bit weight shows as uint8)."""
    counts: collections.Counter = collections.Counter()
    for param in parameters:
        counts[str(param.dtype).removeprefix("torch.")] += param.numel()
    return dict(counts)


def check_evaluation(model: str, mmlu: str, limit: int, out: Path) -> dict:
    from evaluation.runner import EvalRequest, evaluate

    torch.cuda.reset_peak_memory_stats()
    result = evaluate(EvalRequest(base_model=model, mmlu_path=mmlu, limit_per_subject=limit,
                                  batch_size=16, progress=False, output=str(out / "eval.json")))
    summaries = result["protocols"].values()
    return {"eval_precision": result["precision"],
            "eval_questions": next(iter(summaries))["questions"],
            "eval_qps": {p: round(s["questions_per_second"], 1)
                         for p, s in result["protocols"].items()},
            "eval_peak_gib": peak_gib()}


def check_client_round(model: str, dataset: str, steps: int) -> dict:
    """One client round as a Ray actor runs it, with the lm_head's calls counted: on CUDA the
    loss goes through TRL's chunked head, which never calls it."""
    from flowertune_nlp import training
    from flowertune_nlp.config import build_config
    from flowertune_nlp.nodes import Source

    config = build_config({
        "model.name": model, "model.quantization": 4, "static.dataset.name": dataset,
        "train.training-arguments.max-steps": steps})  # length 512, batch 8: the defaults
    torch.cuda.reset_peak_memory_stats()
    client = training.get_client_model(config)
    load_gib = peak_gib()
    lm_head_calls = []
    hook = client.model.get_output_embeddings().register_forward_hook(
        lambda *_: lm_head_calls.append(1))
    initial = training.lora_state_dict(client.model)
    result = training.train_round(config, Source(0), 1, config.train.learning_rate_max, initial)
    hook.remove()
    trainable = [p for p in client.model.parameters() if p.requires_grad]
    figures = {
        "train_precision": result.precision,
        "base_dtypes": dtype_counts(p for p in client.model.parameters() if not p.requires_grad),
        "adapter_dtypes": dtype_counts(trainable),
        "full_logits_built": bool(lm_head_calls),
        "train_loss": round(result.train_loss, 4),
        "step_seconds": round(result.train_seconds / steps, 3),
        "model_gib": load_gib,
        "train_peak_gib": peak_gib(),
    }
    del client, trainable
    training.free_client_model()
    return figures


def check_launcher_run(dataset: str, out: Path) -> dict:
    from flowertune_nlp.hardware import gpus_per_client
    from flowertune_nlp.launch import run_app

    gpus = gpus_per_client(None)
    start = time.perf_counter()
    outcome = run_app([{
        "num-server-rounds": 2, "model.name": SMOLLM2, "model.quantization": 4,
        "static.dataset.name": dataset, "train.training-arguments.max-steps": 3,
        "output-dir": str(out), "run-name": "gpu-check"}], gpus_per_client=gpus)
    figures = {"launcher_gpus_per_client": gpus, "launcher_status": outcome.status,
               "launcher_seconds": round(time.perf_counter() - start, 1)}
    if outcome.run_dir and (outcome.run_dir / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").open()]
        figures["launcher_round_seconds"] = [round(r["wall_seconds"], 1) for r in rows]
        figures["launcher_precision"] = sorted({p for r in rows for p in r["precision"]})
    return figures


def problems(figures: dict) -> list[str]:
    """What is wrong with a model's figures on the CUDA path."""
    found = []
    for key in ("eval_precision", "train_precision"):
        if not figures[key].startswith("cuda, nf4"):
            found.append(f"{key} = {figures[key]!r}, not a 4-bit model on CUDA")
    if set(figures["adapter_dtypes"]) != {"float32"}:
        found.append(f"adapter dtypes {figures['adapter_dtypes']}, not fp32")
    if figures["full_logits_built"]:
        found.append("the training loss went through the full-vocabulary logits")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub-model", default=None,
                        help="also check this hub model (downloads it), e.g. "
                        "Qwen/Qwen2.5-1.5B-Instruct")
    parser.add_argument("--mmlu-path", default=str(MMLU))
    parser.add_argument("--dataset", default=str(ALPACA_SAMPLE))
    parser.add_argument("--limit-per-subject", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-launcher", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU, and torch sees none "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run it on a GPU machine with a CUDA build of torch", file=sys.stderr)
        return 2
    if not args.hub_model:
        offline()
    out = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    figures: dict = {"benchmark": "gpu_check", "device": torch.cuda.get_device_name(),
                     "gpu_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1),
                     "native_bf16": torch.cuda.is_bf16_supported(including_emulation=False),
                     "torch": torch.__version__, "cuda": torch.version.cuda}
    print(f"device: {figures['device']} ({figures['gpu_gib']} GiB), native bf16: "
          f"{figures['native_bf16']}", flush=True)
    found = []
    for model in filter(None, (SMOLLM2, args.hub_model)):
        name = Path(model).stem if model == SMOLLM2 else model
        result = {**check_evaluation(model, args.mmlu_path, args.limit_per_subject, out),
                  **check_client_round(model, args.dataset, args.steps)}
        print(f"{name}: {result}", flush=True)
        found += [f"{name}: {p}" for p in problems(result)]
        figures[name] = result
    if not args.skip_launcher:
        launcher = check_launcher_run(args.dataset, out)
        print(f"launcher: {launcher}", flush=True)
        if launcher["launcher_status"] != "completed":
            found.append(f"launcher run {launcher['launcher_status']}")
        if not all(p.startswith("cuda") for p in launcher.get("launcher_precision", ["none"])):
            found.append(f"launcher clients ran as {launcher.get('launcher_precision')}")
        figures.update(launcher)
    figures["problems"] = found
    report("GPU check: " + ("all as expected" if not found else "; ".join(found)), figures)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
