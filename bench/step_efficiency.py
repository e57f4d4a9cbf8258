"""Client step efficiency: our client's SFT step (the trainer train_round builds) against a
minimal PyTorch loop doing the same forward/backward/AdamW update on the same batches, model,
precision and gradient checkpointing; also stock TRL SFTTrainer with its per-step token metrics.

    .venv/bin/python bench/step_efficiency.py --steps 6

The three run twice, interleaved (stock, ours, loop, stock, ours, loop), so drift on this noisy
machine hits all; the first step of each run is dropped (kernel set-up), medians are compared. Where
jemalloc is installed, the whole measurement runs once in a child process with the system
allocator and once with jemalloc preloaded (as the launcher does).
Prints one line per run, a summary line, and the figures as JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import ALPACA_SAMPLE, SMOLLM2, offline, report
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step inside Trainer.train()."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def trainer_steps(config, client, examples, learning_rate, token_metrics: bool,
                  batches_out=None) -> list[float]:
    from trl import SFTTrainer

    from flowertune_nlp.training import make_trainer

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(config, client, examples, learning_rate, config.seed, out,
                               token_metrics)
        assert isinstance(trainer, SFTTrainer)
        trainer.add_callback(timer)
        if batches_out is not None:  # keep the exact batches the trainer's steps consume
            compute_loss = trainer.compute_loss

            def recording(model, inputs, *args, **kwargs):
                batches_out.append({k: v.detach().clone() for k, v in inputs.items()
                                    if isinstance(v, torch.Tensor)})
                return compute_loss(model, inputs, *args, **kwargs)

            trainer.compute_loss = recording
        trainer.train()
    return timer.times


def loop_steps(model, batches, learning_rate: float, bf16: bool) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    model.train()
    times = []
    for batch in batches:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args)
        return
    from flowertune_nlp.flower_home import find_jemalloc

    allocators = {"system": None}
    if find_jemalloc():
        allocators["jemalloc"] = find_jemalloc()
    result = {"benchmark": "step_efficiency"}
    for name, library in allocators.items():
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if library:
            env["LD_PRELOAD"] = library
        child = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env,
                               stdout=subprocess.PIPE, text=True, check=True)
        print(f"[{name} allocator]\n" + child.stdout.strip())
        result[name] = json.loads(child.stdout.strip().splitlines()[-1])
    system = result["system"]
    summary = (f"step efficiency (ours / minimal loop): {system['ratio']} with the system "
               f"allocator (stock TRL {system['stock_trl_ratio']})")
    if "jemalloc" in result:
        result["jemalloc_trainer_speedup"] = round(
            result["system"]["trainer_step_seconds"] / result["jemalloc"]["trainer_step_seconds"],
            3)
        summary += (f", {result['jemalloc']['ratio']} with jemalloc (stock TRL "
                    f"{result['jemalloc']['stock_trl_ratio']}); jemalloc makes our steps "
                    f"{result['jemalloc_trainer_speedup']}x faster")
    report(summary + " (target ratio <= 1.15)", result)


def measure(args) -> None:
    offline()
    from flowertune_nlp import training
    from flowertune_nlp.config import build_config
    from flowertune_nlp.data import examples_for_round
    from flowertune_nlp.nodes import Source

    config = build_config({
        "model.name": SMOLLM2, "model.quantization": 0, "static.dataset.name": str(ALPACA_SAMPLE),
        "train.seq-length": args.seq_length, "train.training-arguments.max-steps": args.steps,
        "train.training-arguments.per-device-train-batch-size": args.batch_size,
    })
    client = training.get_client_model(config)
    partition = training.get_partition(config, Source(0), client.tokenizer)
    examples = examples_for_round(partition, args.steps * args.batch_size, config.seed, 1, 0)
    initial = training.lora_state_dict(client.model)
    lr = config.train.learning_rate_max
    batches: list = []
    runs: dict[str, list[float]] = {"stock_trl": [], "trainer": [], "loop": []}
    for attempt in range(2):
        for name in runs:
            training.set_lora_state_dict(client.model, initial)
            if name == "loop":
                times = loop_steps(client.model, batches, lr, client.precision.bf16)
            else:
                record = batches if attempt == 0 and name == "trainer" else None
                times = trainer_steps(config, client, examples, lr, name == "stock_trl", record)
            runs[name] += times[1:]
            print(f"{name} run {attempt + 1}: steps {[round(t, 2) for t in times]} s")
    trainer_s, loop_s = statistics.median(runs["trainer"]), statistics.median(runs["loop"])
    stock_s = statistics.median(runs["stock_trl"])
    result = {
        "preload": os.environ.get("LD_PRELOAD", ""), "precision": client.precision.describe(),
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "batch_size": args.batch_size, "seq_length": args.seq_length,
        "tokens_per_batch": [int(b["attention_mask"].numel()) for b in batches],
        "trainer_step_seconds": round(trainer_s, 3), "loop_step_seconds": round(loop_s, 3),
        "stock_trl_step_seconds": round(stock_s, 3),
        "ratio": round(trainer_s / loop_s, 3), "stock_trl_ratio": round(stock_s / loop_s, 3),
        "target_ratio": 1.15,
    }
    report(f"step efficiency: ours {trainer_s:.2f} s/step, stock TRL {stock_s:.2f} s/step, minimal"
           f" loop {loop_s:.2f} s/step: ratio {result['ratio']} (stock TRL "
           f"{result['stock_trl_ratio']}; target <= 1.15)", result)


if __name__ == "__main__":
    main()
