"""Federation overhead: wall time of a whole `flwr run` simulation divided by the summed time of
the same optimizer steps run in one plain process without Flower.

    .venv/bin/python bench/federation_overhead.py          # 3 rounds x 2 clients x 5 steps

The Flower run goes through the launcher (SuperLink, SuperExec, Ray, one client training at a
time); its wall time includes start-up, model loading, data partitioning and shut-down. The
plain process then loads the model once and runs train_round for the same (round, partition)
pairs the federation sampled; only TRL's train_runtime of those rounds is summed.
Prints one line of text and the figures as JSON last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import ALPACA_SAMPLE, SMOLLM2, offline, report

from flowertune_nlp.config import build_config
from flowertune_nlp.launch import run_app
from flowertune_nlp.nodes import Source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    args = parser.parse_args()
    offline()
    out = Path(tempfile.mkdtemp(prefix="bench-federation-"))
    settings = {
        "num-server-rounds": args.rounds, "model.name": SMOLLM2, "model.quantization": 0,
        "static.dataset.name": str(ALPACA_SAMPLE), "train.seq-length": args.seq_length,
        "train.training-arguments.max-steps": args.steps,
        "train.training-arguments.per-device-train-batch-size": args.batch_size,
        "train.save-every-round": args.rounds, "output-dir": str(out), "run-name": "federated",
    }
    start = time.perf_counter()
    # The plain process below runs with the system allocator, so the federation does too.
    outcome = run_app([settings], jemalloc=False)
    flower_seconds = time.perf_counter() - start
    if outcome.exit_code != 0:
        raise SystemExit(f"the Flower run {outcome.status}: {outcome.error}")
    rows = [json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").open()]

    from flowertune_nlp import training

    config = build_config(settings)
    client = training.get_client_model(config)  # loaded once, as a Ray actor does
    state = training.lora_state_dict(client.model)
    plain_steps = 0.0
    for row in rows:
        updates = [training.train_round(config, Source(p), row["round"], row["learning_rate"],
                                        state) for p in row["partitions"]]
        plain_steps += sum(u.train_seconds for u in updates)
        state = {k: sum(u.state[k] for u in updates) / len(updates) for k in state}

    federated_steps = sum(r["client_train_seconds_sum"] for r in rows)
    clients = sum(len(r["partitions"]) for r in rows)
    result = {
        "benchmark": "federation_overhead",
        "rounds": args.rounds, "clients": clients, "steps_per_client": args.steps,
        "batch_size": args.batch_size, "seq_length": args.seq_length,
        "flower_wall_seconds": round(flower_seconds, 1),
        "flower_step_seconds": round(federated_steps, 1),
        "plain_step_seconds": round(plain_steps, 1),
        "overhead_ratio": round(flower_seconds / plain_steps, 3),
        "target_ratio": 1.15,
    }
    report(f"federation overhead: flwr run {result['flower_wall_seconds']} s (of which optimizer "
          f"steps {result['flower_step_seconds']} s) / plain steps {result['plain_step_seconds']}"
           f" s = {result['overhead_ratio']} (target <= 1.15)", result)


if __name__ == "__main__":
    main()
