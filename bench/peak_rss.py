"""Run a command and report the peak memory of its whole process tree (Ray workers too).

    python bench/peak_rss.py -- python -m flowertune_nlp.launch --run-config configs/cpu-smoke.toml

Summed RSS counts pages shared between processes (torch's libraries, Ray's object store) once
per process, so it overstates the tree's footprint; summed PSS splits each shared page between
its users and adds up to what the tree really holds. Both peaks are reported.
The allocator matters (jemalloc, which the launcher preloads where it is installed, lowers the
peak), so the report also says which `LD_PRELOAD` the tree's processes really ran with.
Prints the command's wall time and peak tree RSS/PSS as one line of text and one JSON line last.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections import Counter

import psutil


def tree_memory(root: psutil.Process, preloads: dict[int, str]) -> tuple[int, int]:
    """(summed RSS, summed PSS) of a process and its descendants, in bytes; records each new
    member's LD_PRELOAD in `preloads` (pid -> value, "" for none)."""
    rss = pss = 0
    try:
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            info = member.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
            if member.pid not in preloads:
                preloads[member.pid] = member.environ().get("LD_PRELOAD", "")
    return rss, pss


def measure(command: list[str], interval: float = 0.5) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    peak_rss = peak_pss = 0
    preloads: dict[int, str] = {}
    while process.poll() is None:
        rss, pss = tree_memory(root, preloads)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    return {"exit_code": process.returncode, "wall_seconds": round(time.perf_counter() - start, 1),
            "peak_tree_rss_gb": round(peak_rss / 2**30, 2),
            "peak_tree_pss_gb": round(peak_pss / 2**30, 2),
            "ld_preload": dict(Counter(value or "none" for value in preloads.values()))}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    result = measure(args)
    print(f"exit {result['exit_code']}, {result['wall_seconds']} s, peak tree RSS "
          f"{result['peak_tree_rss_gb']} GB, peak tree PSS {result['peak_tree_pss_gb']} GB; "
          f"LD_PRELOAD of its processes (how many had each): {result['ld_preload']}")
    print(json.dumps(result))
    sys.exit(result["exit_code"])
