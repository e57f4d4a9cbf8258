"""What every task's evaluation suite shares: the per-question record, a benchmark's summary, and
the protocol names.

A suite module (`evaluation/finance.py`, `medical.py`, `code/`) exposes
- `BENCHMARKS`: benchmark name -> `Benchmark` (hub source, local file under --data-dir, count);
- `load_items(name, data_dir, limit) -> list[Item]` (the first `limit` items, in the official
  order; `NotAvailable` when a set cannot be had here, e.g. hub-only offline);
- `run_protocol(protocol, name, model, tokenizer, items, options) -> list[Record]`.
`evaluation/tasks_runner.py` loads the model once, runs every benchmark and protocol, summarises
and writes the result JSON and the per-question JSONL atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The two protocols every task has: the leaderboard's own logic, quirks included (comparable
# with published scores), and what a careful evaluator reports.
PROTOCOLS = ("leaderboard", "robust")


class NotAvailable(Exception):
    """A benchmark that cannot be scored here (hub-only offline, a missing compiler); the
    message says why and how to get it. Reported as "not run", never scored 0."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  # as tables print it, e.g. "FPB"
    hub: str  # hub id (and config/split in words) used online
    local: str | None  # path under --data-dir used offline; None: hub only
    count: int  # official number of items


@dataclass(frozen=True)
class Item:
    """One question or problem: `qid` stable across runs, `gold` the answer as scored."""

    benchmark: str
    qid: str
    gold: str
    data: dict[str, Any] = field(default_factory=dict)  # whatever the suite needs to prompt


@dataclass
class Record:
    """One scored item, as the predictions file keeps it."""

    benchmark: str
    qid: str
    prompt: str
    gold: str
    raw_output: str | None
    parsed: str | None
    correct: bool
    extra: dict[str, Any] = field(default_factory=dict)  # code: program, verdict, samples

    def to_json(self, protocol: str) -> dict:
        return {"protocol": protocol, "benchmark": self.benchmark, "id": self.qid,
                "prompt": self.prompt, "gold": self.gold, "raw_output": self.raw_output,
                "parsed": self.parsed, "correct": self.correct, **self.extra}


@dataclass
class Options:
    """Run settings a protocol may read."""

    batch_size: int = 16
    progress: Callable[[int], None] | None = None
    samples: int = 1  # code: samples per problem for pass@k (robust protocol)
    seed: int = 0
    workers: int | None = None  # code: sandbox processes (default: the cores)
    extra: dict[str, Any] = field(default_factory=dict)


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy (sound at small n and near 0 or 1)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize_records(records: list[Record], seconds: float) -> dict:
    """Accuracy (pass@1 for code), its interval, throughput."""
    correct = sum(r.correct for r in records)
    total = len(records)
    low, high = wilson_interval(correct, total)
    return {"status": "ok", "accuracy": correct / total if total else 0.0, "correct": correct,
            "total": total, "ci95": [low, high], "seconds": seconds,
            "per_second": total / seconds if seconds > 0 else None}


def mean_of(benchmarks: dict[str, dict]) -> tuple[float | None, list[str]]:
    """The unweighted mean over the benchmarks that ran, and which those were: a set that was
    not run is left out of the mean, visibly (its name is missing from the list)."""
    ran = [name for name, summary in benchmarks.items() if summary.get("status") == "ok"]
    if not ran:
        return None, []
    return sum(benchmarks[n]["accuracy"] for n in ran) / len(ran), ran
