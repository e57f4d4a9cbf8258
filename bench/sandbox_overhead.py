"""Sandbox overhead: programs/second of HumanEval's 164 canonical solutions through the sandbox
(`run_jobs`, all cores) against the same programs each run by a plain
`subprocess.run([interpreter, file])`, as many at a time, side by side in one run.

    flock /tmp/heavy.lock .venv/bin/python bench/sandbox_overhead.py --repeats 3

Program = prompt + canonical_solution + "\\n" + test + "\\ncheck(entry_point)\\n", as the
harness builds it. The plain runs use this interpreter and, when the sandbox runs Python
programs with another one (root drops to a uid that may not reach this one), that one too.
Prints the median of the repeats (the variants alternate within each repeat) and whether every
canonical solution passed in the sandbox in every repeat; exits 1 if one did not.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import SHARED_DATA, report

from evaluation.code.sandbox import (
    TIMEOUTS,
    Job,
    isolation,
    missing_toolchain,
    python_interpreter,
    run_jobs,
)

HUMANEVAL = SHARED_DATA / "code" / "humaneval" / "HumanEval.jsonl.gz"


def load_programs(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt") as rows:
        problems = [json.loads(line) for line in rows]
    return [(p["task_id"], p["prompt"] + p["canonical_solution"] + "\n" + p["test"]
             + f"\ncheck({p['entry_point']})\n") for p in problems]


def run_plain(interpreter: str, files: list[Path], workers: int) -> list[int]:
    """The baseline: one plain subprocess per program, `workers` at a time."""
    def one(path: Path) -> int:
        return subprocess.run([interpreter, str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=TIMEOUTS["python"]).returncode

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--humaneval", type=Path, default=HUMANEVAL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not args.humaneval.is_file():
        parser.exit(2, f"error: {args.humaneval} not found: pass --humaneval PATH\n")
    if hint := missing_toolchain("python"):
        parser.exit(2, f"error: the sandbox cannot run Python here: {hint}\n")
    programs = load_programs(args.humaneval)
    sandboxed = python_interpreter()
    interpreters = dict.fromkeys([sys.executable, sandboxed])
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as folder:
        files = []
        for index, (_, program) in enumerate(programs):
            files.append(Path(folder) / f"p{index}.py")
            files[-1].write_text(program)
        run_jobs([Job("python", programs[0][1])])  # warm-up: probes, page cache
        timings: dict[str, list[float]] = {"sandbox": [], **{f"plain {i}": [] for i in
                                                              interpreters}}
        not_passed: set[str] = set()
        plain_failed: set[str] = set()
        for repeat in range(args.repeats):
            start = time.perf_counter()
            verdicts = run_jobs([Job("python", p) for _, p in programs], workers=args.workers)
            timings["sandbox"].append(time.perf_counter() - start)
            not_passed |= {f"{tid}: {v.status} {v.detail[-200:]}"
                           for (tid, _), v in zip(programs, verdicts, strict=True)
                           if not v.passed}
            for interpreter in interpreters:
                start = time.perf_counter()
                codes = run_plain(interpreter, files, args.workers)
                timings[f"plain {interpreter}"].append(time.perf_counter() - start)
                plain_failed |= {tid for (tid, _), c in zip(programs, codes, strict=True) if c}
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s"
                                                       for k, v in timings.items()), flush=True)
    rates = {k: len(programs) / statistics.median(v) for k, v in timings.items()}
    plain = rates[f"plain {sys.executable}"]
    figures = {"benchmark": "sandbox_overhead", "programs": len(programs),
               "workers": args.workers, "repeats": args.repeats,
               "isolation": vars(isolation()), "sandbox_interpreter": sandboxed,
               "programs_per_s": {k: round(v, 1) for k, v in rates.items()},
               "sandbox_vs_plain": round(rates["sandbox"] / plain, 3),
               "canonical_passed_in_sandbox": len(programs) - len(not_passed),
               "not_passed": sorted(not_passed), "plain_failed": sorted(plain_failed)}
    if sandboxed != sys.executable:
        figures["sandbox_vs_plain_same_interpreter"] = round(
            rates["sandbox"] / rates[f"plain {sandboxed}"], 3)
    report(f"HumanEval canonical solutions, {args.workers} workers, median of {args.repeats}: "
           f"sandbox {rates['sandbox']:.1f} programs/s vs plain subprocess {plain:.1f} "
           f"({figures['sandbox_vs_plain']:.2f}x); {figures['canonical_passed_in_sandbox']}/"
           f"{len(programs)} passed in the sandbox", figures)
    if not_passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
