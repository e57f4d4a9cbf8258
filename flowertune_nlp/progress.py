"""Live progress of a training run for whoever waits on it (the launcher, the sweep): round k/N,
the last train and held-out loss, communication so far and an estimate of the time left, read
from the run folder's metrics.jsonl while the run goes on. On a terminal it is one line that
updates in place; elsewhere (a log, CI) a plain line per finished round."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import TextIO


def progress_line(rows: list[dict], total_rounds: int, elapsed: float,
                  rounds_before: int = 0) -> str:
    """`round 3/10 · train loss 1.52 · held-out 1.48 · 12.4 MB · 2m05s left` from the rows
    so far; the time left extrapolates the rounds finished in `elapsed` (a resumed run had
    `rounds_before` rounds when the wait began)."""
    if not rows:
        return f"round 0/{total_rounds} · waiting for the first round"
    last = rows[-1]
    parts = [f"round {last['round']}/{total_rounds}"]
    if last.get("train_loss") is not None:
        parts.append(f"train loss {last['train_loss']:.4f}")
    if "heldout_loss" in last:
        parts.append(f"held-out {last['heldout_loss']:.4f}")
    parts.append(f"{last.get('comm_mb_total', 0.0):.1f} MB")
    done = last["round"] - rounds_before
    if done > 0 and last["round"] < total_rounds:
        left = elapsed / done * (total_rounds - last["round"])
        parts.append(f"{int(left // 60)}m{int(left % 60):02d}s left")
    elif last["round"] >= total_rounds:
        parts.append("done")
    return " · ".join(parts)


class ProgressWatcher:
    """A background thread printing `progress_line` for `run_dir` until stopped (use it as a
    context manager around the wait for the run)."""

    def __init__(self, run_dir: Path, total_rounds: int, stream: TextIO = sys.stderr,
                 prefix: str = "", interval: float = 2.0):
        self.metrics_file = Path(run_dir) / "metrics.jsonl"
        self.total_rounds, self.stream, self.prefix = total_rounds, stream, prefix
        self.interval = interval
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        rows = self._rows()
        self._rounds_before = rows[-1]["round"] if rows else 0
        self._printed_rounds = len(rows)
        self._start = time.monotonic()

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _rows(self) -> list[dict]:
        try:
            text = self.metrics_file.read_text()
        except OSError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # never half-written (atomic), but be safe
                break
        return rows

    def poll(self) -> None:
        """Print the progress once if there is something new (always on a terminal)."""
        rows = self._rows()
        if not self.tty and len(rows) == self._printed_rounds:
            return
        line = self.prefix + progress_line(rows, self.total_rounds,
                                           time.monotonic() - self._start,
                                           self._rounds_before)
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._printed_rounds = len(rows)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()
