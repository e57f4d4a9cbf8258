"""Run a command and report the peak memory of its whole process tree (Ray workers too).

    python bench/peak_rss.py -- python -m flowertune_nlp.launch --run-config configs/cpu-smoke.toml

Summed RSS counts pages shared between processes (torch's libraries, Ray's object store) once
per process, so it overstates the tree's footprint; summed PSS splits each shared page between
its users and adds up to what the tree really holds. Both peaks are reported.
Prints the command's wall time and peak tree RSS/PSS as one line of text and one JSON line last.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import psutil


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS, summed PSS) of a process and its descendants, in bytes."""
    rss = pss = 0
    try:
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            info = member.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
    return rss, pss


def measure(command: list[str], interval: float = 0.5) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        rss, pss = tree_memory(root)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    return {"exit_code": process.returncode, "wall_seconds": round(time.perf_counter() - start, 1),
            "peak_tree_rss_gb": round(peak_rss / 2**30, 2),
            "peak_tree_pss_gb": round(peak_pss / 2**30, 2)}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    result = measure(args)
    print(f"exit {result['exit_code']}, {result['wall_seconds']} s, peak tree RSS "
          f"{result['peak_tree_rss_gb']} GB, peak tree PSS {result['peak_tree_pss_gb']} GB")
    print(json.dumps(result))
    sys.exit(result["exit_code"])
