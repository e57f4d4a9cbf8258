"""Run a command and report the peak summed RSS of its whole process tree (Ray workers too).

    python bench/peak_rss.py -- python -m flowertune_nlp.launch --run-config configs/cpu-smoke.toml
Prints the command's wall time and peak tree RSS as one JSON line last.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def measure(command: list[str], interval: float = 0.25) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(interval)
    return {"exit_code": process.returncode, "wall_seconds": round(time.perf_counter() - start, 1),
            "peak_tree_rss_gb": round(peak / 2**30, 2)}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    result = measure(args)
    print(json.dumps(result))
    sys.exit(result["exit_code"])
