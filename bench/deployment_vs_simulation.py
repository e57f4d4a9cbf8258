"""The same run on Flower's Deployment Engine and in simulation, side by side.

    .venv/bin/python bench/deployment_vs_simulation.py [--rounds 3]

`cpu-smoke`'s shape on SmolLM2-135M-Instruct (batch 4, 3 steps, length 256) with 2 partitions,
both trained every round: once through the launcher's simulation (2 simulated nodes), once on a
local Deployment Engine federation (TLS, authenticated SuperNodes, one partition each). Reports
wall times and their ratio, per round the wall time, the slowest client's time inside its
handler and its optimizer steps, and the peak summed RSS/PSS of each run's processes (sampled
every 0.5 s). A deployment runs every message in a fresh `flwr-clientapp` process, so each round
pays the process start, the imports and the model load again; the per-round figures show where
that time goes. Both runs train the same partitions with the same seed, so their final adapters
are compared too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import psutil
import tomli_w
from common import ALPACA_SAMPLE, ROOT, SMOLLM2, final_adapter, offline, report

from flowertune_nlp.federation import LocalFederation, marked_processes


class PeakMemory:
    """Peak summed RSS and PSS of the processes `members()` returns (each counted once),
    sampled in a thread."""

    def __init__(self, members: Callable[[], list[psutil.Process]], interval: float = 0.5):
        self.members, self.interval = members, interval
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            for member in self.members():
                with contextlib.suppress(psutil.Error):
                    info = member.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def settings(rounds: int, out: Path, name: str) -> dict:
    preset = tomllib.loads((ROOT / "configs" / "cpu-smoke.toml").read_text())
    return {**preset, "num-server-rounds": rounds, "model.name": SMOLLM2,
            "static.dataset.name": str(ALPACA_SAMPLE), "static.dataset.num-partitions": 2,
            "strategy.fraction-train": 1.0, "federation.min-nodes": 2,
            "output-dir": str(out), "run-name": name}


def rounds_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"round": r["round"], "wall_s": round(r["wall_seconds"], 1),
             "client_handler_s_max": round(r["client_seconds_max"], 1),
             "train_s_sum": round(r["client_train_seconds_sum"], 1)} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    offline()
    work = Path(tempfile.mkdtemp(prefix="deploy-vs-sim-"))

    sim_config = work / "simulation.toml"
    sim_config.write_text(tomli_w.dumps(settings(args.rounds, work, "simulation")))
    start = time.perf_counter()
    launcher = subprocess.Popen([sys.executable, "-m", "flowertune_nlp.launch",
                                 "--num-supernodes", "2", "--run-config", str(sim_config)],
                                cwd=ROOT)
    def launcher_tree() -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(launcher.pid)
            return [root, *root.children(recursive=True)]
        return []

    with PeakMemory(launcher_tree) as sim_memory:
        launcher.wait()
    sim_wall = time.perf_counter() - start
    if launcher.returncode:
        raise SystemExit(f"the simulation failed (exit {launcher.returncode})")

    dep_config = work / "deployment.toml"
    dep_config.write_text(tomli_w.dumps(settings(args.rounds, work, "deployment")))
    nodes = [{"partition-id": p, "num-partitions": 2} for p in range(2)]
    start = time.perf_counter()
    # One core per node: the 2 nodes train at once on this machine's cores, as the simulation's
    # clients train one after another on all of them.
    threads = max(1, (psutil.cpu_count() or 2) // len(nodes))
    with LocalFederation(work / "federation", nodes, threads_per_node=threads) as fed:
        up_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with PeakMemory(lambda: marked_processes(work / "federation")) as dep_memory:
            done = subprocess.run(fed.run_command(ROOT, str(dep_config)), env=fed.env,
                                  capture_output=True, text=True)
        dep_wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the deployment run failed: {done.stdout[-2000:]}")

    from safetensors.torch import load_file

    sim_adapter = load_file(str(final_adapter(work / "simulation")))
    dep_adapter = load_file(str(final_adapter(work / "deployment")))
    identical = all((sim_adapter[k] == dep_adapter[k]).all().item() for k in sim_adapter)
    figures = {
        "benchmark": "deployment_vs_simulation", "rounds": args.rounds, "clients_per_round": 2,
        "simulation_wall_s": round(sim_wall, 1), "deployment_run_wall_s": round(dep_wall, 1),
        "deployment_up_s": round(up_seconds, 1), "deployment_threads_per_node": threads,
        "ratio_deployment_to_simulation": round(dep_wall / sim_wall, 2),
        "simulation_rounds": rounds_of(work / "simulation"),
        "deployment_rounds": rounds_of(work / "deployment"),
        "simulation_peak_rss_gb": round(sim_memory.rss / 2**30, 2),
        "simulation_peak_pss_gb": round(sim_memory.pss / 2**30, 2),
        "deployment_peak_rss_gb": round(dep_memory.rss / 2**30, 2),
        "deployment_peak_pss_gb": round(dep_memory.pss / 2**30, 2),
        "final_adapters_identical": identical,
    }
    report(f"deployment {dep_wall:.1f} s (+{up_seconds:.1f} s to start the federation) vs "
           f"simulation {sim_wall:.1f} s: {dep_wall / sim_wall:.2f}x; peak PSS "
           f"{figures['deployment_peak_pss_gb']} vs {figures['simulation_peak_pss_gb']} GB; "
           f"identical adapters: {identical}", figures)


if __name__ == "__main__":
    main()
